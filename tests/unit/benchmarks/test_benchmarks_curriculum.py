"""benchmarks/curriculum.py without running the pipeline: its config, held-out set and stats."""

from __future__ import annotations

import tomllib

import pytest

from benchmarks import curriculum as C
from benchmarks import heldout as H
from broker.curriculum.banks import SymbolsBank


@pytest.fixture(scope="module")
def base() -> dict:
    return tomllib.loads(C.BASE_CONFIG.read_text())


def test_config_loads_and_pool_is_the_whole_bank(base: dict) -> None:
    from shared.config import load_config

    cfg = load_config(str(C.BASE_CONFIG))
    bank = SymbolsBank(cfg.env)
    assert cfg.broker.curriculum.pool_size == len(bank)
    names = [f.name for f in cfg.env.symbols.families]
    assert {"mid", "hard"} <= set(names)
    # every family in its own scorer bucket
    import zlib

    buckets = {zlib.crc32(n.encode()) % cfg.broker.curriculum.family_buckets for n in names}
    assert len(buckets) == len(names)
    # uniform picking spends most groups on families that teach nothing at first
    sizes = {f.name: f.tasks for f in cfg.env.symbols.families}
    idle = sizes["trivial"] + sizes["hard"] + sizes["noise"]
    assert idle / len(bank) > 0.75


def test_run_config_sets_variant_seed_and_one_checkpoint(base: dict) -> None:
    cfg = C.run_config(base, "uniform", 3, 20)
    assert cfg["broker"]["curriculum"]["mode"] == "uniform"
    assert cfg["broker"]["curriculum"]["seed"] == 3
    assert cfg["env"]["seed"] == 3 and cfg["learner"]["steps"] == 20
    assert cfg["learner"]["checkpoint_every"] > 20
    assert base["broker"]["curriculum"]["mode"] == "curator"  # the base is untouched


def test_heldout_is_unseen_indices_of_the_same_map(base: dict) -> None:
    import msgspec

    from shared.config import EnvConfig

    env_cfg = base["env"]
    held = H.heldout_tasks(env_cfg, 2, 16)
    assert set(held) == {"easy", "mid", "hard"}  # trivial and noise left out
    bank = SymbolsBank(msgspec.convert({**env_cfg, "seed": 2}, EnvConfig))
    sizes = {p.family.name: p.family.size for p in bank.parts}
    training = {bank.task_id_at(g) for g in range(len(bank))}
    for fam, tasks in held.items():
        assert len(tasks) == 16
        assert all(int(t.task_id.rsplit("-", 1)[1]) >= sizes[fam] for t in tasks)
        assert not {t.task_id for t in tasks} & training
        assert {t.payload["map_seed"] for t in tasks} == {bank.map_seed(5)}


def test_blind_ceiling_of_the_heldout_set(base: dict) -> None:
    ceiling = H.blind_ceilings(H.heldout_tasks(base["env"], 0, 128))
    assert ceiling["easy"] == pytest.approx(0.25)
    assert ceiling["mid"] == pytest.approx(1 / 16)
    assert ceiling["hard"] == pytest.approx(1 / 128)  # 128 distinct 4-turn sequences


def _run(seed: int, mid: float, hard: float) -> dict:
    return {
        "seed": seed,
        "train_seconds": 1.0,
        "groups": {"easy": 5},
        "pass_rate": [0.1, 0.2],
        "heldout": {"easy": 0.9, "mid": mid, "hard": hard},
        "eval_seconds": 2.0,
    }


def test_summarise_intervals_and_paired_difference() -> None:
    runs = {
        "uniform": [_run(0, 0.1, 0.0), _run(1, 0.2, 0.0), _run(2, 0.1, 0.1)],
        "curator": [_run(0, 0.5, 0.1), _run(1, 0.6, 0.2), {**_run(2, 0, 0), "error": "x"}],
    }
    del runs["curator"][2]["heldout"]
    stats, diff = C.summarise(runs, ["mid", "hard"], ["easy", "mid", "hard"])
    assert stats["uniform"]["success"]["mean"] == pytest.approx((0.05 + 0.1 + 0.1) / 3, abs=1e-4)
    lo, hi = stats["uniform"]["success"]["ci95"]
    assert lo < stats["uniform"]["success"]["mean"] < hi
    assert stats["curator"]["failed_runs"] == 1 and stats["curator"]["success"]["n"] == 2
    assert diff["seeds"] == [0, 1] and diff["mean"] == pytest.approx(0.35 - 0.075, abs=1e-4)
    ceiling = {"easy": 0.25, "mid": 0.0625, "hard": 0.0078}
    C.print_table(stats, diff, ["mid", "hard"], ceiling)  # does not raise

    args = C.parse_args(["--quick"])
    out = C.result_json(args, stats, diff, ceiling, {}, [0, 1, 2], 1.0)
    for key in ("success_curator", "success_uniform", "ci95_curator", "ci95_uniform", "seeds"):
        assert key in out
    assert out["steps"] == 40 and len(out["ci95_curator"]) == 2
    assert out["separated"] is False  # two curator seeds: t = 12.7, a wide interval
    one = C.result_json(
        args,
        *C.summarise({k: v[:1] for k, v in runs.items()}, ["mid"], ["mid"]),
        ceiling,
        {},
        [0],
        1.0,
    )
    assert one["separated"] is None  # one seed: no interval


def test_one_variant_and_no_runs_give_nulls() -> None:
    stats, diff = C.summarise({"uniform": []}, ["mid"], ["mid"])
    assert stats["uniform"]["success"]["mean"] is None and diff["n"] == 0
    args = C.parse_args(["--variants", "uniform", "--target", "mid"])
    out = C.result_json(args, stats, diff, {"mid": 0.0625}, {}, [0], 1.0)
    assert out["success_curator"] is None and out["separated"] is None
    assert args.seeds == 5 and args.steps == 150


def test_separated_when_the_intervals_do_not_overlap() -> None:
    runs = {
        "uniform": [_run(s, 0.1 + s / 100, 0.0) for s in range(3)],
        "curator": [_run(s, 0.5 + s / 100, 0.2) for s in range(3)],
    }
    stats, diff = C.summarise(runs, ["mid", "hard"], ["easy", "mid", "hard"])
    ceiling = {"easy": 0.25, "mid": 0.0625, "hard": 0.0078}
    out = C.result_json(C.parse_args([]), stats, diff, ceiling, {}, [0, 1, 2], 1.0)
    assert out["separated"] is True
    assert out["diff"]["mean"] == pytest.approx(0.35 - 0.05, abs=1e-4)

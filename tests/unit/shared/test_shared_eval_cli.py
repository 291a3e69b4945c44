"""`headrace eval` without vLLM: the pass@k estimator, scoring per family, the report's JSON
shape, which model a checkpoint path means, and the one-line errors. The actor's part (playing
the tasks) is replaced by a stand-in that scores episodes by a rule; the broker's part
(`python -m broker.heldout`) runs for real, in process."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from broker import heldout as broker_heldout
from shared import cli, passk
from shared import eval_cli as E
from shared import heldout as H
from shared.checkpoint_dirs import CheckpointNotFound, resolve_checkpoint
from shared.config import ConfigError
from shared.protocol import TaskSpec

SYMBOLS_TOML = """
[model]
path = "{model}"
[env]
name = "symbols"
[env.symbols]
levels = [5, 6]
tasks_per_level = 16
n_turns = 1
reasoning_tokens = 2
"""


# ---------------------------------------------------------------- pass@k


def brute_pass_at_k(n: int, c: int, k: int) -> float:
    """The share of all k-subsets of the n samples that hold at least one success."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_is_the_brute_force_probability(n: int) -> None:
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert passk.pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12)
        assert passk.pass_at_k(n, c, 1) == pytest.approx(c / n)


def test_pass_at_k_rejects_impossible_counts() -> None:
    for n, c, k in ((4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)):
        with pytest.raises(ValueError):
            passk.pass_at_k(n, c, k)


def result(task: str, family: str, successes: list[bool], rewards: list[float] | None = None):
    rewards = rewards if rewards is not None else [float(s) for s in successes]
    return passk.TaskResult(task, family, rewards, successes)


def test_scores_average_tasks_within_and_across_families() -> None:
    results = [
        result("a0", "A", [True, False, False, False], [1.0, 0.5, 0.0, 0.0]),  # p1 .25 p2 .5
        result("a1", "A", [False] * 4, [0.0] * 4),  # 0, 0
        result("b0", "B", [True] * 4, [1.0] * 4),  # 1, 1
    ]
    overall, fams = passk.score_by_family(results)
    assert (overall.n, overall.episodes, overall.k) == (3, 12, 4)
    assert fams["A"].n == 2 and fams["B"].n == 1
    assert fams["A"].pass_at_1 == pytest.approx(0.125)
    assert fams["A"].pass_at_k == pytest.approx((1.0 + 0.0) / 2)  # pass@4 with one success: 1
    assert fams["A"].mean_reward == pytest.approx(1.5 / 8)
    assert overall.pass_at_1 == pytest.approx((0.25 + 0 + 1) / 3)  # a mean over tasks
    assert overall.mean_reward == pytest.approx(5.5 / 12)


# ---------------------------------------------------------------- report


def heldout_set() -> H.HeldoutSet:
    def task(fam: str, i: int) -> TaskSpec:
        return TaskSpec(task_id=f"x-{fam}-{i}", env="symbols", family=fam)

    return H.HeldoutSet(
        env="symbols",
        n=2,
        families={
            "A": H.HeldoutFamily([task("A", 0), task("A", 1)], {"pass": 0.25, "reward": 0.25}),
            "B": H.HeldoutFamily([task("B", 0)]),
        },
    )


def test_report_has_the_json_shape_and_renders_a_table(tmp_path: Path) -> None:
    results = [
        result("x-A-0", "A", [True, False]),
        result("x-A-1", "A", [False, False]),
        result("x-B-0", "B", [True, True]),
    ]
    report = E.make_report(heldout_set(), results, resolve_checkpoint(model_dir(tmp_path)))
    json.loads(json.dumps(report))  # plain JSON
    for key in ("pass_at_1", "pass_at_k", "mean_reward", "n", "k", "samples", "families"):
        assert key in report
    assert (report["n"], report["k"], report["samples"], report["episodes"]) == (3, 2, 2, 6)
    assert report["pass_at_1"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert report["pass_at_k"] == pytest.approx((1 + 0 + 1) / 3)
    a, b = report["families"]["A"], report["families"]["B"]
    assert (a["n"], a["pass_at_1"], a["pass_at_k"]) == (2, 0.25, 0.5)
    assert a["blind_ceiling"] == {"pass": 0.25, "reward": 0.25} and b["blind_ceiling"] is None
    assert report["blind_ceiling"] is None  # not every family has one
    lines = E.render(report).splitlines()
    assert lines[1].split() == [
        "family", "tasks", "pass@1", "pass@2", "mean", "reward", "blind", "pass", "blind", "reward"
    ]  # fmt: skip
    assert lines[2].split() == ["A", "2", "0.250", "0.500", "0.250", "0.250", "0.250"]
    assert lines[3].split() == ["B", "1", "1.000", "1.000", "1.000", "-", "-"]
    assert lines[4].split()[:2] == ["all", "3"]


# ---------------------------------------------------------------- checkpoint paths


def model_dir(root: Path, lora: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / ("adapter_config.json" if lora else "config.json")).write_text("{}")
    (root / "tokenizer.json").write_text("{}")
    return root


def test_a_checkpoint_root_means_its_newest_complete_checkpoint(tmp_path: Path) -> None:
    for step in (1, 20, 300):
        model_dir(tmp_path / f"step_{step:06d}")
        if step != 300:  # the newest is still being written: no state.json
            (tmp_path / f"step_{step:06d}" / "state.json").write_text("{}")
    assert resolve_checkpoint(tmp_path).path == tmp_path / "step_000020"
    assert resolve_checkpoint(tmp_path / "step_000001").path == tmp_path / "step_000001"
    with pytest.raises(CheckpointNotFound, match="incomplete"):
        resolve_checkpoint(tmp_path / "step_000300")


def test_a_model_dir_is_itself_and_an_adapter_dir_is_lora(tmp_path: Path) -> None:
    plain = resolve_checkpoint(model_dir(tmp_path / "hf"))
    assert plain.path == tmp_path / "hf" and not plain.lora
    assert resolve_checkpoint(model_dir(tmp_path / "lora", lora=True)).lora


# ---------------------------------------------------------------- the command


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    out = capsys.readouterr()
    return int(exit_.value.code or 0), out.out, out.err


@pytest.fixture
def config(tmp_path: Path) -> str:
    path = tmp_path / "symbols.toml"
    path.write_text(SYMBOLS_TOML.format(model=model_dir(tmp_path / "base")))
    return str(path)


@pytest.fixture
def roles(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The two roles in process: the broker's for real, the actor's a stand-in where task i
    of a family succeeds on samples < i % 3 (reward 1, else 0.5)."""
    calls: list[list[str]] = []

    def fake_role(argv: list[str]) -> int:
        calls.append(argv)
        if argv[0] == "broker.heldout":
            return broker_heldout.main(argv[1:])
        opts = dict(zip(argv[1::2], argv[2::2], strict=False))
        held = H.read(opts["--tasks"], H.HeldoutSet)
        k = int(opts["--samples"])
        out = []
        for fam, f in held.families.items():
            for i, t in enumerate(f.tasks):
                wins = [s < i % 3 for s in range(k)]
                out.append(
                    passk.TaskResult(t.task_id, fam, [1.0 if w else 0.5 for w in wins], wins)
                )
        H.write(opts["--out"], out)
        return 0

    monkeypatch.setattr(E, "_role", fake_role)
    return calls


def test_json_is_one_object_with_every_score(
    tmp_path: Path, config: str, roles: list, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = model_dir(tmp_path / "run" / "learner" / "step_000040")
    (ckpt / "state.json").write_text("{}")
    argv = ["eval", "--checkpoint", str(tmp_path / "run" / "learner"), "--config", config]
    code, out, _ = run_cli([*argv, "--n", "4", "--samples", "3", "--json"], capsys)
    assert code == 0
    report = json.loads(out)  # the whole of stdout: exactly one JSON object
    assert report["checkpoint"] == str(ckpt) and report["lora"] is False
    assert (report["n"], report["k"], report["samples"], report["episodes"]) == (8, 3, 3, 24)
    assert set(report["families"]) == {"L5", "L6"}
    # tasks 0..3 win 0, 1, 2, 0 of 3 samples
    want_p1, want_pk = (0 + 1 / 3 + 2 / 3 + 0) / 4, (0 + 1 + 1 + 0) / 4
    for fam in report["families"].values():
        assert fam["n"] == 4 and fam["pass_at_1"] == pytest.approx(want_p1)
        assert fam["pass_at_k"] == pytest.approx(want_pk)
        assert 0 < fam["blind_ceiling"]["pass"] < 1  # symbols: the bank's exact ceiling
    fams = report["families"].values()
    assert report["blind_ceiling"]["pass"] == pytest.approx(
        sum(f["blind_ceiling"]["pass"] for f in fams) / 2  # families of equal size
    )
    assert report["pass_at_1"] == pytest.approx(want_p1)
    assert report["mean_reward"] == pytest.approx(0.5 + 0.5 * want_p1)
    # the roles got the config, and the actor the checkpoint as a full model
    assert roles[0][:3] == ["broker.heldout", "--config", config]
    assert roles[1][roles[1].index("--model") + 1] == str(ckpt)

    code, out, _ = run_cli([*argv, "--n", "4", "--samples", "3"], capsys)
    assert code == 0 and "pass@3" in out and out.splitlines()[-1].startswith("pass@1 ")


def test_a_lora_checkpoint_goes_to_the_actor_as_an_adapter(
    tmp_path: Path, config: str, roles: list, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = model_dir(tmp_path / "step_000002", lora=True)
    (ckpt / "state.json").write_text("{}")
    code, out, _ = run_cli(
        ["eval", "--checkpoint", str(ckpt), "--config", config, "--json"], capsys
    )
    assert code == 0 and json.loads(out)["lora"] is True
    assert roles[1][roles[1].index("--adapter") + 1] == str(ckpt) and "--model" not in roles[1]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda tmp: tmp / "nope", "no checkpoint at"),
        (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "neither a model dir"),
        (lambda tmp: (tmp / "m").mkdir() or (tmp / "m" / "config.json").touch() or tmp / "m",
         "no tokenizer"),
    ],
)  # fmt: skip
def test_a_path_that_is_no_model_is_one_line_and_exit_2(
    tmp_path: Path, config: str, roles: list, capsys: pytest.CaptureFixture[str], make, message
) -> None:
    argv = ["eval", "--checkpoint", str(make(tmp_path)), "--config", config, "--json"]
    code, out, err = run_cli(argv, capsys)
    assert code == 2 and out == "" and not roles
    assert len(err.strip().splitlines()) == 1 and message in err


def test_bad_counts_and_a_bad_config_are_exit_2(
    tmp_path: Path, config: str, roles: list, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = str(model_dir(tmp_path / "hf"))
    code, _, err = run_cli(["eval", "--checkpoint", ckpt, "--config", config, "--n", "0"], capsys)
    assert code == 2 and "--n and --samples must be >= 1" in err
    bad = tmp_path / "bad.toml"
    bad.write_text('[env]\nname = "no-such-env"\n')
    code, out, err = run_cli(["eval", "--checkpoint", ckpt, "--config", str(bad)], capsys)
    assert code == 2 and out == "" and "no-such-env" in err and len(roles) == 1


class NothingHeldOut:
    """A bank whose every task may be leased for training."""

    def heldout(self, n: int) -> dict[str, list[Any]]:
        return {"L5": []}

    def families(self) -> list[Any]:
        return []


def test_an_env_without_heldout_tasks_is_a_clear_error(
    tmp_path: Path,
    config: str,
    roles: list,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(ConfigError, match="no held-out tasks"):
        broker_heldout.heldout_set(NothingHeldOut(), "symbols", 4)  # type: ignore[arg-type]
    monkeypatch.setattr(broker_heldout, "make_bank", lambda env: NothingHeldOut())
    argv = ["eval", "--checkpoint", str(model_dir(tmp_path / "hf")), "--config", config]
    code, out, err = run_cli([*argv, "--json"], capsys)
    assert code == 2 and out == "" and len(roles) == 1  # the actor never starts
    assert "[env] symbols: the task bank holds no held-out tasks" in err

"""Procedural task banks: ids round-trip, memory stays flat, sampling is uniform and seeded."""

from __future__ import annotations

import random
import tracemalloc
from collections import Counter

import msgspec
import numpy as np
import pytest

from actor.envs import make_env
from actor.envs.base import Generation
from broker.curriculum.banks import MixedBank, SymbolsBank, task_seed
from broker.curriculum.factory import make_bank
from broker.curriculum.gym_banks import ReasoningGymBank, TextArenaBank
from shared import protocol as P
from shared.config import (
    ConfigError,
    EnvConfig,
    ReasoningGymConfig,
    SymbolsConfig,
    TextArenaConfig,
    load_config,
)


def all_banks() -> list:
    env = EnvConfig(
        symbols=SymbolsConfig(levels=[0, 1, 4], tasks_per_level=30),
        reasoning_gym=ReasoningGymConfig(tasks_per_family=20),
        textarena=TextArenaConfig(tasks_per_family=10),
        mixed=["symbols", "reasoning_gym", "textarena"],
    )
    return [SymbolsBank(env), ReasoningGymBank(env), TextArenaBank(env), make_bank(env_as(env))]


def env_as(env: EnvConfig, name: str = "mixed") -> EnvConfig:
    return msgspec.structs.replace(env, name=name)


def test_default_symbols_bank_is_unchanged() -> None:
    """Same ids, order and payloads as the list-building bank this replaced."""
    env = EnvConfig()
    old = [
        (f"symbols-L{lv}-{i}", f"L{lv}", float(lv), task_seed(env.seed, lv, i))
        for lv in env.symbols.levels
        for i in range(env.symbols.tasks_per_level)
    ]
    bank = make_bank(env)
    assert isinstance(bank, SymbolsBank) and len(bank) == len(old) == 128
    for t, (tid, fam, diff, seed) in zip(bank.tasks, old, strict=True):
        assert (t.task_id, t.env, t.family, t.difficulty) == (tid, "symbols", fam, diff)
        old_payload = {
            "level": int(diff),
            "seed": seed,
            "n_choices": 4,
            "n_turns": 3,
            "reasoning_tokens": 4,
        }
        assert {k: t.payload[k] for k in old_payload} == old_payload
        # the symbols the bank now ships are those the environment used to draw itself
        rng = random.Random(seed)
        shown = [rng.randrange(2 if int(diff) == 1 else 8) for _ in range(3)]
        assert t.payload["symbols"] == " ".join(map(str, shown))


@pytest.mark.parametrize("k", range(4))
def test_ids_round_trip(k: int) -> None:
    bank = all_banks()[k]
    ids = list(bank.by_id)
    assert len(ids) == len(set(ids)) == len(bank) == sum(f.size for f in bank.families())
    for g in range(0, len(bank), 7):
        spec = bank.tasks[g]
        assert spec.task_id == ids[g] and bank.task(spec.task_id) == spec
        lease = P.Lease(lease_id="l", task=spec, group_size=1, deadline_s=1.0)
        wire = P.decode(P.encode(P.TaskGrant(leases=[lease])))
        assert wire.leases[0].task == spec  # type: ignore[union-attr]
    for spec in bank.sample_candidates(np.random.default_rng(1), 50):
        assert bank.task(spec.task_id) == spec and bank.by_id[spec.task_id] == spec


def test_bad_ids_are_key_errors() -> None:
    bank = all_banks()[3]
    for bad in [
        "",
        "zzz",
        "symbols-L2-0",  # no such level
        "symbols-L1-30",  # out of range
        "symbols-L1-007",  # would alias task 7
        "symbols-L1--1",
        "rg-chain_sum.easy-x",
        "rg-chain_sum.impossible-0",
        "ta-guess_the_number.easy-",
    ]:
        with pytest.raises(KeyError):
            bank.task(bad)
        assert bad not in bank.by_id


def test_families_list_names_difficulties_and_sizes() -> None:
    sym, rg, ta, mixed = all_banks()
    assert [(f.name, f.difficulty, f.size) for f in sym.families()] == [
        ("L0", 0.0, 30),
        ("L1", 1.0, 30),
        ("L4", 4.0, 30),
    ]
    rg_fams = {f.name: f.difficulty for f in rg.families()}
    assert rg_fams["chain_sum.easy"] == 1.0 and rg_fams["gcd.hard"] == 3.0 and len(rg_fams) == 12
    assert {f.name for f in ta.families()} == {"guess_the_number.easy", "guess_the_number.medium"}
    assert mixed.families() == sym.families() + rg.families() + ta.families()
    assert isinstance(mixed, MixedBank) and len(mixed) == len(sym) + len(rg) + len(ta)


def test_sample_candidates_is_uniform_and_seeded() -> None:
    bank = all_banks()[3]
    a = bank.sample_candidates(np.random.default_rng(5), 300)
    b = bank.sample_candidates(np.random.default_rng(5), 300)
    assert [t.task_id for t in a] == [t.task_id for t in b]
    assert len({t.task_id for t in a}) == 300  # distinct
    assert bank.sample_candidates(np.random.default_rng(5), 0) == []
    assert bank.sample_candidates(np.random.default_rng(5), 10**6) == list(bank.tasks)
    # uniform over tasks, so banks are drawn in proportion to their sizes: 90 / 240 / 20 of 350
    rng = np.random.default_rng(0)
    draws = [t for _ in range(400) for t in bank.sample_candidates(rng, 50)]
    by_bank = Counter(t.env for t in draws)
    for env, size in [("symbols", 90), ("reasoning_gym", 240), ("textarena", 20)]:
        expected = len(draws) * size / len(bank)
        assert abs(by_bank[env] - expected) < 5 * expected**0.5, (env, by_bank)
    per_task = Counter(t.task_id for t in draws)
    assert len(per_task) == len(bank) and max(per_task.values()) < 3 * len(draws) / len(bank)


def test_pick_is_uniform_with_its_probability() -> None:
    bank = all_banks()[1]
    picks = bank.pick(1000)
    assert all(p.prob == pytest.approx(1 / len(bank)) for p in picks) and bank.pick(0) == []
    counts = Counter(p.task.family for p in picks)
    assert len(counts) == 12 and min(counts.values()) > 40
    bank.feedback(P.TaskFeedback(task_id=picks[0].task.task_id, pass_rate=0.5))
    assert bank.feedback_by_task[picks[0].task.task_id].pass_rate == 0.5


def test_big_banks_hold_no_object_per_task() -> None:
    env = EnvConfig(
        symbols=SymbolsConfig(tasks_per_level=100_000, levels=[1, 2, 3]),
        reasoning_gym=ReasoningGymConfig(tasks_per_family=100_000),
    )
    make_bank(env_as(env)).sample_candidates(np.random.default_rng(0), 10)  # warm caches
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        bank = make_bank(env_as(env))
        assert len(bank) == 300_000 + 12 * 100_000
        bank.sample_candidates(np.random.default_rng(0), 1000)
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert grown < 500_000, grown  # measured: ~20 kB for 1.5M tasks
    last = bank.task(f"rg-gcd.hard-{99_999}")
    assert last == bank.tasks[len(bank) - 1]


async def test_trivial_level_always_rewards() -> None:
    bank = SymbolsBank(EnvConfig(symbols=SymbolsConfig(levels=[0], tasks_per_level=3)))
    for spec in bank.tasks:
        assert spec.payload["n_choices"] == 1
        env = make_env(spec, 0)
        await env.reset()
        rewards = []
        for tok in range(env.max_turns):
            gen = Generation(token_ids=[0] * env.reasoning_tokens + [tok * 7], text_pieces=[])
            rewards.append((await env.step(env.parse_action(gen))).reward)
        assert rewards == [1.0, 1.0, 1.0]


def test_rg_and_ta_payloads_are_self_contained() -> None:
    _, rg, ta, _ = all_banks()
    t = rg.task("rg-basic_arithmetic.hard-3")
    assert t.env == "reasoning_gym" and t.payload["dataset"] == "basic_arithmetic"
    assert t.payload["index"] == 3 and '"allow_parentheses": true' in str(t.payload["config"])
    assert rg.task("rg-basic_arithmetic.hard-4").payload["seed"] == t.payload["seed"]
    g = ta.task("ta-guess_the_number.easy-3")
    assert g.env == "textarena" and g.payload["game"] == "GuessTheNumber-v0-raw"
    assert g.payload["max_turns"] == 12  # 6 guesses, each with one invalid-move retry
    assert ta.task("ta-guess_the_number.easy-4").payload["seed"] != g.payload["seed"]


def test_config_errors() -> None:
    for bad in [
        EnvConfig(name="nope"),
        EnvConfig(name="reasoning_gym", reasoning_gym=ReasoningGymConfig(datasets=["gsm8k"])),
        EnvConfig(name="reasoning_gym", reasoning_gym=ReasoningGymConfig(max_turns=0)),
        EnvConfig(name="textarena", textarena=TextArenaConfig(games=["Wordle-v0"])),
        EnvConfig(name="mixed", mixed=["symbols", "nope"]),
        EnvConfig(name="mixed", mixed=[]),
        EnvConfig(name="mixed", mixed=["symbols", "symbols"]),
        EnvConfig(symbols=SymbolsConfig(levels=[-1])),
        EnvConfig(symbols=SymbolsConfig(levels=[1, 1])),
    ]:
        with pytest.raises(ConfigError):
            make_bank(bad)


def test_env_section_from_toml(tmp_path) -> None:
    path = tmp_path / "run.toml"
    path.write_text(
        '[env]\nname = "mixed"\nmixed = ["symbols", "textarena"]\n'
        "[env.symbols]\nlevels = [0, 1, 2]\n"
        '[env.textarena]\ngames = ["tower_of_hanoi.easy"]\ntasks_per_family = 5\nmax_turns = 10\n'
    )
    bank = make_bank(load_config(path).env)
    assert [f.name for f in bank.families()] == ["L0", "L1", "L2", "tower_of_hanoi.easy"]
    assert bank.task("ta-tower_of_hanoi.easy-4").payload["max_turns"] == 10


def test_a_small_bank_builds_each_spec_once() -> None:
    """The curator draws a pool of up to 1,024 candidates per lease: in a bank that small the
    same specs come back every time, built once (a spec took ~40 us to build, 13.5 ms a lease
    for 128 tasks), and equal to a freshly built one."""
    env = EnvConfig(symbols=SymbolsConfig(tasks_per_level=64, levels=[1, 2]))
    bank = SymbolsBank(env)
    first = bank.sample_candidates(np.random.default_rng(0), 1024)
    again = bank.sample_candidates(np.random.default_rng(1), 1024)
    assert len(first) == len(bank) == 128
    assert all(a is b for a, b in zip(first, again, strict=True))
    fresh = SymbolsBank(env)
    assert [fresh.task(t.task_id) for t in first] == first
    assert bank.task(first[5].task_id) is first[5]

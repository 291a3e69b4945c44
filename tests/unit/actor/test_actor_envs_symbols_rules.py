"""The rules of the `symbols` game: permuted levels, the exact blind ceiling, multi-token
actions and sparse (pass) rewards."""

from __future__ import annotations

import itertools

import pytest

from actor.envs.base import Generation
from actor.envs.symbols import SymbolsEnv
from broker.curriculum.banks import SymbolsBank
from shared import symbols as S
from shared.config import EnvConfig, SymbolsConfig, SymbolsFamily


def bank(seed: int = 0, **symbols) -> SymbolsBank:
    sy = SymbolsConfig(**{"tasks_per_level": 64, "n_choices": 4, **symbols})
    return SymbolsBank(EnvConfig(seed=seed, symbols=sy))


def test_permuted_map_is_balanced_and_depends_on_the_seed() -> None:
    for level, n in S.PERMUTED_SYMBOLS.items():
        m = S.symbol_map(level, 4, map_seed=1)
        assert sorted(m) == sorted(s % 4 for s in range(n))  # each choice has n/4 symbols
    assert S.symbol_map(6, 4, 1) != S.symbol_map(6, 4, 2)


@pytest.mark.parametrize("level", [5, 6, 7, 8])
@pytest.mark.parametrize("turns", [1, 2, 3])
def test_blind_ceiling_of_a_permuted_bank_is_exactly_chance(level: int, turns: int) -> None:
    c = bank(levels=[level], n_turns=turns).blind_ceiling()
    assert c["reward"] == pytest.approx(0.25, abs=1e-12)
    assert c["pass"] == pytest.approx(0.25**turns, abs=1e-12)


def test_blind_ceiling_of_the_legacy_level_1_is_far_above_chance() -> None:
    # The collapse the old demo fell into: answering without looking at the symbol.
    c = bank(levels=[1], n_turns=2, seed=0).blind_ceiling()
    assert c["reward"] == pytest.approx(0.586, abs=1e-3)
    assert c["pass"] > 0.3


def test_blind_ceiling_adapts_to_verdicts() -> None:
    # Turn 1's answer equals turn 0's: a blind policy that repeats a verdict-"ok" answer and
    # switches after "no" scores more than any fixed answer sequence.
    seqs = [[a, a] for a in range(4)]
    c = S.blind_ceiling(seqs, 4)
    fixed_best = max(
        sum((s[0] == x) + (s[1] == y) for s in seqs) / 8
        for x, y in itertools.product(range(4), repeat=2)
    )
    assert fixed_best == 0.25
    # guess 0: right 1/4 (then right again), else 1/3 on turn 1 among the 3 left
    assert c["reward"] == pytest.approx((0.25 * 2 + 0.75 * (1 / 3)) / 2)
    assert c["pass"] == pytest.approx(0.25)


def test_bank_payload_symbols_answer_sequences_round_robin() -> None:
    b = bank(levels=[5], n_turns=2, seed=3)
    seen = set()
    for i in range(16):
        p = b.tasks[i].payload
        syms = [int(x) for x in str(p["symbols"]).split()]
        seen.add(tuple(S.answers(5, syms, 4, int(p["map_seed"]))))
    assert len(seen) == 16  # every answer sequence once per 16 tasks


async def play(env: SymbolsEnv, answers: list[int], width: int) -> list[float]:
    await env.reset()
    rewards = []
    for a in answers:
        ids = [7] * (width - 1) + [4 * 10 + a]  # only the last token decides
        r = await env.step(env.parse_action(Generation(ids, [])))
        rewards.append(r.reward)
    return rewards


async def test_multi_token_action_span_and_the_deciding_token() -> None:
    b = bank(levels=[6], n_turns=3, reasoning_tokens=4, action_tokens=3, seed=0)
    task = b.tasks[5]
    env = SymbolsEnv(dict(task.payload), 0)
    assert env.limits().max_tokens == 7
    act = env.parse_action(Generation(list(range(7)), []))
    assert act.span == (4, 7) and act.action == str(6 % 4)
    right = S.answers(6, env.symbols, 4, int(task.payload["map_seed"]))
    assert await play(SymbolsEnv(dict(task.payload), 0), right, 7) == [1.0, 1.0, 1.0]
    wrong = [(a + 1) % 4 for a in right]
    assert await play(SymbolsEnv(dict(task.payload), 0), wrong, 7) == [0.0, 0.0, 0.0]


async def test_pass_reward_is_sparse_and_shows_no_verdict() -> None:
    fam = SymbolsFamily(name="long", level=6, n_turns=3, reward="pass")
    task = bank(families=[fam], reasoning_tokens=0).tasks[0]
    right = S.answers(
        6, [int(x) for x in str(task.payload["symbols"]).split()], 4, int(task.payload["map_seed"])
    )
    env = SymbolsEnv(dict(task.payload), 0)
    rewards = await play(env, right, 1)
    assert rewards == [0.0, 0.0, 1.0] and env.success(rewards) and env.outcome(rewards) == 1.0
    env = SymbolsEnv(dict(task.payload), 0)
    rewards = await play(env, [right[0], right[1], (right[2] + 1) % 4], 1)
    assert rewards == [0.0, 0.0, 0.0] and not env.success(rewards)

    async def first_obs() -> str:
        e = SymbolsEnv(dict(task.payload), 0)
        await e.reset()
        return (await e.step(e.parse_action(Generation([4 * 10 + right[0]], [])))).observation

    assert "ok" not in (await first_obs()).split()


def test_families_share_the_level_map_and_noise_is_chance() -> None:
    fams = [
        SymbolsFamily(name="short", level=6, n_turns=1),
        SymbolsFamily(name="long", level=6, n_turns=4, reward="pass"),
        SymbolsFamily(name="noise", level=9, n_turns=2),
    ]
    b = bank(families=fams)
    seeds = {t.family: t.payload["map_seed"] for t in b.tasks}
    assert seeds["short"] == seeds["long"]
    noise = [t for t in b.tasks if t.family == "noise"]
    assert b.blind_ceiling(noise) == {"reward": 0.25, "pass": 0.0625}
    # unknown levels are refused by name
    with pytest.raises(ValueError, match="unknown symbols levels"):
        bank(levels=[42])

"""The rules of the built-in `symbols` game, in one place for the bank and the environment.

A task is a sequence of symbols, one per turn; in each turn the agent must answer the symbol's
choice (one of `n_choices`). The broker's bank (broker/curriculum/banks.py) picks the symbols
of each task, the actor's environment (actor/envs/symbols.py) scores the answers, and the
benchmarks compute from the same rules the best score a policy can reach without looking at
the symbols (`blind_ceiling`): the bar any learning claim on this game must clear.

Levels:
  0: trivial, one choice (every answer is right)
  1-4 (legacy): a fixed rule over 2 / 8 / 16 / 32 symbols drawn independently per turn.
      Their answers are not balanced: on a 64-task bank a policy that ignores the symbol
      scores about 0.6 reward on level 1.
  5-8 (permuted): 4 / 8 / 16 / 32 symbols mapped onto the choices by a permutation drawn from
      the bank's `map_seed` (each choice has the same number of symbols). The bank deals the
      answer sequences round robin over all n_choices ** n_turns of them, so on a bank whose
      size is a multiple of that number a symbol-blind policy, even one that adapts to the
      verdicts it has seen, scores exactly chance: 1 / n_choices per turn.
  9 (noise): the right answer is drawn per episode at random; nothing can be learned.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from functools import lru_cache

LEGACY_SYMBOLS = {1: 2, 2: 8, 3: 16, 4: 32}
PERMUTED_SYMBOLS = {5: 4, 6: 8, 7: 16, 8: 32}
NOISE_LEVEL = 9
LEVELS = (0, *LEGACY_SYMBOLS, *PERMUTED_SYMBOLS, NOISE_LEVEL)


def n_symbols(level: int) -> int:
    if level in PERMUTED_SYMBOLS:
        return PERMUTED_SYMBOLS[level]
    return LEGACY_SYMBOLS.get(level, 1 if level in (0, NOISE_LEVEL) else 32)


@lru_cache(maxsize=64)
def symbol_map(level: int, n_choices: int, map_seed: int) -> tuple[int, ...]:
    """Choice of each symbol of a permuted level: a seeded shuffle of a balanced assignment."""
    n = n_symbols(level)
    choices = [s % n_choices for s in range(n)]
    random.Random(map_seed * 1_000_003 + level).shuffle(choices)
    return tuple(choices)


def correct_choice(level: int, sym: int, turn: int, n_choices: int, map_seed: int = 0) -> int:
    if level in PERMUTED_SYMBOLS:
        return symbol_map(level, n_choices, map_seed)[sym]
    if level == 3:
        return (sym + turn) % n_choices
    if level == 4 or level > NOISE_LEVEL:
        return (3 * sym + 1) % n_choices
    return sym % n_choices


def noise_choice(task_seed: int, episode_seed: int, turn: int, n_choices: int) -> int:
    """Level 9's answer: random per (task, episode, turn), unknowable from the prompt."""
    return random.Random(f"{task_seed}:{episode_seed}:{turn}").randrange(n_choices)


def task_symbols(
    level: int, task_seed: int, n_turns: int, n_choices: int, index: int = 0, map_seed: int = 0
) -> list[int]:
    """The symbols task `index` shows, one per turn.

    Legacy levels draw them from `task_seed` alone (as before the permuted levels existed).
    Permuted levels take answer sequence `index mod n_choices**n_turns` (digits base
    n_choices, turn 0 first) and show for each answer one of its symbols, drawn from
    `task_seed`.
    """
    rng = random.Random(task_seed)
    if level not in PERMUTED_SYMBOLS:
        return [rng.randrange(n_symbols(level)) for _ in range(n_turns)]
    mapping = symbol_map(level, n_choices, map_seed)
    by_choice: list[list[int]] = [[] for _ in range(n_choices)]
    for sym, c in enumerate(mapping):
        by_choice[c].append(sym)
    code = index % (n_choices**n_turns)
    out = []
    for _ in range(n_turns):
        code, answer = divmod(code, n_choices)
        out.append(rng.choice(by_choice[answer]))
    return out


def answers(level: int, symbols: Sequence[int], n_choices: int, map_seed: int = 0) -> list[int]:
    return [correct_choice(level, s, t, n_choices, map_seed) for t, s in enumerate(symbols)]


def blind_ceiling(
    answer_seqs: Sequence[Sequence[int]], n_choices: int, weights: Sequence[float] | None = None
) -> dict[str, float]:
    """The best expected reward and pass rate of any policy that never looks at the symbols.

    Such a policy still sees the turn number and the verdicts ("ok" / "no") of its own earlier
    answers, so it may adapt: the optimum is a decision tree, found here by dynamic programming
    over the set of tasks consistent with what it has seen (tasks drawn with `weights`, default
    uniform, as the bank picks them). Reward is the mean over turns of right answers, pass is
    all turns right; each is maximised separately. Noise levels (random answers) are not
    sequences and have no entry here: their ceiling is chance.
    """
    seqs = [tuple(s) for s in answer_seqs]
    w = [1.0] * len(seqs) if weights is None else [float(x) for x in weights]
    if not seqs:
        return {"reward": 0.0, "pass": 0.0}
    n_turns = max(len(s) for s in seqs)
    total = sum(w)

    def best(idx: tuple[int, ...], t: int, objective: str) -> float:
        """Expected (weighted-sum) value of the tasks `idx` from turn t on."""
        live = [i for i in idx if t < len(seqs[i])]
        if not live:
            return sum(w[i] for i in idx) if objective == "pass" else 0.0
        top = 0.0
        for a in range(n_choices):
            hit = tuple(i for i in live if seqs[i][t] == a)
            miss = tuple(i for i in live if seqs[i][t] != a)
            if objective == "pass":
                v = memo(hit, t + 1, objective)
            else:
                v = sum(w[i] for i in hit) / n_turns + memo(hit, t + 1, objective)
                v += memo(miss, t + 1, objective)
            top = max(top, v)
        return top

    cache: dict[tuple[tuple[int, ...], int, str], float] = {}

    def memo(idx: tuple[int, ...], t: int, objective: str) -> float:
        key = (idx, t, objective)
        if key not in cache:
            cache[key] = best(idx, t, objective) if idx else 0.0
        return cache[key]

    everyone = tuple(range(len(seqs)))
    return {
        "reward": memo(everyone, 0, "reward") / total,
        "pass": memo(everyone, 0, "pass") / total,
    }

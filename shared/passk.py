"""pass@k and the scores of an evaluation, shared by `headrace eval`, the broker's periodic
evaluation rounds and the learner's summary.

pass@k is the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models
Trained on Code"): with n samples of a task of which c succeeded, the chance that k samples
drawn without replacement contain at least one success is 1 - C(n-c, k) / C(n, k). Averaged
over tasks; pass@1 is then the plain success rate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from math import comb

import msgspec


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one task with `n` samples, `c` of them successes (k <= n)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


class TaskResult(msgspec.Struct, frozen=True):
    """Every sample of one held-out task: episode rewards and successes."""

    task_id: str
    family: str
    rewards: list[float]
    successes: list[bool]


class Score(msgspec.Struct, frozen=True):
    """Scores of a set of tasks; `k` is the smallest sample count among them."""

    n: int  # tasks
    episodes: int
    k: int
    pass_at_1: float
    pass_at_k: float
    mean_reward: float


def score(results: Sequence[TaskResult], k: int | None = None) -> Score:
    """pass@1, pass@k (k: the fewest samples any task has, unless given) and the mean
    episode reward of `results`."""
    results = [r for r in results if r.successes]
    if not results:
        return Score(n=0, episodes=0, k=0, pass_at_1=0.0, pass_at_k=0.0, mean_reward=0.0)
    k = k or min(len(r.successes) for r in results)
    p1 = [pass_at_k(len(r.successes), sum(r.successes), 1) for r in results]
    pk = [pass_at_k(len(r.successes), sum(r.successes), k) for r in results]
    rewards = [x for r in results for x in r.rewards]
    return Score(
        n=len(results),
        episodes=len(rewards),
        k=k,
        pass_at_1=sum(p1) / len(p1),
        pass_at_k=sum(pk) / len(pk),
        mean_reward=sum(rewards) / len(rewards),
    )


def score_by_family(results: Sequence[TaskResult]) -> tuple[Score, dict[str, Score]]:
    """The overall score (k shared by all families) and one per family."""
    overall = score(results)
    families: dict[str, list[TaskResult]] = {}
    for r in results:
        families.setdefault(r.family, []).append(r)
    by_family = {f: score(rs, overall.k or None) for f, rs in sorted(families.items())}
    return overall, by_family


def as_dict(overall: Score, by_family: Mapping[str, Score]) -> dict[str, object]:
    """The JSON shape: `pass_at_1`, `pass_at_k`, `mean_reward`, `n`, `k`, `episodes`, and
    `families` with the same keys per family."""
    out: dict[str, object] = msgspec.to_builtins(overall)
    out["families"] = {f: msgspec.to_builtins(s) for f, s in by_family.items()}
    return out

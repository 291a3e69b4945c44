"""The curriculum curator: bandit math by hand, a simulated bandit, the scorer, persistence."""

from __future__ import annotations

import math

import msgspec
import numpy as np
import pytest

from broker.curriculum.curator import Curator, candidates_from_list
from shared.config import CuratorConfig
from shared.protocol import TaskSpec


def tasks_of(n: int, family: str = "f", difficulty: float = 0.0) -> list[TaskSpec]:
    return [
        TaskSpec(task_id=f"{family}-{i}", env="sim", family=family, difficulty=difficulty)
        for i in range(n)
    ]


def curator(tasks: list[TaskSpec], **kw: object) -> Curator:
    kw.setdefault("mode", "curator")
    return Curator(CuratorConfig(**kw), candidates_from_list(tasks))


# Hand-computable settings: no scorer prior, no floor, no decay, unclipped steps, tau 1.
BARE = dict(prior_scale=0.0, floor=0.0, decay=0.0, eta=1.0, max_step=100.0)


def test_one_exponentiated_gradient_update_by_hand() -> None:
    tasks = tasks_of(3)
    c = curator(tasks, **BARE)
    assert list(c.probabilities(tasks).values()) == pytest.approx([1 / 3] * 3)
    # Group pass rate 0.5: learnability g = 0.25; p = 1/3: g_hat = 0.75; step = eta * 0.75.
    up = c.update(tasks[0], 1 / 3, [1.0, 0.0, 1.0, 0.0], [True, False, True, False])
    assert (up.signal, up.g_hat, up.step, up.version) == pytest.approx((0.25, 0.75, 0.75, 1))
    assert c.version == 1
    assert c.scores(tasks) == pytest.approx([0.75, 0.0, 0.0])
    # Entropic mirror map: p_new ∝ p_old * exp(eta * g_hat) = (e^0.75, 1, 1) / (e^0.75 + 2).
    z = math.exp(0.75) + 2
    p = c.probabilities(tasks)
    assert list(p.values()) == pytest.approx([math.exp(0.75) / z, 1 / z, 1 / z])
    # tau divides scores: tau 2 halves the exponent.
    c.cfg = CuratorConfig(mode="curator", **{**BARE, "tau": 2.0})
    z2 = math.exp(0.375) + 2
    assert c.probabilities(tasks)["f-0"] == pytest.approx(math.exp(0.375) / z2)


def test_importance_weight_is_signal_over_grant_probability_and_step_is_clipped() -> None:
    tasks = tasks_of(4)
    c = curator(tasks, **{**BARE, "eta": 0.1, "max_step": 1.0})
    half = [1.0, 0.0], [True, False]  # g = 0.25
    for prob in (1.0, 0.5, 0.1):
        up = c.update(tasks[1], prob, *half)
        assert up.g_hat == pytest.approx(0.25 / prob)
        assert up.step == pytest.approx(0.1 * 0.25 / prob)
    # p = 0.01: eta * g / p = 2.5 is clipped to max_step; g_hat itself is reported unclipped.
    up = c.update(tasks[2], 0.01, *half)
    assert (up.g_hat, up.step) == pytest.approx((25.0, 1.0))
    with pytest.raises(ValueError):
        c.update(tasks[2], 0.0, *half)


def test_floor_keeps_every_arm_at_least_u_over_n() -> None:
    tasks = tasks_of(5)
    c = curator(tasks, **{**BARE, "floor": 0.2})
    for _ in range(5):
        c.update(tasks[0], 0.01, [1.0, 0.0], [True, False])  # score 5 * 25 = 125
    p = np.array(list(c.probabilities(tasks).values()))
    assert p.sum() == pytest.approx(1.0)
    assert p[1:] == pytest.approx([0.2 / 5] * 4)  # softmax share ~0: exactly the floor
    assert p[0] == pytest.approx(0.8 + 0.2 / 5)


def test_decay_shrinks_evidence_by_one_minus_decay_per_update() -> None:
    tasks = tasks_of(3)
    c = curator(tasks, **{**BARE, "decay": 0.5})
    c.update(tasks[0], 0.5, [1.0, 0.0], [True, False])  # step 0.5
    assert c.scores(tasks)[0] == pytest.approx(0.5)
    c.update(tasks[1], 0.5, [1.0, 1.0], [True, True])  # zero variance: step 0, still decays
    assert c.scores(tasks)[:2] == pytest.approx([0.25, 0.0])
    c.update(tasks[0], 0.5, [1.0, 0.0], [True, False])  # 0.25 * 0.5 + 0.5
    c.update(tasks[2], 0.5, [0.0, 0.0], [False, False])
    assert c.scores(tasks)[0] == pytest.approx((0.25 * 0.5 + 0.5) * 0.5)
    assert c.summary()["arms_seen"] == 3  # stats exist for updated arms only


def test_zero_variance_groups_count_and_feed_zero() -> None:
    tasks = tasks_of(2)
    c = curator(tasks, **{**BARE, "signal": "abs_advantage"})
    up = c.update(tasks[0], 0.5, [1.0, 1.0, 1.0], [True] * 3, mean_abs_advantage=0.7)
    assert up.zero_variance and up.signal == 0.0 and up.step == 0.0
    up = c.update(tasks[0], 0.5, [1.0, 0.0, 1.0], [True, False, True], mean_abs_advantage=0.7)
    assert not up.zero_variance and up.g_hat == pytest.approx(1.4)
    s = c.summary()
    assert s["zero_variance_fraction"] == 0.5
    assert s["families"]["f"]["zero_var_groups"] == 1
    assert s["top_arms"][0]["zero_var_groups"] == 1
    with pytest.raises(ValueError, match="mean_abs_advantage"):
        c.update(tasks[1], 0.5, [1.0, 0.0], [True, False])


def test_pass_rate_delta_and_cost_normalisation() -> None:
    tasks = tasks_of(2)
    c = curator(tasks, **{**BARE, "signal": "pass_rate_delta"})
    assert c.update(tasks[0], 1.0, [1.0, 0.0, 0.0, 0.0], [True] + [False] * 3).signal == 0.0
    up = c.update(tasks[0], 1.0, [1.0, 1.0, 1.0, 0.0], [True] * 3 + [False])
    assert up.signal == pytest.approx(0.5)  # |0.75 - 0.25|
    c = curator(tasks, **{**BARE, "cost": "tokens", "summary_ema": 0.5})
    half = [1.0, 0.0], [True, False]
    assert c.update(tasks[0], 1.0, *half, tokens=100).signal == pytest.approx(0.25)  # mean 100
    # Running mean 100 -> 200 (rate 0.5); 300 tokens cost 1.5 times the mean: g / 1.5.
    assert c.update(tasks[0], 1.0, *half, tokens=300).signal == pytest.approx(0.25 * 200 / 300)
    with pytest.raises(ValueError, match="cost"):
        c.update(tasks[0], 1.0, *half)


def test_family_arms_log_the_summed_probability_of_their_candidates() -> None:
    tasks = tasks_of(3, "a") + tasks_of(1, "b")
    c = curator(tasks, arm_by="family", mode="uniform")
    assert c.probabilities(tasks) == pytest.approx({"a": 0.75, "b": 0.25})
    picks = c.pick(50)
    assert {p.prob for p in picks if p.task.family == "a"} == {0.75}
    assert {p.prob for p in picks if p.task.family == "b"} == {0.25}
    c.update(tasks[1], 0.75, [1.0, 0.0], [True, False])
    assert c.summary()["top_arms"][0]["arm"] == "a"


def test_uniform_mode_logs_one_over_bank_size_and_full_entropy() -> None:
    tasks = tasks_of(10)
    c = curator(tasks, mode="uniform")
    assert {p.prob for p in c.pick(20)} == {0.1}
    s = c.summary()
    assert s["sampling_entropy"] == pytest.approx(math.log(10))
    assert s["families"]["f"]["pick_share"] == pytest.approx(1 - 0.95**20)


def simulate(c: Curator, rates: dict[str, float], picks: int, seed: int = 1) -> list[str]:
    """Pick one task at a time, play a group of 8 Bernoulli(rate) rollouts, feed it back."""
    env = np.random.default_rng(seed)
    chosen = []
    for _ in range(picks):
        (pk,) = c.pick(1)
        ok = env.random(8) < rates[pk.task.task_id]
        c.update(pk.task, pk.prob, ok.astype(float).tolist(), ok.tolist())
        chosen.append(pk.task.task_id)
    return chosen


def test_simulated_bandit_concentrates_on_learnable_arms() -> None:
    # 30 indistinguishable-by-feature arms: 10 impossible, 10 solved, 10 at p = 0.5.
    tasks = tasks_of(30)
    rates = {t.task_id: (0.0, 1.0, 0.5)[i // 10] for i, t in enumerate(tasks)}
    c = curator(tasks, seed=3)
    chosen = simulate(c, rates, 400)
    share = np.mean([rates[t] == 0.5 for t in chosen[100:]])
    assert share > 0.7  # uniform would be 1/3 (measured 0.87 with these seeds)
    s = c.summary()
    assert all(rates[a["arm"]] == 0.5 for a in s["top_arms"])
    assert s["sampling_entropy"] < s["sampling_entropy_max"] - 0.5
    assert s["zero_variance_fraction"] > 0.0  # the picks of solved / impossible arms
    # Deterministic given the seeds.
    assert simulate(curator(tasks, seed=3), rates, 400) == chosen


def test_scorer_generalises_to_unseen_arms_by_difficulty() -> None:
    # 3000 tasks, pools of 64: arms are rarely seen twice, so only features can carry what
    # was learned. Difficulty 1 is learnable (p = 0.5); 0 is solved and 2 impossible.
    bank = [t for d in (0, 1, 2) for t in tasks_of(1000, f"d{d}", float(d))]
    bank = [msgspec.structs.replace(t, family="all") for t in bank]  # no family shortcut
    rates = {t.task_id: (1.0, 0.5, 0.0)[int(t.difficulty)] for t in bank}
    c = curator(bank, pool_size=64, seed=5)
    chosen = simulate(c, rates, 300)
    fresh = [TaskSpec(task_id=f"new-{d}", env="sim", family="all", difficulty=d) for d in (0, 1, 2)]
    s_solved, s_learnable, s_impossible = c.scores(fresh)
    assert s_learnable > s_solved + 1.0 and s_learnable > s_impossible + 1.0
    assert np.mean([rates[t] == 0.5 for t in chosen[150:]]) > 0.6


def test_state_round_trip_gives_identical_subsequent_picks() -> None:
    tasks = tasks_of(40) + tasks_of(20, "g", 2.0)
    rates = {t.task_id: (i % 3) / 2 for i, t in enumerate(tasks)}
    c = curator(tasks, pool_size=16, seed=7)
    simulate(c, rates, 60)
    blob = c.state()
    assert b"pickle" not in blob
    restored = curator(tasks, pool_size=16, seed=999)  # seed is overwritten by load
    restored.load(blob)
    assert restored.state() == blob
    assert simulate(restored, rates, 50, seed=2) == simulate(c, rates, 50, seed=2)
    assert restored.summary() == c.summary()
    with pytest.raises(ValueError, match="arm_by"):
        curator(tasks, arm_by="family").load(blob)


def test_config_rejects_unknown_fields_and_bad_choices() -> None:
    ok = msgspec.convert({"mode": "curator", "signal": "abs_advantage"}, CuratorConfig)
    assert ok.pool_size == 1024
    for bad in ({"modee": "uniform"}, {"signal": "vibes"}, {"floor": 1.5}, {"tau": 0.0}):
        with pytest.raises(msgspec.ValidationError):
            msgspec.convert(bad, CuratorConfig)


def test_a_million_task_procedural_bank_keeps_stats_for_visited_arms_only() -> None:
    def procedural(rng: np.random.Generator, k: int) -> list[TaskSpec]:
        # Tasks exist only as indices until drawn into a pool.
        idx = rng.choice(1_000_000, size=k, replace=False)
        return [
            TaskSpec(task_id=f"p{i}", env="sim", family=f"L{i % 5}", difficulty=i % 5) for i in idx
        ]

    c = Curator(CuratorConfig(mode="curator", pool_size=256), procedural)
    for pk in c.pick(40):
        c.update(pk.task, pk.prob, [1.0, 0.0], [True, False])
    assert len(c.arms) <= 40 and len(c.cols["resid"]) <= 64
    assert 0 < min(pk.prob for pk in c.pick(10))


def test_duplicate_candidates_add_up_to_the_arms_probability() -> None:
    a, b = tasks_of(2)
    c = Curator(CuratorConfig(mode="uniform"), lambda rng, k: [a, b, a, a])
    assert c.probabilities([a, b, a, a]) == pytest.approx({"f-0": 0.75, "f-1": 0.25})
    assert {(p.task.task_id, p.prob) for p in c.pick(30)} == {("f-0", 0.75), ("f-1", 0.25)}

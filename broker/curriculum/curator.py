"""The curator: which task (or task family) the broker leases next (ACTOR-CURATOR, METHODS §2).

A non-stationary bandit over arms (task ids or families), numpy only:

1. Candidates. Each `pick(n)` call asks the bank for a pool of `pool_size` tasks drawn
   uniformly at random (`SampleCandidates`), so a bank of 1e5+ procedural tasks is
   never materialised; per-arm statistics exist only for arms that have been updated.
2. Scores (log-weights). score = prior_scale * f(x) + own evidence, where f is a linear
   scorer over task features x (difficulty, hashed family, the arm's decayed pass rate,
   confidence and staleness) trained online to predict the progress signal, so an unseen
   arm scores like the seen arms it resembles. The own evidence is the sum of the arm's
   EG steps, decayed by (1 - decay) per update: as it fades the arm returns to the prior.
3. Sampling. Over the pool, p = (1 - u) * softmax(score / tau) + u / N; the n picks of one
   call are independent draws from that same p. In "uniform" mode p = 1 / N.
4. Feedback. When a group finishes, `update` turns it into a signal g (learnability p(1-p),
   the learner's mean |A|, or |pass-rate change| since the last visit; 0 for a group whose
   rewards are all equal), optionally divided by its relative cost, importance-weights it
   g_hat = g / p with p the grant's `sample_prob`, and takes one exponentiated-gradient
   (OSMD, entropic mirror map) step: score += clip(eta * g_hat), i.e. p ∝ p_old * exp(...).
   Every update is a new `version` (logged with grants as `curator_version`).

What `sample_prob` means: the probability that this pick chose this arm *given the pool it
was drawn from*, i.e. the sum of p over the pool's candidates of that arm. It is exact (it is
the vector that was sampled), and the pool is drawn independently of all scores, so it acts
as a random context: for the arms in a pool g / p is an unbiased estimate of g, which is
what the EXP3 / OSMD argument needs (a "sleeping arms" bandit in which every arm wakes
equally often). When the bank samples without replacement and holds no more than
`pool_size` tasks, the pool is the whole bank and `sample_prob` is also the bank-wide
probability (1 / len(bank) in uniform mode, as the uniform bank logs). In a larger bank a
task arm's bank-wide probability is about sample_prob * pool_size / len(bank); it is not
logged, as computing it exactly would mean scoring the whole bank.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgspec
import numpy as np

from broker.curriculum.banks import Picked
from shared import protocol as P
from shared.config import CuratorConfig

# The bank's side of the contract: `k` tasks drawn uniformly at random using only `rng`
# (determinism given `rng` is what makes a restored curator repeat its picks). Best without
# replacement and the whole bank when it holds no more than `k` (then `sample_prob` is the
# bank-wide probability); duplicates are allowed: an arm's p sums over its copies.
SampleCandidates = Callable[[np.random.Generator, int], list[P.TaskSpec]]


def candidates_from_list(tasks: Sequence[P.TaskSpec]) -> SampleCandidates:
    """`SampleCandidates` for a bank that already holds its tasks in a list."""

    def sample(rng: np.random.Generator, k: int) -> list[P.TaskSpec]:
        if k >= len(tasks):
            return list(tasks)
        return [tasks[i] for i in rng.choice(len(tasks), size=k, replace=False)]

    return sample


@dataclass(slots=True)
class Update:
    """What one `update` did (returned for metrics and tests)."""

    arm: str
    signal: float  # g, after zero-variance and cost handling
    g_hat: float  # g / sample_prob
    step: float  # clip(eta * g_hat, +-max_step): the change of the arm's score
    zero_variance: bool
    version: int


class FamilyStats(msgspec.Struct):
    pass_rate: float = 0.0  # EMA over the family's groups
    pick_share: float = 0.0  # EMA over picks of "this pick was from the family"
    groups: int = 0
    zero_var_groups: int = 0


# Per-arm columns, grown on demand; row i belongs to arm `arms[i]`.
_COLUMNS: dict[str, type] = {
    "resid": np.float64,  # own evidence: sum of EG steps above the scorer's prior, decayed
    "weight": np.float64,  # decayed number of groups seen
    "pass_sum": np.float64,  # decayed sum of group pass rates (pass_sum / weight = mean)
    "last_pass": np.float64,  # pass rate of the arm's latest group (pass_rate_delta)
    "difficulty": np.float64,  # of the arm's latest task (features in `summary`)
    "bucket": np.int64,  # hashed family of that task
    "version": np.int64,  # curator version at the arm's latest update (lazy decay)
    "visits": np.int64,
    "zero_var": np.int64,
}
_ARM_FEATURES = 4  # confidence, confidence * pass, confidence * pass * (1 - pass), age


class _Pool(NamedTuple):
    """A candidate pool as arrays, one entry per candidate task."""

    difficulty: np.ndarray
    bucket: np.ndarray  # hashed family
    rows: np.ndarray  # the arm's row, -1 for an arm never updated
    group: np.ndarray  # index of the candidate's arm among the pool's distinct arms


class CuratorState(msgspec.Struct, forbid_unknown_fields=True):
    """Everything `load` needs for the same subsequent picks (msgpack; arrays as bytes)."""

    arm_by: str
    columns: dict[str, bytes]  # little-endian, the first len(arms) rows
    scorer: bytes  # little-endian float64 weights
    rng: str  # JSON of bit_generator.state: PCG64's 128-bit ints do not fit msgpack
    # The curator attributes of the same names:
    version: int
    arms: list[str]
    arm_families: list[str]
    diff_mean: float
    diff_var: float
    diff_seen: bool
    cost_mean: float
    families: dict[str, FamilyStats]
    groups: int
    zero_var_groups: int
    entropy: float
    pool_len: int


_PLAIN = tuple(  # copied as they are
    f for f in CuratorState.__struct_fields__ if f not in ("arm_by", "columns", "scorer", "rng")
)


class Curator:
    """The bandit: `pick` tasks for grants, `update` with finished groups, `state` / `load`."""

    def __init__(self, cfg: CuratorConfig, candidates: SampleCandidates) -> None:
        self.cfg = cfg
        self.candidates = candidates
        self.rng = np.random.default_rng(cfg.seed)
        self.version = 0
        self.index: dict[str, int] = {}  # arm id -> row
        self.arms: list[str] = []
        self.arm_families: list[str] = []
        self.cols: dict[str, np.ndarray] = {
            name: np.zeros(16, dtype) for name, dtype in _COLUMNS.items()
        }
        self.n_features = 3 + cfg.family_buckets + _ARM_FEATURES
        self.w = np.zeros(self.n_features)  # scorer weights
        self._buckets: dict[str, int] = {}  # family -> hashed one-hot feature
        self.diff_mean, self.diff_var, self.diff_seen = 0.0, 1.0, False
        self.cost_mean = 0.0  # running mean cost of a group (cost normalisation)
        self.families: dict[str, FamilyStats] = {}
        self.groups = 0
        self.zero_var_groups = 0
        self.entropy = 0.0  # of the last pool's p
        self.pool_len = 0

    # ------------------------------------------------------------ features and scores

    def _arm(self, task: P.TaskSpec) -> str:
        return task.task_id if self.cfg.arm_by == "task" else task.family

    def _bucket(self, family: str) -> int:
        # crc32, not hash(): the same family must land in the same bucket after a restart.
        bucket = self._buckets.get(family)
        if bucket is None:
            bucket = self._buckets[family] = zlib.crc32(family.encode()) % self.cfg.family_buckets
        return bucket

    def _keep(self, rows: np.ndarray) -> np.ndarray:
        """How much of each arm's evidence is left: (1 - decay) ** updates since its last."""
        return (1.0 - self.cfg.decay) ** (self.version - self.cols["version"][rows])

    def _features(self, difficulty: np.ndarray, bucket: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Feature rows for tasks (rows[i] = the arm's row, -1 for an arm never updated)."""
        n, c = len(rows), self.cols
        x = np.zeros((n, self.n_features))
        std = math.sqrt(self.diff_var) if self.diff_var > 1e-12 else 1.0
        z = np.clip((difficulty - self.diff_mean) / std, -3.0, 3.0)
        x[:, 0] = 1.0
        x[:, 1] = z
        x[:, 2] = z * z  # lets a linear model prefer the middle of the difficulty range
        x[np.arange(n), 3 + bucket] = 1.0
        a = 3 + self.cfg.family_buckets
        x[:, a + 3] = 1.0  # age: an unseen arm is as stale as can be
        seen = rows >= 0
        if seen.any():
            r = rows[seen]
            keep = self._keep(r)
            weight = c["weight"][r] * keep
            conf = weight / (weight + 1.0)  # 0 for no evidence, -> 1 with many recent groups
            mean_pass = c["pass_sum"][r] / c["weight"][r]  # stored weight >= 1: no 0/0
            x[seen, a] = conf
            x[seen, a + 1] = conf * mean_pass
            x[seen, a + 2] = 4.0 * conf * mean_pass * (1.0 - mean_pass)  # scaled to [0, 1]
            x[seen, a + 3] = 1.0 - keep
        return x

    def _scores(self, x: np.ndarray, rows: np.ndarray) -> np.ndarray:
        s = self.cfg.prior_scale * (x @ self.w)
        seen = rows >= 0
        s[seen] += self.cols["resid"][rows[seen]] * self._keep(rows[seen])
        return s

    def _pool(self, tasks: Sequence[P.TaskSpec]) -> _Pool:
        arms: dict[str, int] = {}
        n = len(tasks)
        difficulty, bucket = np.empty(n), np.empty(n, np.int64)
        rows, group = np.empty(n, np.int64), np.empty(n, np.int64)
        for i, t in enumerate(tasks):
            arm = self._arm(t)
            difficulty[i], bucket[i] = t.difficulty, self._bucket(t.family)
            rows[i] = self.index.get(arm, -1)
            group[i] = arms.setdefault(arm, len(arms))
        return _Pool(difficulty, bucket, rows, group)

    def _distribution(self, pool: _Pool) -> np.ndarray:
        """p of each candidate of the pool (the arms' p are sums of these)."""
        n = len(pool.rows)
        if self.cfg.mode == "uniform":
            return np.full(n, 1.0 / n)
        x = self._features(pool.difficulty, pool.bucket, pool.rows)
        z = self._scores(x, pool.rows) / self.cfg.tau
        soft = np.exp(z - z.max())
        p = (1.0 - self.cfg.floor) * soft / soft.sum() + self.cfg.floor / n
        return p / p.sum()  # renormalised: rng.choice wants an exact sum

    def scores(self, tasks: Sequence[P.TaskSpec]) -> np.ndarray:
        """Score of each task's arm now (seen arms: prior + own evidence; unseen: prior)."""
        pool = self._pool(tasks)
        return self._scores(self._features(pool.difficulty, pool.bucket, pool.rows), pool.rows)

    def probabilities(self, tasks: Sequence[P.TaskSpec]) -> dict[str, float]:
        """p of each arm if `tasks` were the pool (what `pick` would log as sample_prob)."""
        pool = self._pool(tasks)
        arm_p = np.bincount(pool.group, weights=self._distribution(pool))
        return {self._arm(t): float(arm_p[g]) for t, g in zip(tasks, pool.group, strict=True)}

    # ------------------------------------------------------------ picking

    def pick(self, n: int) -> list[Picked]:
        """`n` tasks (with replacement) from one fresh candidate pool; prob = arm's p in it."""
        if n <= 0:
            return []
        tasks = self.candidates(self.rng, self.cfg.pool_size)
        if not tasks:
            raise ValueError("the task bank returned no candidates")
        pool = self._pool(tasks)
        # Difficulty is standardised by running moments of the pools, so features do not
        # depend on how a bank numbers its levels.
        d, a = pool.difficulty, self.cfg.summary_ema
        if self.diff_seen:
            self.diff_mean += a * (float(d.mean()) - self.diff_mean)
            self.diff_var += a * (float(d.var()) - self.diff_var)
        else:
            self.diff_mean, self.diff_var, self.diff_seen = float(d.mean()), float(d.var()), True
        p = self._distribution(pool)
        arm_p = np.bincount(pool.group, weights=p)  # an arm's p = sum over its candidates
        self.entropy = float(-(p[p > 0] * np.log(p[p > 0])).sum())
        self.pool_len = len(tasks)
        out = []
        for j in self.rng.choice(len(tasks), size=n, p=p):
            out.append(Picked(tasks[j], float(arm_p[pool.group[j]])))
            self._count_pick(tasks[j].family)
        return out

    def _count_pick(self, family: str) -> None:
        a = self.cfg.summary_ema
        self.families.setdefault(family, FamilyStats())
        for name, fs in self.families.items():
            fs.pick_share += a * (float(name == family) - fs.pick_share)

    # ------------------------------------------------------------ feedback

    def _row(self, arm: str, task: P.TaskSpec) -> int:
        """The arm's row, appended (columns doubled when full) on its first update."""
        row = self.index.get(arm)
        if row is not None:
            return row
        row = len(self.arms)
        if row == len(self.cols["resid"]):
            for name, col in self.cols.items():
                self.cols[name] = np.concatenate([col, np.zeros_like(col)])
        self.index[arm] = row
        self.arms.append(arm)
        self.arm_families.append(task.family)
        self.cols["version"][row] = self.version
        return row

    def _signal(
        self, pass_rate: float, row: int, zero_var: bool, mean_abs_advantage: float | None
    ) -> float:
        if zero_var:
            return 0.0  # the group-relative advantage is 0: nothing to learn from it
        if self.cfg.signal == "learnability":
            return pass_rate * (1.0 - pass_rate)
        if self.cfg.signal == "abs_advantage":
            if mean_abs_advantage is None:
                raise ValueError("signal 'abs_advantage' needs the learner's mean_abs_advantage")
            return float(mean_abs_advantage)
        # pass_rate_delta: |change| since the last visit (0 on the first), so tasks being
        # learned and tasks being forgotten both draw attention.
        return abs(pass_rate - float(self.cols["last_pass"][row])) if row >= 0 else 0.0

    def _per_cost(self, g: float, tokens: int, seconds: float) -> float:
        if self.cfg.cost == "none":
            return g
        cost = float(tokens if self.cfg.cost == "tokens" else seconds)
        if cost <= 0:
            raise ValueError(f"cost {self.cfg.cost!r} needs a group cost > 0")
        # Relative to the running mean, so the signal keeps its units and eta its meaning.
        a = self.cfg.summary_ema
        self.cost_mean = (
            cost if self.cost_mean == 0 else self.cost_mean + a * (cost - self.cost_mean)
        )
        return g * self.cost_mean / cost

    def update(
        self,
        task: P.TaskSpec,
        sample_prob: float,
        rewards: Sequence[float],
        successes: Sequence[bool],
        *,
        mean_abs_advantage: float | None = None,
        tokens: int = 0,
        seconds: float = 0.0,
    ) -> Update:
        """Feed back one finished group of `task`, granted with probability `sample_prob`."""
        if not 0.0 < sample_prob <= 1.0:
            raise ValueError(f"sample_prob must lie in (0, 1], got {sample_prob}")
        if not rewards or len(rewards) != len(successes):
            raise ValueError("rewards and successes: one per rollout, at least one")
        arm = self._arm(task)
        row = self.index.get(arm, -1)
        # Features as they were before this group: that is what the scorer predicts from.
        x = self._features(
            np.array([task.difficulty]), np.array([self._bucket(task.family)]), np.array([row])
        )[0]
        pass_rate = float(np.mean(successes))
        zero_var = bool(np.ptp(np.asarray(rewards, dtype=np.float64)) == 0.0)
        g = self._per_cost(
            self._signal(pass_rate, row, zero_var, mean_abs_advantage), tokens, seconds
        )
        g_hat = g / sample_prob
        step = float(np.clip(self.cfg.eta * g_hat, -self.cfg.max_step, self.cfg.max_step))

        # Every arm decays by (1 - decay) per update; only this one is touched now (lazily:
        # `_keep` applies the missed factors when a row is read or updated).
        self.version += 1
        row = self._row(arm, task)
        c = self.cols
        keep = (1.0 - self.cfg.decay) ** (self.version - c["version"][row])
        c["resid"][row] = c["resid"][row] * keep + step
        c["weight"][row] = c["weight"][row] * keep + 1.0
        c["pass_sum"][row] = c["pass_sum"][row] * keep + pass_rate
        c["last_pass"][row] = pass_rate
        c["difficulty"][row] = task.difficulty
        c["bucket"][row] = self._bucket(task.family)
        c["version"][row] = self.version
        c["visits"][row] += 1
        c["zero_var"][row] += zero_var

        # Scorer: one normalised-LMS step toward g (no importance weight: it regresses g on
        # x, and which x it sees does not bias E[g | x]).
        err = float(x @ self.w) - g
        self.w -= self.cfg.scorer_lr * (err * x / (1.0 + x @ x) + self.cfg.scorer_l2 * self.w)

        fs = self.families.setdefault(task.family, FamilyStats())
        first = fs.groups == 0
        fs.pass_rate += (1.0 if first else self.cfg.summary_ema) * (pass_rate - fs.pass_rate)
        fs.groups += 1
        fs.zero_var_groups += zero_var
        self.groups += 1
        self.zero_var_groups += zero_var
        return Update(arm, g, g_hat, step, zero_var, self.version)

    # ------------------------------------------------------------ status and persistence

    def summary(self) -> dict[str, Any]:
        """For `Status` and metrics: entropy, per-family rates, zero-variance share, top arms."""
        n = len(self.arms)
        top: list[dict[str, object]] = []
        if n and self.cfg.top_arms:
            rows = np.arange(n)
            c = self.cols
            x = self._features(c["difficulty"][:n], c["bucket"][:n], rows)
            s = self._scores(x, rows)
            k = min(self.cfg.top_arms, n)
            best = np.argpartition(-s, k - 1)[:k]
            top = [
                {
                    "arm": self.arms[r],
                    "family": self.arm_families[r],
                    "score": float(s[r]),
                    "visits": int(c["visits"][r]),
                    "pass_rate": float(c["pass_sum"][r] / c["weight"][r]),
                    "zero_var_groups": int(c["zero_var"][r]),
                }
                for r in best[np.argsort(-s[best], kind="stable")]
            ]
        return {
            "mode": self.cfg.mode,
            "arm_by": self.cfg.arm_by,
            "version": self.version,
            "arms_seen": n,
            "sampling_entropy": self.entropy,
            "sampling_entropy_max": math.log(self.pool_len) if self.pool_len else 0.0,
            "groups": self.groups,
            "zero_variance_fraction": self.zero_var_groups / self.groups if self.groups else 0.0,
            "families": {name: msgspec.to_builtins(fs) for name, fs in self.families.items()},
            "top_arms": top,
        }

    def state(self) -> bytes:
        n = len(self.arms)
        return msgspec.msgpack.encode(
            CuratorState(
                arm_by=self.cfg.arm_by,
                columns={
                    k: v[:n].astype(v.dtype.newbyteorder("<")).tobytes()
                    for k, v in self.cols.items()
                },
                scorer=self.w.astype("<f8").tobytes(),
                rng=json.dumps(self.rng.bit_generator.state),
                **{name: getattr(self, name) for name in _PLAIN},
            )
        )

    def load(self, data: bytes) -> None:
        """Restore `state()`; the config must agree on arm_by and the feature layout."""
        st = msgspec.msgpack.decode(data, type=CuratorState)
        scorer = np.frombuffer(st.scorer, dtype="<f8").astype(np.float64)
        if st.arm_by != self.cfg.arm_by or len(scorer) != self.n_features:
            raise ValueError("curator state was saved with another arm_by or family_buckets")
        n = len(st.arms)
        for name, dtype in _COLUMNS.items():
            col: np.ndarray = np.zeros(
                max(16, 2 * n), dtype
            )  # room to grow, as `_row` would leave it
            col[:n] = np.frombuffer(st.columns[name], dtype=np.dtype(dtype).newbyteorder("<"))
            self.cols[name] = col
        for name in _PLAIN:
            setattr(self, name, getattr(st, name))
        self.index = {arm: i for i, arm in enumerate(self.arms)}
        self.w = scorer
        self.rng.bit_generator.state = json.loads(st.rng)

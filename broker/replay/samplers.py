"""Samplers decide which items (groups, by key) a sample takes.

`FifoSampler` hands out the oldest complete groups first: with `max_times_sampled=1` that is
plain on-policy-as-possible streaming. `UniformSampler` draws groups uniformly at random and
`PrioritizedSampler` in proportion to priority^alpha (a sum tree), with importance weights.
All implement the same protocol and slot into `Table` unchanged. Items are whole GRPO groups, so
a sample never splits a group; one sample never holds the same group twice.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from broker.replay.sumtree import SumTree


class Sampler(Protocol):
    def __len__(self) -> int: ...

    def insert(self, key: int, priority: float) -> None: ...

    def remove(self, key: int) -> None: ...

    def update(self, key: int, priority: float) -> None: ...

    def update_many(self, keys: Sequence[int], priorities: Sequence[float]) -> None: ...

    def sample(self, n: int) -> list[int]:
        """Up to `n` distinct keys, in the order the batch should carry them."""
        ...

    def weights(self, keys: Sequence[int]) -> list[float]:
        """Importance weights of `keys` (just sampled) at the current step; 1.0 if unbiased."""
        ...

    def new_priority(self) -> float:
        """The priority a newly inserted item gets."""
        ...

    def advance(self) -> None:
        """One sample was handed out (annealing schedules count these)."""
        ...

    def state(self) -> dict[str, object]: ...


class _Unweighted:
    kind = "none"

    def update(self, key: int, priority: float) -> None:
        pass  # priorities do not steer this sampler; the API exists so samplers are swappable

    def update_many(self, keys: Sequence[int], priorities: Sequence[float]) -> None:
        pass

    def weights(self, keys: Sequence[int]) -> list[float]:
        return [1.0] * len(keys)

    def new_priority(self) -> float:
        return 1.0

    def advance(self) -> None:
        pass

    def state(self) -> dict[str, object]:
        return {"kind": self.kind}


class FifoSampler(_Unweighted):
    """Oldest first by key. Keys are insert sequence numbers, so order survives a restart."""

    kind = "fifo"

    def __init__(self) -> None:
        # A sorted list: keys arrive almost always increasing (append), and removals hit the
        # front; both are cheap at replay sizes of thousands of groups.
        self._keys: list[int] = []

    def __len__(self) -> int:
        return len(self._keys)

    def insert(self, key: int, priority: float) -> None:
        if not self._keys or key > self._keys[-1]:
            self._keys.append(key)
        else:
            bisect.insort(self._keys, key)

    def remove(self, key: int) -> None:
        i = bisect.bisect_left(self._keys, key)
        if i < len(self._keys) and self._keys[i] == key:
            del self._keys[i]

    def sample(self, n: int) -> list[int]:
        return self._keys[: max(n, 0)]


class UniformSampler(_Unweighted):
    """Distinct groups uniformly at random; O(1) insert and remove (swap with the last)."""

    kind = "uniform"

    def __init__(self, seed: int | None = None) -> None:
        self._keys: list[int] = []
        self._pos: dict[int, int] = {}
        self._rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self._keys)

    def insert(self, key: int, priority: float) -> None:
        if key not in self._pos:
            self._pos[key] = len(self._keys)
            self._keys.append(key)

    def remove(self, key: int) -> None:
        i = self._pos.pop(key, None)
        if i is None:
            return
        last = self._keys.pop()
        if i < len(self._keys):
            self._keys[i] = last
            self._pos[last] = i

    def sample(self, n: int) -> list[int]:
        m = min(max(n, 0), len(self._keys))
        if m == 0:
            return []
        keys = self._keys
        return [keys[i] for i in self._rng.choice(len(keys), m, replace=False).tolist()]


class PrioritizedSampler:
    """Groups drawn with probability P(i) = p_i^alpha / sum_j p_j^alpha (a sum tree).

    - one sample holds distinct groups: draws are independent with probability P, and a group
      drawn again is skipped — exactly sequential sampling without replacement;
    - importance weights w_i = (N * P(i))^-beta / max_j w_j, the max over the whole table (from
      the tree's minimum positive leaf), so weights lie in (0, 1];
    - beta anneals linearly from `beta0` to 1 over `beta_anneal_steps` samples handed out (one
      per learner batch, i.e. per learner step);
    - a new group gets the largest priority seen so far (1.0 before any update), so every group
      is sampled at least once with a fair chance before the learner has scored it;
    - priority 0 (with `eps` = 0) means never sampled; `eps` > 0 keeps every group reachable.
    """

    kind = "prioritized"

    def __init__(
        self,
        alpha: float = 0.6,
        beta0: float = 0.4,
        beta_anneal_steps: int = 10000,
        eps: float = 0.0,
        seed: int | None = None,
        capacity: int = 1024,
    ) -> None:
        if alpha < 0 or not 0 <= beta0 <= 1 or eps < 0:
            raise ValueError("need alpha >= 0, 0 <= beta0 <= 1 and eps >= 0")
        self.alpha, self.beta0, self.eps = alpha, beta0, eps
        self.beta_anneal_steps = max(0, beta_anneal_steps)
        self.tree = SumTree(capacity)
        self._slot: dict[int, int] = {}  # key -> leaf
        self._key = np.full(self.tree.capacity, -1, dtype=np.int64)  # leaf -> key
        self._free: list[int] = []  # leaves freed by removals, reused first
        self._next = 0  # first leaf never used
        self.max_priority = 1.0
        self.steps = 0
        self._rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self._slot)

    @property
    def beta(self) -> float:
        if self.beta_anneal_steps <= 0:
            return 1.0
        frac = min(1.0, self.steps / self.beta_anneal_steps)
        return self.beta0 + (1.0 - self.beta0) * frac

    def _leaf_value(self, priority: float) -> float:
        p = float(priority)
        if not math.isfinite(p):
            raise ValueError(f"priority must be finite, got {priority!r}")
        return (max(0.0, p) + self.eps) ** self.alpha

    def _leaf_values(self, priorities: np.ndarray) -> np.ndarray:
        if not np.all(np.isfinite(priorities)):
            raise ValueError("priorities must be finite")
        return (np.maximum(priorities, 0.0) + self.eps) ** self.alpha

    def _grow(self, need: int) -> None:
        old = self.tree.capacity
        self.tree.grow(need)
        if self.tree.capacity > old:
            keys = np.full(self.tree.capacity, -1, dtype=np.int64)
            keys[:old] = self._key
            self._key = keys

    def _alloc(self) -> int:
        if self._free:
            return self._free.pop()
        if self._next >= self.tree.capacity:
            self._grow(2 * self.tree.capacity)
        self._next += 1
        return self._next - 1

    def new_priority(self) -> float:
        return self.max_priority

    def insert(self, key: int, priority: float) -> None:
        slot = self._slot.get(key)
        if slot is None:
            slot = self._slot[key] = self._alloc()
            self._key[slot] = key
        self.tree.set(slot, self._leaf_value(priority))
        self.max_priority = max(self.max_priority, float(priority))

    def insert_many(self, keys: Sequence[int], priorities: Sequence[float]) -> None:
        """Bulk insert of new keys (a restart's rebuild, benchmarks): one vectorised tree pass."""
        prios = np.asarray(priorities, dtype=np.float64)
        values = self._leaf_values(prios)
        n = len(keys)
        if len(set(keys)) != n or any(k in self._slot for k in keys):
            raise ValueError("insert_many takes new, distinct keys only")
        reuse = min(n, len(self._free))
        slots = [self._free.pop() for _ in range(reuse)]
        extra = n - reuse
        if self._next + extra > self.tree.capacity:
            self._grow(self._next + extra)
        slots_arr = np.concatenate(
            [np.asarray(slots, dtype=np.int64), np.arange(self._next, self._next + extra)]
        )
        self._next += extra
        self._slot.update(zip(keys, slots_arr.tolist(), strict=True))
        self._key[slots_arr] = np.asarray(keys, dtype=np.int64)
        self.tree.set_many(slots_arr, values)
        if prios.size:
            self.max_priority = max(self.max_priority, float(prios.max()))

    def remove(self, key: int) -> None:
        slot = self._slot.pop(key, None)
        if slot is None:
            return
        self.tree.set(slot, 0.0)
        self._key[slot] = -1
        self._free.append(slot)

    def update(self, key: int, priority: float) -> None:
        slot = self._slot.get(key)
        if slot is not None:
            self.tree.set(slot, self._leaf_value(priority))
            self.max_priority = max(self.max_priority, float(priority))

    def update_many(self, keys: Sequence[int], priorities: Sequence[float]) -> None:
        """Apply a learner's PriorityUpdate: O(log n) numpy steps for the whole batch."""
        slot_of = self._slot
        pairs = [(slot_of[k], p) for k, p in zip(keys, priorities, strict=True) if k in slot_of]
        if not pairs:
            return
        if len(pairs) <= 2:  # the scalar path is cheaper for a couple of leaves
            for slot, prio in pairs:
                self.tree.set(slot, self._leaf_value(prio))
                self.max_priority = max(self.max_priority, float(prio))
            return
        slots, prios = zip(*pairs, strict=True)
        p = np.asarray(prios, dtype=np.float64)
        self.tree.set_many(np.asarray(slots, dtype=np.int64), self._leaf_values(p))
        self.max_priority = max(self.max_priority, float(p.max()))

    # Rounds of plain redraws (a repeat is skipped) before the chosen groups are hidden.
    REDRAW_ROUNDS = 3

    def sample(self, n: int) -> list[int]:
        m = min(max(n, 0), self.tree.n_positive)
        if m == 0:
            return []
        tree = self.tree
        chosen: list[int] = []
        seen: set[int] = set()
        hidden: list[tuple[int, float]] = []  # leaves zeroed for the next round, to restore
        # The first m distinct leaves of a stream of independent draws are exactly a sequential
        # sample without replacement. Redrawing from the full tree and skipping repeats keeps
        # that stream; when repeats dominate (the chosen groups hold most of the mass), the
        # chosen leaves are zeroed instead, so the next draws come from the remaining mass —
        # the same distribution for the next new leaf, without the waste.
        rounds = 0
        try:
            while True:
                for slot in tree.sample_list(m - len(chosen), self._rng):
                    if slot not in seen:
                        seen.add(slot)
                        chosen.append(slot)
                        if len(chosen) == m:
                            break
                if len(chosen) == m:
                    break
                rounds += 1
                if rounds >= self.REDRAW_ROUNDS:
                    hide = [s for s in chosen if tree[s] > 0.0]
                    hidden.extend((s, tree[s]) for s in hide)
                    tree.set_many(hide, [0.0] * len(hide))
        finally:
            if hidden:
                slots, values = zip(*hidden, strict=True)
                tree.set_many(slots, values)
        key = self._key
        return [int(key[s]) for s in chosen] if m <= 64 else key[chosen].tolist()

    def weights(self, keys: Sequence[int]) -> list[float]:
        """w_i = (N * P(i))^-beta / max_j w_j with P(i) = leaf_i / total, N = len(self); the
        max is over the whole table (its least likely group: the tree's minimum leaf)."""
        n = len(self._slot)
        tree = self.tree
        total = tree.total
        if not keys or n == 0 or not total > 0.0:
            return [1.0] * len(keys)
        beta = self.beta
        max_w = (n * tree.min / total) ** -beta
        if len(keys) <= 64:  # plain Python is cheaper than numpy's per-call cost here
            get, out = self._slot.get, []
            for k in keys:
                slot = get(k)
                leaf = tree[slot] if slot is not None else 0.0
                # a key no longer in the table, or at priority 0: neutral weight
                out.append((n * leaf / total) ** -beta / max_w if leaf > 0.0 else 1.0)
            return out
        slots = np.asarray([self._slot.get(k, -1) for k in keys], dtype=np.int64)
        leaves = np.where(slots >= 0, tree.get_many(np.maximum(slots, 0)), 0.0)
        with np.errstate(divide="ignore"):
            w = (n * leaves / total) ** -beta / max_w
        return np.where(leaves > 0.0, w, 1.0).tolist()

    def advance(self) -> None:
        self.steps += 1

    def state(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "alpha": self.alpha,
            "beta": round(self.beta, 6),
            "steps": self.steps,
            "items": len(self._slot),
            "sampleable": self.tree.n_positive,
            "max_priority": self.max_priority,
        }

"""Task banks: the set of tasks the broker leases out, and how to pick from it.

Banks are procedural. A bank is a list of families (name, difficulty, size); task `i` of family
`f` is generated on demand from (seed, f, i), and its id `<prefix>-<family>-<i>` parses back to
the same spec, so a bank of millions of tasks costs a few objects per family, not one per task.
Every environment-specific detail an actor needs travels in the task's payload, which is why
`gym_banks.py` spells out the reasoning-gym and TextArena settings without importing either
package (the broker stays light: pure Python and numpy).

Picking is uniform for now (`pick`); a curator (ACTOR-CURATOR style, see METHODS.md) will draw
candidates with `sample_candidates`, score them with the feedback recorded here and replace
`pick` with learned probabilities.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import numpy as np

from shared import protocol as P
from shared import symbols as S
from shared.config import ConfigError, EnvConfig, SymbolsFamily


@dataclass(slots=True)
class Picked:
    task: P.TaskSpec
    prob: float  # probability this pick had (logged with the lease as `sample_prob`)


@dataclass(frozen=True, slots=True)
class Family:
    name: str
    difficulty: float
    size: int  # number of tasks


class TaskBank(Protocol):
    version: int  # curator version (0: uniform)

    def __len__(self) -> int: ...

    def families(self) -> list[Family]: ...

    def task(self, task_id: str) -> P.TaskSpec: ...

    def sample_candidates(self, rng: np.random.Generator, k: int) -> list[P.TaskSpec]: ...

    def pick(self, n: int) -> list[Picked]: ...

    def feedback(self, fb: P.TaskFeedback) -> None: ...

    def heldout(self, n: int) -> dict[str, list[P.TaskSpec]]:
        """Up to `n` tasks per family that training never leases (for evaluation)."""
        ...


def task_seed(base: int, level: int, index: int) -> int:
    # SeedSequence spreads (base, level, index) into well-mixed 32-bit seeds that stay stable
    # across processes and versions, so a task id always means the same episode. 32 bits fit
    # every RNG an environment might feed it to.
    return int(np.random.SeedSequence([base, level, index]).generate_state(1)[0])


def name_key(name: str) -> int:
    # Python's hash() is salted per process; task seeds must not be.
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=4).digest(), "little")


class _TaskSeq(Sequence[P.TaskSpec]):
    """`bank.tasks`: every task in order, generated when indexed (ints only)."""

    def __init__(self, bank: ProceduralBank) -> None:
        self._bank = bank

    def __len__(self) -> int:
        return len(self._bank)

    def __getitem__(self, i: int) -> P.TaskSpec:  # type: ignore[override]
        return self._bank.task_at(i + len(self) if i < 0 else i)


class _TaskIndex(Mapping[str, P.TaskSpec]):
    """`bank.by_id`: task id -> spec, parsed from the id rather than stored."""

    def __init__(self, bank: ProceduralBank) -> None:
        self._bank = bank

    def __getitem__(self, task_id: str) -> P.TaskSpec:
        return self._bank.task(task_id)

    def __iter__(self) -> Iterator[str]:
        return (self._bank.task_id_at(g) for g in range(len(self._bank)))

    def __len__(self) -> int:
        return len(self._bank)


@dataclass(frozen=True, slots=True)
class Part:
    """One family of one bank: `make(i)` is its task i, with id `<prefix>-<family>-<i>`."""

    prefix: str
    family: Family
    make: Callable[[int], P.TaskSpec]


SPEC_CACHE = 4096  # banks up to this many tasks keep their specs built (ProceduralBank._specs)


class ProceduralBank:
    """Families laid end to end: global index g -> (family, index) by cumulative sizes.

    Picking is uniform over tasks, so family sizes set how often each family is drawn.
    """

    version = 0

    def __init__(self, parts: list[Part], seed: int) -> None:
        if not parts or any(p.family.size < 1 for p in parts):
            raise ConfigError("env: a task bank needs families with >= 1 task each")
        keys = [(p.prefix, p.family.name) for p in parts]
        if len(set(keys)) != len(keys):
            raise ConfigError(f"env: a task family is listed twice: {keys}")
        self.parts = parts
        self._part_by_key = {k: i for i, k in enumerate(keys)}
        self._ends = np.cumsum([p.family.size for p in parts])
        self.rng = np.random.default_rng(seed)
        # Latest feedback per task, for the curator and `Status`; it grows with the tasks that
        # have been played, not with the bank.
        self.feedback_by_task: dict[str, P.TaskFeedback] = {}
        self.tasks = _TaskSeq(self)
        self.by_id = _TaskIndex(self)
        # Specs built so far, by global index, in a bank small enough that its pools repeat
        # tasks: a spec is a pure function of (seed, index), and building one costs ~40 us
        # (three SeedSequences), which the curator paid for every candidate of every pick
        # (13.5 ms per lease for 128 tasks). A big bank keeps holding no object per task.
        self._specs: dict[int, P.TaskSpec] | None = {} if len(self) <= SPEC_CACHE else None

    def __len__(self) -> int:
        return int(self._ends[-1])

    def families(self) -> list[Family]:
        return [p.family for p in self.parts]

    def _locate(self, g: int) -> tuple[Part, int]:
        if not 0 <= g < len(self):
            raise IndexError(g)
        k = int(np.searchsorted(self._ends, g, side="right"))
        return self.parts[k], g - (int(self._ends[k - 1]) if k else 0)

    def task_at(self, g: int) -> P.TaskSpec:
        spec = self._specs.get(g) if self._specs is not None else None
        if spec is None:
            part, index = self._locate(g)
            spec = part.make(index)
            if self._specs is not None:
                self._specs[g] = spec
        return spec

    def task_id_at(self, g: int) -> str:
        part, index = self._locate(g)
        return f"{part.prefix}-{part.family.name}-{index}"

    def task(self, task_id: str) -> P.TaskSpec:
        """The spec of `task_id`; KeyError if this bank has no such task."""
        prefix, _, rest = task_id.partition("-")
        family, _, index = rest.rpartition("-")
        k = self._part_by_key.get((prefix, family))
        # str(int(index)) == index rejects spellings like "007" that would alias task 7
        if k is None or not index.isdigit() or str(int(index)) != index:
            raise KeyError(task_id)
        if int(index) >= self.parts[k].family.size:
            raise KeyError(task_id)
        start = int(self._ends[k - 1]) if k else 0
        return self.task_at(start + int(index))

    def sample_candidates(self, rng: np.random.Generator, k: int) -> list[P.TaskSpec]:
        """`k` distinct tasks uniformly over the whole bank, drawn from `rng` alone (so a seeded
        rng repeats them); the whole bank, in order, when it holds no more than `k`."""
        if k <= 0:
            return []
        if k >= len(self):
            return [self.task_at(g) for g in range(len(self))]
        # Generator.choice without replacement costs O(k) here, not O(len(bank)).
        return [self.task_at(int(g)) for g in rng.choice(len(self), size=k, replace=False)]

    def pick(self, n: int) -> list[Picked]:
        """`n` tasks uniformly at random, with replacement."""
        if n <= 0:
            return []
        prob = 1.0 / len(self)
        return [Picked(self.task_at(int(g)), prob) for g in self.rng.integers(len(self), size=n)]

    def feedback(self, fb: P.TaskFeedback) -> None:
        # Kept (latest per task) for the curator and for `Status`; uniform picking ignores it.
        self.feedback_by_task[fb.task_id] = fb

    def heldout(self, n: int) -> dict[str, list[P.TaskSpec]]:
        """`n` held-out tasks per family: indices `size .. size+n-1`, which the family's own
        generator builds (same rules and seed) but `task()` and training never reach."""
        out: dict[str, list[P.TaskSpec]] = {}
        for p in self.parts:
            out.setdefault(p.family.name, []).extend(
                p.make(p.family.size + j) for j in range(max(0, n))
            )
        return out


def make_spec(
    prefix: str, fam: Family, index: int, env: str, payload: dict[str, str | int | float]
) -> P.TaskSpec:
    return P.TaskSpec(
        task_id=f"{prefix}-{fam.name}-{index}",
        env=env,
        family=fam.name,
        difficulty=fam.difficulty,
        payload=payload,
    )


class SymbolsBank(ProceduralBank):
    """Tasks of the built-in `symbols` environment (actor/envs/symbols.py plays them; the
    rules and levels are in shared/symbols.py).

    One family per level (`L<level>`, `tasks_per_level` tasks each), or `[env.symbols]
    families`. Each task's payload carries its symbols, so the bank alone decides what a task
    shows; families of one level share that level's symbol map (drawn from `[env] seed`).
    """

    def __init__(self, env: EnvConfig) -> None:
        sy = env.symbols
        specs = sy.families or [SymbolsFamily(name=f"L{lv}", level=lv) for lv in sy.levels]
        if not specs or sy.tasks_per_level < 1 or min(f.level for f in specs) < 0:
            raise ConfigError(
                "env.symbols: the symbols bank needs levels >= 0 and tasks_per_level >= 1"
            )
        unknown = sorted({f.level for f in specs} - set(S.LEVELS))
        if unknown:
            raise ConfigError(f"env.symbols: unknown symbols levels {unknown} (known: {S.LEVELS})")
        self.env = env
        self.sy = sy
        parts = []
        for f in specs:
            turns = f.n_turns or sy.n_turns
            size = f.tasks or sy.tasks_per_level
            # a family's difficulty: its level, then (explicit families) its turn count
            legacy = not sy.families
            fam = Family(f.name, float(f.level) + (0 if legacy else (turns - 1) / 10), size)
            parts.append(Part("symbols", fam, partial(self._make, fam, f, turns)))
        super().__init__(parts, env.seed)

    def map_seed(self, level: int) -> int:
        return task_seed(self.env.seed, level, 2**31 - 1)

    def _make(self, fam: Family, f: SymbolsFamily, turns: int, index: int) -> P.TaskSpec:
        lv = f.level
        key = lv if fam.name == f"L{lv}" else name_key(fam.name)  # legacy ids keep seeds
        seed = task_seed(self.env.seed, key, index)
        n_choices = 1 if lv == 0 else self.sy.n_choices
        syms = S.task_symbols(lv, seed, turns, n_choices, index, self.map_seed(lv))
        payload: dict[str, str | int | float] = {
            "level": lv,
            "seed": seed,
            "n_choices": n_choices,
            "n_turns": turns,
            "reasoning_tokens": self.sy.reasoning_tokens,
            "action_tokens": self.sy.action_tokens,
            "reward": f.reward or self.sy.reward,
            "map_seed": self.map_seed(lv),
            "symbols": " ".join(map(str, syms)),
        }
        if self.sy.step_delay_s > 0:  # absent when off: payloads stay as they were
            payload["step_delay_s"] = self.sy.step_delay_s
            if self.sy.step_delay_dist != "fixed":
                payload["step_delay_dist"] = self.sy.step_delay_dist
                payload["step_delay_sigma"] = self.sy.step_delay_sigma
        return make_spec("symbols", fam, index, "symbols", payload)

    def blind_ceiling(self, tasks: Sequence[P.TaskSpec] | None = None) -> dict[str, float]:
        """`shared.symbols.blind_ceiling` of `tasks` (default: the whole bank, as picked
        uniformly): the best reward and pass rate of a policy that ignores the symbols.
        Noise-level tasks count at chance."""
        return symbols_blind_ceiling(self.tasks if tasks is None else tasks)


def symbols_blind_ceiling(tasks: Sequence[P.TaskSpec]) -> dict[str, float]:
    """Blind ceiling of symbols tasks, each family's tree solved on its own (a blind policy
    may know the family: its turn count and reward mode differ) and averaged by task count."""
    by_family: dict[str, list[P.TaskSpec]] = {}
    for t in tasks:
        by_family.setdefault(t.family, []).append(t)
    reward = pass_ = 0.0
    for fam_tasks in by_family.values():
        p = fam_tasks[0].payload
        k, lv = int(p["n_choices"]), int(p["level"])
        if lv == S.NOISE_LEVEL:
            turns = int(p["n_turns"])
            c = {"reward": 1.0 / k, "pass": (1.0 / k) ** turns}
        else:
            seqs = [
                S.answers(
                    lv,
                    [int(x) for x in str(t.payload["symbols"]).split()],
                    k,
                    int(t.payload["map_seed"]),
                )
                for t in fam_tasks
            ]
            c = S.blind_ceiling(seqs, k)
        if str(p.get("reward", "turn")) == "pass":
            c["reward"] = c["pass"]  # the episode's reward is its pass
        reward += c["reward"] * len(fam_tasks)
        pass_ += c["pass"] * len(fam_tasks)
    n = max(1, len(tasks))
    return {"reward": reward / n, "pass": pass_ / n}


class MixedBank(ProceduralBank):
    """Several banks as one: uniform over all their tasks (so their sizes set the mixture)."""

    def __init__(self, banks: list[ProceduralBank], seed: int) -> None:
        if not banks:
            raise ConfigError("env.mixed: name at least one bank")
        self.banks = banks
        super().__init__([p for b in banks for p in b.parts], seed)

    def heldout(self, n: int) -> dict[str, list[P.TaskSpec]]:
        out: dict[str, list[P.TaskSpec]] = {}
        for b in self.banks:  # each bank's own held-out rule (datasets: their eval split)
            for family, tasks in b.heldout(n).items():
                out.setdefault(family, []).extend(tasks)
        return out

"""The files `headrace eval` passes between its two role processes, as JSON.

`python -m broker.heldout` writes a `HeldoutSet` (the bank's held-out tasks, which training
never leases, per family, with the family's blind ceiling where the bank knows one);
`python -m actor.evaluate` plays it and writes one `shared.passk.TaskResult` per task. The
CLI, which imports neither role, scores the results (shared/passk.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import msgspec

from shared.passk import TaskResult
from shared.protocol import TaskSpec

T = TypeVar("T")


class HeldoutFamily(msgspec.Struct, forbid_unknown_fields=True):
    tasks: list[TaskSpec]
    # the best "pass" rate and mean "reward" of a policy that ignores what it is shown
    # (None: the bank knows no such bound for this family)
    blind_ceiling: dict[str, float] | None = None


class HeldoutSet(msgspec.Struct, forbid_unknown_fields=True):
    env: str  # [env] name
    n: int  # tasks asked for per family (a family may hold fewer)
    families: dict[str, HeldoutFamily]

    def tasks(self) -> list[TaskSpec]:
        return [t for f in self.families.values() for t in f.tasks]


def write(path: str | Path, obj: object) -> None:
    Path(path).write_bytes(msgspec.json.encode(obj))


def read(path: str | Path, kind: type[T]) -> T:
    return msgspec.json.decode(Path(path).read_bytes(), type=kind)


def read_results(path: str | Path) -> list[TaskResult]:
    return read(path, list[TaskResult])

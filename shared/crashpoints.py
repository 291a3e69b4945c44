"""Named crash points, for chaos runs that aim their kills at the risky windows.

`HEADRACE_CRASHPOINTS="store.after_sync:0.05,broker.after_claim:0.1"` makes a process SIGKILL
itself when it reaches a named point, with that probability per pass (seeded by
`HEADRACE_CRASHPOINTS_SEED` and the pid, so a run is reproducible). Unset - always, outside
chaos runs - `crash(name)` is one dict lookup that finds nothing. With
`HEADRACE_CRASHPOINTS_LOG=path` each such kill first appends the point's name to that file
(so a chaos run can tell which windows it hit).

Points:
  store.after_sync      bodies appended and fdatasync'd, their rows not yet committed
  store.compact         a segment's live rows copied and synced, their rows not yet moved
  broker.after_claim    a batch's sampling committed, the batch not yet sent to the learner
"""

from __future__ import annotations

import os
import random
import signal

POINTS = ("store.after_sync", "store.compact", "broker.after_claim")


def _parse(spec: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, prob = part.partition(":")
        if name not in POINTS:
            raise ValueError(f"HEADRACE_CRASHPOINTS: unknown crash point {name!r} (know {POINTS})")
        out[name] = float(prob or 1.0)
    return out


_armed = _parse(os.environ.get("HEADRACE_CRASHPOINTS", ""))
_rng = random.Random(f"{os.environ.get('HEADRACE_CRASHPOINTS_SEED', '0')}-{os.getpid()}")
_log = os.environ.get("HEADRACE_CRASHPOINTS_LOG", "")


def crash(name: str) -> None:
    """SIGKILL this process here if `name` is armed (and the draw says so)."""
    p = _armed.get(name)
    if p is not None and _rng.random() < p:
        if _log:
            with open(_log, "a") as f:
                f.write(f"{name}\n")
        os.kill(os.getpid(), signal.SIGKILL)

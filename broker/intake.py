"""What the broker takes from a batch of trajectory frames, decided without sockets or store.

Each frame is validated as strictly as a full decode, but through a zero-copy view
(`protocol.decode_view`); the frame slice itself is what the store keeps and what the learner
will get. Then `shared.validation` checks what decoding cannot. A bad frame is refused on its
own, named in the Ack so its sender drops it; the good ones of the same batch go on.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from broker import metrics as M
from broker.store import Incoming
from shared import protocol as P
from shared.metrics import REJECTED_FRAMES
from shared.validation import Invalid, Limits, check_trajectory

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Screened:
    items: list[Incoming] = field(default_factory=list)  # to store, then ack
    rejected: list[P.Rejected] = field(default_factory=list)  # named in the Ack: dropped
    errors: list[P.Error] = field(default_factory=list)  # undecodable, not even a traj_id


def screen(
    frames: list[msgspec.Raw],
    limits: Limits,
    sender: str,
    lease_check: Callable[[P.TrajectoryView], Invalid | None] | None = None,
) -> Screened:
    """`lease_check`: what the broker's lease book says of a trajectory's lease."""
    out = Screened()
    for frame in frames:
        try:
            view = P.decode_view(frame)
        except P.ProtocolError as e:
            REJECTED_FRAMES.labels(reason=e.reason).inc()
            tid = P.peek_traj_id(frame)
            if not tid:  # nothing to name: the sender can only be told
                out.errors.append(P.Error(reason=e.reason, detail=e.detail[:500]))
                continue
            bad: Invalid | None = Invalid(e.reason, f"{tid}: {e.detail}")
        else:
            tid, bad = view.traj_id, check_trajectory(view, limits)
            if bad is None and lease_check is not None:
                bad = lease_check(view)
        if bad is None:
            out.items.append(Incoming(view, frame))
            continue
        M.TRAJ_REJECTED.labels(reason=bad.reason).inc()
        log.warning("refused a trajectory from %s (%s): %s", sender, bad.reason, bad.detail)
        out.rejected.append(P.Rejected(traj_id=tid, reason=bad.reason, detail=bad.detail[:300]))
    M.TRAJ_RECEIVED.inc(len(out.items))
    return out


def model_vocab_size(path: str) -> int:
    """`vocab_size` from the model's config.json, or 0 (token ids then only checked >= 0)
    when this machine has no copy of the model."""
    try:
        return int(json.loads((Path(path) / "config.json").read_text())["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0

"""Trajectories leave the actor through the outbox and stay in it until the broker acks them.

The broker acks only after its store has committed, so a trajectory is in exactly one of two
places: here, or durably in the broker. Unacked batches are resent after `resend_s` (a broker
restart or a dropped connection looks the same from here); the broker deduplicates by traj_id.
A trajectory the broker refuses (an invalid one: `shared.validation`) is dropped, counted and
logged with the broker's reason, while the others of its batch are acked.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict

from prometheus_client import Counter, Gauge

from shared import protocol as P
from shared.transport import Client

log = logging.getLogger(__name__)

OUTBOX_SIZE = Gauge("headrace_actor_outbox_size", "Trajectories waiting for the broker's ack")
RESENT = Counter("headrace_actor_outbox_resent_total", "Trajectories sent again for lack of ack")
ACKED = Counter("headrace_actor_trajectories_acked_total", "Trajectories acked by the broker")
REJECTED = Counter(
    "headrace_actor_trajectories_rejected_total",
    "Trajectories the broker refused for good (dropped here, not resent), by reason",
    ["reason"],
)


class Outbox:
    def __init__(
        self, client: Client, batch: int = 16, flush_s: float = 0.2, resend_s: float = 10.0
    ) -> None:
        self.client = client
        self.batch = batch
        self.flush_s = flush_s
        self.resend_s = resend_s
        self._pending: OrderedDict[str, P.Trajectory] = OrderedDict()
        self._sent_at: dict[str, float] = {}
        self._wake = asyncio.Event()
        self._empty = asyncio.Event()
        self._empty.set()
        client.on(P.Ack, self._on_ack)

    def __len__(self) -> int:
        return len(self._pending)

    def put(self, traj: P.Trajectory) -> None:
        self._pending[traj.traj_id] = traj
        self._empty.clear()
        OUTBOX_SIZE.set(len(self._pending))
        if len(self._pending) - len(self._sent_at) >= self.batch:
            self._wake.set()

    def _on_ack(self, ack: P.Ack) -> None:
        for tid in ack.traj_ids:
            if self._pending.pop(tid, None) is not None:
                ACKED.inc()
            self._sent_at.pop(tid, None)
        for r in ack.rejected:  # invalid for good: resending would be refused forever
            if self._pending.pop(r.traj_id, None) is not None:
                REJECTED.labels(reason=r.reason).inc()
                log.warning(
                    "the broker refused trajectory %s (%s): %s", r.traj_id, r.reason, r.detail
                )
            self._sent_at.pop(r.traj_id, None)
        OUTBOX_SIZE.set(len(self._pending))
        if not self._pending:
            self._empty.set()

    async def drain(self, timeout: float) -> bool:
        """Wait until everything is acked (used at shutdown)."""
        self._wake.set()
        try:
            await asyncio.wait_for(self._empty.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.flush_s)
            except TimeoutError:
                pass
            self._wake.clear()
            await self._send_due()

    async def _send_due(self) -> None:
        now = time.monotonic()
        due = [
            t
            for tid, t in self._pending.items()
            if tid not in self._sent_at or now - self._sent_at[tid] > self.resend_s
        ]
        for i in range(0, len(due), self.batch):
            chunk = due[i : i + self.batch]
            for t in chunk:
                if t.traj_id in self._sent_at:
                    RESENT.inc()
                self._sent_at[t.traj_id] = now
            await self.client.send(P.TrajectoryBatch(items=chunk))

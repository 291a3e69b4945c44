"""The learner's side of the conversation with the broker: Hello and Welcome, heartbeats,
asking for batches, acknowledging what a step trained, feedback for the curator and replay.

A mixin of `learner.loop.Learner` (which owns the state it reads: step, version, cursor, the
acknowledged batches); kept apart so the loop reads as train, publish, checkpoint.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import defaultdict
from collections.abc import Awaitable
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from learner import metrics as M
from learner.trained_log import MAX_REMEMBERED, TrainedLog
from shared import protocol as P
from shared.config import Config, LearnerConfig
from shared.handshake import ConfigMismatch, check_welcome, group_size
from shared.transport import Client, PeerUnreachable

if TYPE_CHECKING:
    from learner.loop import Options

log = logging.getLogger("learner")
T = TypeVar("T")

FENCED = 5  # exit code of a learner the broker replaced by another


class LearnerExit(Exception):
    """A condition that ends the run with a one-line reason and a non-zero exit code."""

    def __init__(self, reason: str, code: int = 2) -> None:
        super().__init__(reason)
        self.code = code


class BrokerSide:
    """What `Learner` says to the broker and how it waits for the answers."""

    cfg: Config
    opts: Options
    lc: LearnerConfig
    stop: asyncio.Event
    client: Client | None
    peer_id: str
    run_id: str
    weights_endpoint: str
    group_size: int
    step: int
    version: int
    cursor: int
    acked: dict[int, int]
    trained_log: TrainedLog | None

    async def _until_stop(self, aw: Awaitable[T]) -> T | None:
        """Await `aw` unless a stop is requested first (then cancel it and return None)."""
        task = asyncio.ensure_future(aw)
        stopper = asyncio.ensure_future(self.stop.wait())
        done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            stopper.cancel()
            return task.result()
        task.cancel()
        return None

    async def _connect(self) -> bool:
        assert self.client is not None
        timeout = self.lc.connect_timeout_s
        per_try = min(5.0, timeout)
        hello = P.Hello(
            role="learner",
            peer_id=self.peer_id,
            protocol_version=P.PROTOCOL_VERSION,
            capabilities={
                "weights_endpoint": self.weights_endpoint,
                "policy_version": str(self.version),
                "step": str(self.step),
                "cursor": str(self.cursor),
            },
        )
        retries = max(0, math.ceil(timeout / per_try) - 1)
        deadline = time.monotonic() + timeout
        while True:
            try:
                welcome = await self._until_stop(
                    self.client.request(hello, P.Welcome, timeout=per_try, retries=retries)
                )
                break
            except PeerUnreachable:
                raise LearnerExit(
                    f"broker {self.opts.broker} did not answer Hello within {timeout:.0f}s", 3
                ) from None
            except P.ProtocolError as e:
                # Another learner is active. A restarted learner may come back before the
                # broker has given up on its dead predecessor: wait for that, within the
                # connect budget; a second learner next to a live one is refused for good.
                if e.reason != "forbidden" or time.monotonic() > deadline:
                    msg = f"broker {self.opts.broker} refused the learner: {e}"
                    raise LearnerExit(msg, 3) from None
                log.warning("%s; waiting for it to go silent", e.detail)
                await self._until_stop(asyncio.sleep(1.0))
                if self.stop.is_set():
                    return False
        if welcome is None:
            return False
        try:
            check_welcome(self.cfg, welcome, "learner", self.opts.broker)
        except ConfigMismatch as e:
            raise LearnerExit(str(e), 2) from None
        # Batches are asked for in the broker's groups, whatever this config says.
        self.group_size = group_size(self.cfg, welcome)
        log.info("connected to %s (run %s)", self.opts.broker, welcome.run_id)
        self.run_id = welcome.run_id
        if welcome.policy_version > self.version:
            # Versions must stay monotonic for actors even if our checkpoint is older.
            log.warning(
                "broker knows policy v%d > our v%d; continuing from v%d",
                welcome.policy_version,
                self.version,
                welcome.policy_version,
            )
            self.version = welcome.policy_version
        return True

    async def _heartbeats(self) -> None:
        """Tell the broker this learner is alive while a long step trains (it refuses a
        second learner only while the active one is heard from)."""
        assert self.client is not None
        every = max(0.5, self.cfg.broker.heartbeat_timeout_s / 4)
        while True:
            stats = {"step": float(self.step), "policy_version": float(self.version)}
            try:
                await asyncio.wait_for(
                    self.client.send(P.Heartbeat(peer_id=self.peer_id, stats=stats)), every
                )
            except TimeoutError:
                pass  # the broker is away; the request path notices and decides
            await asyncio.sleep(every)

    async def _next_batch(self) -> P.Batch | None:
        assert self.client is not None
        n = self.lc.batch_groups * self.group_size  # SampleRequest counts trajectories
        t0 = time.monotonic()
        lost_since: float | None = None
        last_log = t0
        while not self.stop.is_set():
            req = P.SampleRequest(batch_size=n, policy_version=self.version)
            try:
                reply = await self._until_stop(
                    self.client.request(
                        req,
                        (P.Batch, P.NotReady),
                        timeout=min(10.0, self.lc.connect_timeout_s),
                        retries=0,
                    )
                )
            except PeerUnreachable:
                now = time.monotonic()
                lost_since = lost_since or now
                if now - lost_since > self.lc.connect_timeout_s:
                    raise LearnerExit(
                        f"broker {self.opts.broker} silent for {now - lost_since:.0f}s", 4
                    ) from None
                log.warning("broker not answering SampleRequest; retrying")
                continue
            except P.ProtocolError as e:
                if e.reason == "forbidden":  # another learner took over: this one must stop
                    msg = f"broker {self.opts.broker} refused this learner: {e}"
                    raise LearnerExit(msg, FENCED) from None
                log.warning("broker refused SampleRequest: %s", e)
                reply = P.NotReady(replay_size=-1, retry_after_s=1.0)
            if reply is None:
                break
            lost_since = None
            if isinstance(reply, P.Batch) and reply.batch_id in self.acked:
                await self.client.send(P.BatchTrained(reply.batch_id, self.acked[reply.batch_id]))
                continue  # trained already: ask again
            if isinstance(reply, P.Batch) and reply.items:
                M.WAIT_SECONDS.inc(time.monotonic() - t0)
                return reply
            delay = reply.retry_after_s if isinstance(reply, P.NotReady) else 0.5
            if time.monotonic() - last_log > 10:
                last_log = time.monotonic()
                size = reply.replay_size if isinstance(reply, P.NotReady) else 0
                log.info("waiting for a batch of %d (replay size %d)", n, size)
            await self._until_stop(asyncio.sleep(max(0.05, delay)))
        M.WAIT_SECONDS.inc(time.monotonic() - t0)
        return None

    async def _feedback(self, batch: P.Batch, adv: np.ndarray) -> None:
        assert self.client is not None
        by_task: dict[str, list[int]] = defaultdict(list)
        for i, t in enumerate(batch.items):
            by_task[t.task_id].append(i)
        for task_id, idx in by_task.items():
            await self.client.send(
                P.TaskFeedback(
                    task_id=task_id,
                    mean_abs_advantage=float(np.abs(adv[idx]).mean()),
                    pass_rate=float(np.mean([batch.items[i].success for i in idx])),
                    policy_version=self.version,
                )
            )
        if batch.sample_ids and len(batch.sample_ids) == len(adv):
            # |A| is constant over a trajectory's tokens, so it is also its mean token |A|.
            await self.client.send(
                P.PriorityUpdate(sample_ids=list(batch.sample_ids), priorities=np.abs(adv).tolist())
            )

    async def _acknowledge(self, batch: P.Batch) -> None:
        """Log what this step trained and tell the broker (which otherwise hands it again)."""
        if self.trained_log is not None:
            self.trained_log.append(self.step, batch.batch_id, [t.traj_id for t in batch.items])
        if batch.batch_id:
            assert self.client is not None
            self.acked[batch.batch_id] = self.step
            if len(self.acked) > MAX_REMEMBERED:
                del self.acked[next(iter(self.acked))]
            await self.client.send(P.BatchTrained(batch.batch_id, self.step))

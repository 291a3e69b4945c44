"""Group commit: the batches that arrive within `interval_s` share one transaction (one fsync),
and each caller is answered only once that transaction has committed.

A failed commit (disk full, corruption) leaves nothing acked; it is logged once per failure
streak and flagged by `headrace_broker_store_failing`; the next commit tries again, so the
broker resumes by itself once space is freed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from broker.metrics import COMMIT_BATCHES, COMMIT_SECONDS, STORE_FAILING
from broker.store.records import Incoming, PutResult, StoreError

log = logging.getLogger(__name__)

Commit = Callable[[list[list[Incoming]]], Awaitable[list[PutResult]]]
# one entry per caller: its batches, answered together with one result per batch
Waiting = list[tuple[list[list[Incoming]], asyncio.Future[list[PutResult]]]]


class GroupCommit:
    FAILURE_LOG_EVERY_S = 30.0

    def __init__(self, commit: Commit, interval_s: float, on_stored: Callable[[int], None]) -> None:
        """`commit` stores the batches in one transaction (on the store thread) and returns
        one result per batch; `on_stored(n)` is told of the new trajectories of each
        successful commit before their callers are answered."""
        self._commit = commit
        self.interval_s = interval_s
        self._on_stored = on_stored
        self._pending: Waiting = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.closing = False
        self._last_commit = -1e9  # loop time the last group commit started
        self._failures = 0  # commits failed in a row (one log line per streak, then summaries)
        self._failure_logged = -1e9  # monotonic time of the last failure log line

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def close(self) -> None:
        """Commit what is queued, then stop; later puts are refused."""
        self.closing = True
        self._wake.set()
        if self._task is not None:
            await self._task

    async def put(self, items: list[Incoming]) -> PutResult:
        return (await self.put_many([items]))[0]

    async def put_many(self, batches: list[list[Incoming]]) -> list[PutResult]:
        """Several batches (e.g. every frame one wake-up of the broker drained) in the next
        commit, for one wait: one result per batch, as if each had been `put`."""
        if self.closing:
            raise StoreError("store is closing")
        fut: asyncio.Future[list[PutResult]] = asyncio.get_running_loop().create_future()
        self._pending.append((batches, fut))
        self._wake.set()
        return await fut

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            if not self._pending:
                if self.closing:
                    return
                self._wake.clear()
                continue
            # At most one commit starts per interval_s: after a quiet spell the first batch
            # commits at once (low ack latency); under load the batches that arrive within
            # the window share one transaction and one fsync.
            delay = self._last_commit + self.interval_s - loop.time()
            if delay > 0 and not self.closing:
                await asyncio.sleep(delay)
            batch, self._pending = self._pending, []
            self._wake.clear()
            self._last_commit = loop.time()
            await self._flush(batch)

    async def _flush(self, batch: Waiting) -> None:
        t0 = time.perf_counter()
        try:
            results = await self._commit([trajs for batches, _ in batch for trajs in batches])
        except StoreError as e:
            self._failed(e, sum(len(trajs) for batches, _ in batch for trajs in batches))
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(e)
            return
        except Exception as e:  # a bug must not leave callers waiting forever
            log.exception("group commit crashed")
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(StoreError(f"commit crashed: {e!r}"))
            return
        if self._failures:
            log.warning("store commits succeed again after %d failed commits", self._failures)
            self._failures = 0
            STORE_FAILING.set(0)
        COMMIT_SECONDS.observe(time.perf_counter() - t0)
        COMMIT_BATCHES.observe(len(results))
        self._on_stored(sum(len(r.new) for r in results))
        at = 0
        for batches, fut in batch:
            if not fut.done():
                fut.set_result(results[at : at + len(batches)])
            at += len(batches)

    def _failed(self, e: StoreError, n_trajs: int) -> None:
        """One clear line when commits start failing, then one summary every 30 s at most."""
        self._failures += 1
        STORE_FAILING.set(1)
        now = time.monotonic()
        if self._failures == 1 or now - self._failure_logged >= self.FAILURE_LOG_EVERY_S:
            self._failure_logged = now
            hint = {
                "full": "free disk space (or tighten [broker.retention]); commits resume then",
                "corrupt": "stop the broker and restore or move aside the database file",
            }.get(e.kind, "commits are retried")
            log.error(
                "store %s: commit of %d trajectories failed (%d failed in a row): %s;"
                " not acked, actors keep them and resend; %s",
                e.kind,
                n_trajs,
                self._failures,
                e,
                hint,
            )

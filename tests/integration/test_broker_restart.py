"""SIGKILL the broker mid-ingest with two actors pushing; restart it on the same data dir and port.

The actors are `tests.synthetic_actor` processes (real Outbox + Client, no vLLM). They reconnect
by themselves and their outboxes resend. Afterwards: every acked trajectory is stored, nothing is
stored twice, and the learner - sampling before and after the crash - never gets a trajectory
twice and gets every stored one. No fixed sleeps: every wait is on a condition.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from broker.store import DB_NAME
from shared import protocol as P
from shared.transport import Client, PeerUnreachable
from tests.helpers import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

REPO = Path(__file__).resolve().parents[2]
GROUP = 4


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(p for p in (e.get("PYTHONPATH"), str(REPO)) if p)
    return e


class Processes:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self.config = tmp / "broker.toml"
        # max_staleness = -1: no learner-paced backpressure, the actors push as fast as they can
        self.config.write_text(
            f"[broker]\ngroup_size = {GROUP}\ncommit_interval_s = 0.01\nmax_staleness = -1\n"
        )
        self.broker: subprocess.Popen[bytes] | None = None
        self.actors: list[subprocess.Popen[bytes]] = []
        self.starts = 0

    def start_broker(self) -> None:
        self.starts += 1
        argv = [sys.executable, "-m", "broker", "--config", str(self.config)]
        argv += ["--port", str(self.port), "--metrics-port", "0"]
        argv += ["--data-dir", str(self.tmp / "data")]
        log = open(self.tmp / f"broker-{self.starts}.log", "wb")  # noqa: SIM115
        self.broker = subprocess.Popen(
            argv, cwd=self.tmp, env=env(), stdout=log, stderr=subprocess.STDOUT
        )

    def start_actor(self, i: int) -> None:
        argv = [sys.executable, "-m", "tests.synthetic_actor", "--broker", self.endpoint]
        argv += ["--peer-id", f"actor-{i}", "--acked", str(self.acked_file(i))]
        argv += ["--n-tokens", "256", "--resend-s", "1.0"]
        log = open(self.tmp / f"actor-{i}.log", "wb")  # noqa: SIM115
        self.actors.append(
            subprocess.Popen(argv, cwd=REPO, env=env(), stdout=log, stderr=subprocess.STDOUT)
        )

    def acked_file(self, i: int) -> Path:
        return self.tmp / f"acked-{i}.txt"

    def acked(self) -> list[str]:
        out: list[str] = []
        for i in range(len(self.actors)):
            f = self.acked_file(i)
            if f.exists():
                out += [line for line in f.read_text().splitlines() if line]
        return out

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n" + p.read_text(errors="replace")[-3000:]
            for p in sorted(self.tmp.glob("*.log"))
        )

    def check_alive(self) -> None:
        assert self.broker is not None and self.broker.poll() is None, self.logs()
        for a in self.actors:
            assert a.poll() is None, self.logs()

    def kill_all(self) -> None:
        for p in [self.broker, *self.actors]:
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


async def until(cond: Callable[[], object], timeout: float, what: str, procs: Processes):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{procs.logs()}"
        await asyncio.sleep(0.05)


async def wait_ready(client: Client, procs: Processes, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        assert procs.broker is not None and procs.broker.poll() is None, procs.logs()
        try:
            return (await client.request(P.Status(), P.StatusReply, timeout=0.5, retries=0)).info
        except PeerUnreachable:
            assert time.monotonic() < deadline, "broker never answered\n" + procs.logs()


async def sample(learner: Client, n_batches: int | None, acked: dict[int, int]) -> list[str]:
    """Sample whole groups as a learner does: acknowledge each batch, and recognise one the
    broker hands again (it may have lost the acknowledgement in the crash) by its id.
    `None`: until NotReady persists (the replay table stays empty)."""
    got: list[str] = []
    not_ready = 0
    while n_batches is None or len(got) < n_batches * GROUP:
        req = P.SampleRequest(batch_size=GROUP)
        reply = await learner.request(req, (P.Batch, P.NotReady), timeout=20, retries=0)
        if isinstance(reply, P.Batch):
            repeat = reply.batch_id in acked
            step = acked.setdefault(reply.batch_id, len(acked) + 1)
            await learner.send(P.BatchTrained(batch_id=reply.batch_id, step=step))
            if repeat:
                continue  # trained already: acknowledged again, not trained twice
            assert len(reply.items) % GROUP == 0
            got += [t.traj_id for t in reply.items]
            not_ready = 0
        else:
            not_ready += 1
            if n_batches is None and not_ready >= 5 and reply.replay_size == 0:
                break
            await asyncio.sleep(reply.retry_after_s)
    return got


async def test_sigkill_mid_ingest_loses_nothing_and_never_resamples(tmp_path: Path) -> None:
    t0 = time.monotonic()
    procs = Processes(tmp_path)
    procs.start_broker()
    try:
        await scenario(procs)
    finally:
        procs.kill_all()
    elapsed = time.monotonic() - t0

    with sqlite3.connect(tmp_path / "data" / DB_NAME) as conn:
        rows = conn.execute("SELECT traj_id, times_sampled FROM trajectories").fetchall()
    stored = Counter(r[0] for r in rows)
    acked = set(procs.acked())
    assert acked, procs.logs()
    assert not acked - set(stored), f"acked but not stored: {sorted(acked - set(stored))[:5]}"
    assert max(stored.values()) == 1  # no traj_id stored twice
    # everything was drained, so every stored trajectory was acked, and handed out once
    assert set(stored) == acked
    assert all(r[1] == 1 for r in rows)
    assert elapsed < 60, f"took {elapsed:.0f}s"


async def scenario(procs: Processes) -> None:
    learner = Client(procs.endpoint, "learner-1")
    learner.start()
    try:
        await wait_ready(learner, procs)
        for i in range(2):
            procs.start_actor(i)
        await until(lambda: len(procs.acked()) >= 48, 30, "first acks", procs)
        procs.check_alive()
        acked: dict[int, int] = {}  # batch id -> step
        before = await sample(
            learner, n_batches=4, acked=acked
        )  # the learner consumes while actors push

        # Crash while the actors are pushing: acks are still arriving right now.
        n = len(procs.acked())
        await until(lambda: len(procs.acked()) >= n + 16, 20, "acks still flowing", procs)
        assert procs.broker is not None
        procs.broker.send_signal(signal.SIGKILL)
        procs.broker.wait(10)
        acked_at_crash = set(procs.acked())
        procs.start_broker()  # same data dir, same port
        info = await wait_ready(learner, procs)
        assert info["stored_trajectories"] >= len(acked_at_crash)

        # The actors reconnect by themselves and go on; their outboxes resend the unacked.
        await until(
            lambda: len(set(procs.acked()) - acked_at_crash) >= 32, 30, "acks after restart", procs
        )
        procs.check_alive()
        for a in procs.actors:
            a.send_signal(signal.SIGTERM)  # stop taking leases, drain the outbox, exit
        for a in procs.actors:
            assert a.wait(30) == 0, procs.logs()

        after = await sample(learner, n_batches=None, acked=acked)
        handed_out = before + after
        assert len(handed_out) == len(set(handed_out)), "a trajectory was handed out twice"
        assert not set(before) & set(after)
        assert set(handed_out) == set(procs.acked())
        info = (await learner.request(P.Status(), P.StatusReply)).info
        assert info["replay_size"] == 0 and info["pending_groups"] == 0
        assert info["stored_trajectories"] == len(set(procs.acked()))
    finally:
        learner.close()
    assert procs.broker is not None
    procs.broker.send_signal(signal.SIGTERM)
    assert procs.broker.wait(15) == 0, procs.logs()

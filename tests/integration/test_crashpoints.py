"""Kills aimed at the risky windows (shared/crashpoints.py): the broker SIGKILLs itself between
syncing trajectory bodies and committing their rows, and between committing a batch's
sampling and sending it. Restarted on the same data dir: nothing acked is lost, nothing
unacked is kept, and the batch that never reached the learner is handed to it (same id)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from broker.store import DB_NAME
from shared import protocol as P
from shared.transport import Client, PeerUnreachable
from tests.broker_helpers import make_traj
from tests.helpers import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

REPO = Path(__file__).resolve().parents[2]


class BrokerProc:
    def __init__(self, tmp: Path) -> None:
        self.tmp, self.port = tmp, free_port()
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self.config = tmp / "broker.toml"
        self.config.write_text("[broker]\ngroup_size = 2\nmax_staleness = -1\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, crashpoints: str = "") -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO), HEADRACE_CRASHPOINTS=crashpoints)
        argv = [sys.executable, "-m", "broker", "--config", str(self.config)]
        argv += ["--port", str(self.port), "--metrics-port", "0", "--data-dir", str(self.tmp / "d")]
        log = open(self.tmp / "broker.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(argv, cwd=self.tmp, env=env, stdout=log, stderr=log)

    def died_of_sigkill(self) -> bool:
        assert self.proc is not None
        return self.proc.wait(30) == -9

    def rows(self) -> list[tuple[str, int]]:
        with sqlite3.connect(self.tmp / "d" / DB_NAME) as conn:
            return conn.execute("SELECT traj_id, times_sampled FROM trajectories").fetchall()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


async def ready(c: Client) -> None:
    for _ in range(150):
        try:
            await c.request(P.Status(), P.StatusReply, timeout=0.2, retries=0)
            return
        except PeerUnreachable:
            pass
    raise AssertionError("broker never answered")


def group(gid: str) -> P.TrajectoryBatch:
    return P.TrajectoryBatch(items=[make_traj(gid, i) for i in range(2)])


async def test_kill_between_sync_and_commit_keeps_nothing_unacked(tmp_path: Path) -> None:
    broker = BrokerProc(tmp_path)

    actor = Client(broker.endpoint, "actor-1")
    actor.start()
    try:
        broker.start("store.after_sync:1")
        await ready(actor)
        with pytest.raises(PeerUnreachable):  # never acked: the broker died first
            await actor.request(group("g1"), P.Ack, timeout=3, retries=0)
        assert broker.died_of_sigkill()
        broker.start()  # same data dir, no crash point
        await ready(actor)
        assert broker.rows() == []  # synced bytes without a committed row are dropped
        ack = await actor.request(group("g1"), P.Ack, timeout=5)  # the outbox resends
        assert ack.traj_ids == ["g1-0", "g1-1"] and ack.duplicates == 0
    finally:
        actor.close()
        broker.stop()
    assert sorted(broker.rows()) == [("g1-0", 0), ("g1-1", 0)]


async def test_kill_between_claim_and_send_hands_the_batch_out_after_restart(
    tmp_path: Path,
) -> None:
    broker = BrokerProc(tmp_path)

    actor, learner = Client(broker.endpoint, "actor-1"), Client(broker.endpoint, "learner")
    actor.start()
    learner.start()
    try:
        broker.start("broker.after_claim:1")
        await ready(actor)
        await actor.request(group("g1"), P.Ack, timeout=5)
        with pytest.raises(PeerUnreachable):  # claimed and recorded, never sent
            await learner.request(P.SampleRequest(batch_size=2), P.Batch, timeout=3, retries=0)
        assert broker.died_of_sigkill()
        assert broker.rows() == [("g1-0", 1), ("g1-1", 1)]  # counted as sampled
        broker.start()
        await ready(learner)
        batch = await learner.request(P.SampleRequest(batch_size=2), P.Batch, timeout=5)
        assert batch.batch_id == 1 and [t.traj_id for t in batch.items] == ["g1-0", "g1-1"]
        await learner.send(P.BatchTrained(batch_id=batch.batch_id, step=1))
        reply = await learner.request(P.SampleRequest(batch_size=2), P.NotReady, timeout=5)
        assert reply.replay_size == 0  # handed out once, now acknowledged
    finally:
        actor.close()
        learner.close()
        broker.stop()

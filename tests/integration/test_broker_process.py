"""`python -m broker` as a real process on loopback: protocol, bad frames, SIGKILL + restart."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared import protocol as P
from shared.transport import Client, PeerUnreachable
from tests.broker_helpers import make_traj, take
from tests.helpers import free_port, scrape

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
GROUP = 4
MAX_FRAME = 1_000_000


class BrokerProcess:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.port, self.metrics_port = free_port(), free_port()
        self.config = tmp / "broker.toml"
        self.config.write_text(
            f"[broker]\ngroup_size = {GROUP}\nmax_frame_bytes = {MAX_FRAME}\n"
            "commit_interval_s = 0.01\n"
        )
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def args(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "broker",
            "--config",
            str(self.config),
            "--port",
            str(self.port),
            "--metrics-port",
            str(self.metrics_port),
            "--data-dir",
            str(self.tmp / "data"),
        ]

    def start(self) -> None:
        self.starts += 1
        log = open(self.tmp / f"broker-{self.starts}.log", "wb")  # noqa: SIM115
        # cwd outside the repo: the broker must not depend on it (PYTHONPATH finds the code).
        self.proc = subprocess.Popen(
            self.args(), cwd=self.tmp, env=env(), stdout=log, stderr=subprocess.STDOUT
        )

    def log(self) -> str:
        return "".join(p.read_text() for p in sorted(self.tmp.glob("broker-*.log")))

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=15)

    def metric(self, name: str, **labels: str) -> float:
        """One sample from the broker's /metrics over HTTP (0 if not exported yet)."""
        key = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}")
        return scrape(self.metrics_port).get(key if labels else name, 0.0)


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(p for p in (e.get("PYTHONPATH"), str(REPO)) if p)
    return e


async def wait_ready(broker: BrokerProcess, client: Client, timeout: float = 20) -> dict:
    """Status answers once the broker is up (and after a restart, the same client reconnects)."""
    deadline = time.monotonic() + timeout
    while True:
        assert broker.proc is not None and broker.proc.poll() is None, broker.log()
        try:
            return (await client.request(P.Status(), P.StatusReply, timeout=0.3, retries=0)).info
        except PeerUnreachable:
            assert time.monotonic() < deadline, "broker never answered:\n" + broker.log()


@pytest.fixture
def broker(tmp_path: Path):
    b = BrokerProcess(tmp_path)
    b.start()
    yield b
    if b.proc is not None and b.proc.poll() is None:
        b.proc.kill()
        b.proc.wait()


async def test_broker_process_end_to_end_with_crash_restart(broker: BrokerProcess) -> None:
    actor = Client(broker.endpoint, "actor-1")
    learner = Client(broker.endpoint, "learner-1")
    for c in (actor, learner):
        c.start()
    try:
        await wait_ready(broker, actor)
        hello = P.Hello(role="actor", peer_id="actor-1", protocol_version=P.PROTOCOL_VERSION)
        welcome = await actor.request(hello, P.Welcome)
        assert welcome.run_id and welcome.policy_version == 0
        grant = await actor.request(P.TaskRequest(n=2), P.TaskGrant)
        assert len(grant.leases) == 2 and all(x.group_size == GROUP for x in grant.leases)
        gids = [x.lease_id for x in grant.leases]
        for x in grant.leases:
            items = [make_traj(x.lease_id, i, task_id=x.task.task_id) for i in range(GROUP)]
            batch = P.TrajectoryBatch(items=items)
            ack = await actor.request(batch, P.Ack)
            assert ack.traj_ids == [t.traj_id for t in batch.items] and ack.duplicates == 0
        assert broker.metric("headrace_broker_trajectories_acked_total") == 2 * GROUP

        first = await take(learner, P.SampleRequest(batch_size=GROUP), P.Batch)
        assert [t.group_id for t in first.items] == [gids[0]] * GROUP

        # bad frames: each answered with an Error and counted, the broker keeps serving
        await actor.sock.send(b"\xc1 definitely not msgpack")
        assert (await actor.recv(P.Error, timeout=5)).reason == "malformed"
        await actor.sock.send(b"\x00" * (MAX_FRAME + 1000))
        assert (await actor.recv(P.Error, timeout=5)).reason == "oversize"
        old = P.Hello(role="actor", peer_id="actor-1", protocol_version=999)
        with pytest.raises(P.ProtocolError, match="version_mismatch"):
            await actor.request(old, P.Welcome)
        for reason in ("malformed", "oversize", "version_mismatch"):
            assert broker.metric("headrace_rejected_frames_total", reason=reason) == 1
        info = (await actor.request(P.Status(), P.StatusReply)).info
        assert info["stored_trajectories"] == 2 * GROUP and info["replay_size"] == GROUP

        # crash after acks; restart on the same data dir: same clients, same routing ids
        broker.stop(signal.SIGKILL)
        broker.start()
        info = await wait_ready(broker, learner)
        assert info["stored_trajectories"] == 2 * GROUP  # every acked trajectory survived
        assert info["replay_size"] == GROUP and info["run_id"] == welcome.run_id
        again = P.TrajectoryBatch(items=[make_traj(gids[0], i) for i in range(GROUP)])
        assert (await actor.request(again, P.Ack)).duplicates == GROUP  # outbox resend
        second = await take(learner, P.SampleRequest(batch_size=GROUP), P.Batch)
        assert [t.group_id for t in second.items] == [gids[1]] * GROUP
        assert not set(second.sample_ids) & set(first.sample_ids)
        reply = await take(learner, P.SampleRequest(batch_size=1), (P.Batch, P.NotReady))
        assert isinstance(reply, P.NotReady)  # nothing is handed out twice
    finally:
        actor.close()
        learner.close()
    assert broker.stop(signal.SIGTERM) == 0  # graceful stop flushes and exits 0


def test_bad_config_and_port_in_use_exit_codes(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[broker]\ngroup_size = 'eight'\n")
    run = [sys.executable, "-m", "broker", "--data-dir", str(tmp_path / "d")]
    r = subprocess.run(
        [*run, "--config", str(bad)], cwd=tmp_path, env=env(), capture_output=True, timeout=30
    )
    assert r.returncode == 2 and b"group_size" in r.stderr
    assert len(r.stderr.decode().strip().splitlines()) == 1

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run(
            [*run, "--port", str(port), "--metrics-port", "0"],
            cwd=tmp_path,
            env=env(),
            capture_output=True,
            timeout=30,
        )
    assert r.returncode == 1 and b"in use" in r.stderr, r.stderr

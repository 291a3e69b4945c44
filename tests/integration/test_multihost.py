"""Multi-host on one machine: every role in its own network namespace, joined by a bridge.

Network: a hub namespace holds a bridge; broker, learner and two actors each live in their own
namespace with one veth into the hub and a 10.x address (nothing touches the root namespace).
The broker binds 0.0.0.0, the learner announces its namespace address as `weights_host`, the
actors dial the broker's 10.x address. One actor is a real vLLM actor (it must load the
learner's policy over that network); the other is a `tests.synthetic_actor` (real outbox and
client, no vLLM: two engines on two shared cores would not fit the time budget), whose link
is cut (`ip link set DEV down` on its hub side) for a few seconds and restored. Then the stub
must be acked again, drain and exit 0, and the trajectories acked to it must be exactly its
rows in the store (nothing lost, nothing stored that it was not acked).

Needs root and iproute2; skipped otherwise. Namespaces are deleted in a finally.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import free_port, wait_for, write_config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
OUTAGE_S = 6.0
FETCH = (
    "import sys, urllib.request; "
    "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())"
)


def ip(*args: str) -> None:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {res.stderr.strip()}")


class Net:
    """A hub namespace with a bridge, and one namespace per node with a veth into it."""

    def __init__(self) -> None:
        tag = os.getpid() % 100000
        self.prefix = f"hr{tag}"
        self.subnet = f"10.{213 + tag % 40}.{tag % 250}"
        self.hub = f"{self.prefix}hub"
        self.nodes: dict[str, str] = {}  # node -> namespace
        self.created: list[str] = []

    def up(self) -> None:
        ip("netns", "add", self.hub)
        self.created.append(self.hub)
        ip("-n", self.hub, "link", "set", "lo", "up")
        ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        ip("-n", self.hub, "link", "set", "br0", "up")

    def add(self, node: str, host: int) -> str:
        ns = f"{self.prefix}{node}"
        ip("netns", "add", ns)
        self.created.append(ns)
        ip("-n", ns, "link", "set", "lo", "up")
        dev = self.hub_dev(node)
        ip("-n", self.hub, "link", "add", dev, "type", "veth", "peer", "name", "eth0", "netns", ns)
        ip("-n", self.hub, "link", "set", self.hub_dev(node), "master", "br0")
        ip("-n", self.hub, "link", "set", self.hub_dev(node), "up")
        ip("-n", ns, "addr", "add", f"{self.addr(host)}/24", "dev", "eth0")
        ip("-n", ns, "link", "set", "eth0", "up")
        self.nodes[node] = ns
        return ns

    def addr(self, host: int) -> str:
        return f"{self.subnet}.{host}"

    @staticmethod
    def hub_dev(node: str) -> str:
        return f"p-{node}"[:15]

    def link(self, node: str, up: bool) -> None:
        ip("-n", self.hub, "link", "set", self.hub_dev(node), "up" if up else "down")

    def close(self) -> None:
        for ns in reversed(self.created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


class NsProc:
    """`ip netns exec NS python -m ...`, its own process group, output to a log file."""

    def __init__(self, ns: str, name: str, argv: list[str], log_dir: Path) -> None:
        self.name = name
        self.log = log_dir / f"{name}.log"
        env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        out: IO[bytes] = open(self.log, "ab")  # noqa: SIM115
        self.p = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", *argv],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def alive(self) -> bool:
        return self.p.poll() is None

    def tail(self, n: int = 25) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def kill(self) -> None:
        try:
            os.killpg(self.p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.p.wait(30)


def ns_metric(ns: str, port: int, name: str) -> float:
    """Sum of the samples of `name` on a /metrics page only reachable inside `ns`."""
    text = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            ns,
            sys.executable,
            "-c",
            FETCH,
            f"http://127.0.0.1:{port}/metrics",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    return sum(
        s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == name
    )


def acked(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line] if path.exists() else []


@pytest.fixture
def net() -> Net:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (`ip`) is not installed")
    n = Net()
    try:
        n.up()
    except (RuntimeError, OSError) as e:
        n.close()
        pytest.skip(f"cannot create network namespaces here: {e}")
    try:
        yield n
    finally:
        n.close()


def test_roles_in_separate_namespaces_survive_a_cut_link(
    net: Net, tmp_path: Path, tiny_model: Path
) -> None:
    ns = {
        node: net.add(node, host)
        for node, host in (("broker", 1), ("learner", 2), ("real", 3), ("stub", 4))
    }
    port, weights_port = free_port(), free_port()
    mports = {"broker": free_port(), "learner": free_port(), "real": free_port()}
    broker_ep = f"tcp://{net.addr(1)}:{port}"
    cfg = write_config(
        tmp_path / "run.toml",
        tiny_model,
        broker={"port": port, "bind_host": "0.0.0.0", "heartbeat_timeout_s": 10.0},
        actor={"max_concurrent_episodes": 8},
        learner={
            "steps": 100000,
            "weights_host": net.addr(2),
            "weights_port": weights_port,
            "connect_timeout_s": 120.0,
        },
        security={"insecure": True},  # plaintext across the namespaces' bridge
    )
    c = ["--config", str(cfg)]
    stub_acked = tmp_path / "acked-stub.txt"
    procs: dict[str, NsProc] = {}

    def logs() -> str:
        return "\n".join(f"--- {p.name}\n{p.tail()}" for p in procs.values())

    def wait(cond, timeout: float, what: str) -> None:  # noqa: ANN001
        try:
            wait_for(cond, timeout, what, interval=0.5)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{logs()}") from None

    try:
        procs["broker"] = NsProc(
            ns["broker"],
            "broker",
            ["broker", *c, "--data-dir", str(tmp_path / "data")]
            + ["--metrics-port", str(mports["broker"])],
            tmp_path,
        )
        procs["learner"] = NsProc(
            ns["learner"],
            "learner",
            ["learner", *c, "--broker", broker_ep, "--metrics-port", str(mports["learner"])]
            + ["--checkpoint-dir", str(tmp_path / "ckpt"), "--no-progress"],
            tmp_path,
        )
        procs["real"] = NsProc(
            ns["real"],
            "real",
            ["actor", *c, "--broker", broker_ep, "--actor-id", "real"]
            + ["--metrics-port", str(mports["real"])],
            tmp_path,
        )
        procs["stub"] = NsProc(
            ns["stub"],
            "stub",
            ["tests.synthetic_actor", "--broker", broker_ep, "--peer-id", "stub"]
            + ["--acked", str(stub_acked), "--group-delay-s", "0.5", "--n-tokens", "48"]
            + ["--n-turns", "1", "--leases", "1", "--max-outbox", "32"],
            tmp_path,
        )
        # The real actor fetched the learner's weights from the learner's namespace address.
        wait(
            lambda: ns_metric(ns["real"], mports["real"], "headrace_actor_policy_version") >= 1,
            420,
            "the vLLM actor to load a policy from the learner's namespace",
        )
        wait(lambda: len(acked(stub_acked)) >= 16, 60, "the stub actor's first acks")

        net.link("stub", up=False)
        n_cut = len(acked(stub_acked))
        t_cut = time.monotonic()
        steps_at_cut = ns_metric(ns["learner"], mports["learner"], "headrace_learner_steps_total")
        time.sleep(OUTAGE_S)  # the outage itself: nothing to wait on
        net.link("stub", up=True)
        n_restored = len(acked(stub_acked))
        # the cut was real: at most an ack already on its way got through
        assert n_restored - n_cut <= 8, (n_cut, n_restored)
        for name, p in procs.items():
            assert p.alive(), f"{name} died during the outage\n{logs()}"
        wait(
            lambda: len(acked(stub_acked)) >= n_restored + 16,
            90,
            "the stub actor's acks after its link came back",
        )
        reconnect_s = time.monotonic() - t_cut - OUTAGE_S
        wait(
            lambda: (
                ns_metric(ns["learner"], mports["learner"], "headrace_learner_steps_total")
                > steps_at_cut
            ),
            120,
            "the learner to keep training",
        )
        real_acked = ns_metric(
            ns["real"], mports["real"], "headrace_actor_trajectories_acked_total"
        )
        assert real_acked > 0, logs()

        procs["stub"].p.send_signal(signal.SIGTERM)  # stop, drain the outbox, exit 0
        assert procs["stub"].p.wait(60) == 0, logs()
        procs["real"].kill()
        procs["learner"].kill()
        procs["broker"].p.send_signal(signal.SIGTERM)
        assert procs["broker"].p.wait(30) == 0, logs()
    finally:
        for p in procs.values():
            p.kill()

    uri = f"file:{tmp_path / 'data' / 'broker.db'}?mode=ro"
    with sqlite3.connect(uri, uri=True) as conn:
        rows = conn.execute("SELECT traj_id, actor_id FROM trajectories").fetchall()
    stored_stub = {t for t, a in rows if a == "stub"}
    got = acked(stub_acked)
    # (ids acked more than once are resends the broker deduplicated: it acks those again)
    assert set(got) == stored_stub, (
        f"acked not stored: {len(set(got) - stored_stub)}, "
        f"stored not acked: {len(stored_stub - set(got))}"
    )
    assert sum(a == "real" for _, a in rows) >= real_acked
    print(
        f"stub: {len(set(got))} acked = stored ({len(got) - len(set(got))} re-acked resends);"
        f" acked again {reconnect_s:.1f}s after the link came back"
    )

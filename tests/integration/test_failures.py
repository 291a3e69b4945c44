"""Every role fails loudly: a bad config or an unreachable peer is a non-zero exit, one line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import free_port, write_config

pytestmark = pytest.mark.integration


def run_role(*argv: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *argv], capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize("role", ["broker", "learner", "actor"])
def test_bad_config_is_a_one_line_error(role, tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[broker]\nport = 'five'\n")
    res = run_role(role, "--config", str(cfg))
    assert res.returncode == 2
    last = res.stderr.strip().splitlines()[-1]
    assert "config" in last.lower() and "port" in last


@pytest.mark.parametrize("role", ["learner", "actor"])
def test_unreachable_broker_exits_nonzero_after_the_retry_budget(role, tmp_path, tiny_model):
    cfg = write_config(
        tmp_path / "c.toml",
        tiny_model,
        actor={"connect_timeout_s": 3.0},
        learner={"connect_timeout_s": 3.0, "weights_port": free_port()},
    )
    res = run_role(
        role,
        "--config",
        str(cfg),
        "--broker",
        f"tcp://127.0.0.1:{free_port()}",
        "--metrics-port",
        "0",
    )
    assert res.returncode not in (0, None)
    assert "unreachable" in res.stderr.lower() or "did not answer" in res.stderr.lower()


def test_a_stalled_broker_leaves_no_orphan_lease_and_a_dead_engine_hands_its_leases_on(
    tmp_path, tiny_model
) -> None:
    """One vLLM actor (its engine takes most of the time, so both checks share it):

    1. SIGSTOP the broker for 12 s: the actor's task requests time out and are sent again;
       after SIGCONT the broker answers every one of them. A grant that comes after its
       request timed out must still be used - dropped, its leases would be renewed by the
       actor's heartbeats for ever and never worked on. So the broker's lease count for the
       actor must come back to what its episode slots hold (8 slots / groups of 4 = 2) and
       the one group `[actor] leases_ahead` holds ahead of them.
    2. SIGKILL the actor's vLLM EngineCore child: the actor exits non-zero within 30 s, the
       broker expires its leases (`headrace_broker_leases_expired_total`) and grants those
       tasks again - here to a stub actor that joins afterwards (`leases_requeued` back to 0,
       and the stub's trajectories acked)."""
    import json
    import os
    import signal
    import time
    from pathlib import Path

    import psutil

    from tests.helpers import Proc, metric, wait_for

    port, bport, aport = free_port(), free_port(), free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    cfg = write_config(
        tmp_path / "c.toml",
        tiny_model,
        # no learner: the broker grants leases up to replay_capacity; long lease deadlines, so
        # only the silence of the dead actor's heartbeats can expire its leases
        broker={"port": port, "heartbeat_timeout_s": 3.0, "lease_deadline_s": 600.0},
        actor={"max_concurrent_episodes": 8, "heartbeat_s": 1.0},
    )
    broker = Proc(
        "broker",
        ["broker", "--config", str(cfg), "--data-dir", str(tmp_path / "d")]
        + ["--metrics-port", str(bport)],
        tmp_path,
    )
    actor = Proc(
        "actor",
        ["actor", "--config", str(cfg), "--broker", endpoint, "--metrics-port", str(aport)]
        + ["--actor-id", "victim"],
        tmp_path,
    )
    procs = [broker, actor]

    def status() -> dict:
        out = subprocess.run(
            [sys.executable, "-m", "shared.cli", "status", "--broker", endpoint, "--json"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        return json.loads(out)

    try:
        wait_for(
            lambda: metric(aport, "headrace_actor_trajectories_acked_total") >= 8,
            420,
            "the vLLM actor's first acked trajectories",
        )
        broker.p.send_signal(signal.SIGSTOP)
        time.sleep(12.0)  # the stall itself: the actor's requests time out meanwhile
        broker.p.send_signal(signal.SIGCONT)

        def victim_leases() -> int:
            info = status()
            (victim,) = [a for a in info["actors"] if a["id"] == "victim"]
            return int(victim["leases"]) + int(info["leases_requeued"])

        wait_for(lambda: victim_leases() <= 2 + 1, 60, "no orphaned leases after the stall")
        assert metric(aport, "headrace_actor_trajectories_acked_total") > 8

        engines = [
            c
            for c in psutil.Process(actor.p.pid).children(recursive=True)
            if "EngineCore" in " ".join([c.name(), *c.cmdline()])
        ]
        assert engines, [c.name() for c in psutil.Process(actor.p.pid).children(recursive=True)]
        expired_before = metric(bport, "headrace_broker_leases_expired_total")
        t0 = time.monotonic()
        for c in engines:
            os.kill(c.pid, signal.SIGKILL)
        wait_for(lambda: actor.p.poll() is not None, 30, "the actor to exit after its engine died")
        assert actor.p.returncode not in (0, None), actor.tail()
        assert time.monotonic() - t0 < 30
        assert "engine" in actor.tail(5).lower(), actor.tail()

        # its leases expire with its heartbeats and wait, requeued, for another actor
        wait_for(lambda: status()["leases_active"] == 0, 30, "the dead actor's leases to expire")
        expired = metric(bport, "headrace_broker_leases_expired_total") - expired_before
        info = status()
        assert expired >= 1, info
        assert info["leases_requeued"] == expired, info

        stub = Proc(
            "stub",
            ["tests.synthetic_actor", "--broker", endpoint, "--peer-id", "stub"]
            + ["--acked", str(tmp_path / "acked.txt"), "--n-tokens", "32", "--leases", "1"],
            tmp_path,
            env={"PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        )
        procs.append(stub)
        wait_for(lambda: status()["leases_requeued"] == 0, 60, "the requeued tasks re-granted")
        wait_for(
            lambda: len((tmp_path / "acked.txt").read_text().split()) >= 4 * expired,
            60,
            "the stub's trajectories for them to be acked",
        )
    finally:
        for p in procs:
            p.stop(timeout=10)


def test_a_hung_episode_loses_its_lease_and_its_task_is_granted_again(tmp_path, tiny_model):
    """Every tool call of this run hangs for 60 s; the actor's heartbeats keep coming. At
    [broker] episode_timeout_s the broker expires the leases anyway and queues their tasks
    again, and the actor stops the hung episodes (`headrace_actor_episodes_timed_out_total`),
    so its slots ask for those tasks again."""
    from tests.helpers import Proc, metric, wait_for

    port, bport, aport = free_port(), free_port(), free_port()
    cfg = write_config(
        tmp_path / "c.toml",
        tiny_model,
        **{"env.symbols": {"step_delay_s": 60.0}},
        broker={"port": port, "episode_timeout_s": 5.0, "lease_deadline_s": 600.0},
        actor={"max_concurrent_episodes": 4, "heartbeat_s": 1.0},
    )
    broker = Proc(
        "broker",
        ["broker", "--config", str(cfg), "--data-dir", str(tmp_path / "d")]
        + ["--metrics-port", str(bport)],
        tmp_path,
    )
    actor = Proc(
        "actor",
        ["actor", "--config", str(cfg), "--broker", f"tcp://127.0.0.1:{port}"]
        + ["--metrics-port", str(aport)],
        tmp_path,
    )
    try:
        wait_for(
            lambda: metric(aport, "headrace_actor_episodes_timed_out_total") >= 4,
            420,
            "the hung episodes to be stopped at the lease timeout",
        )
        wait_for(  # the broker's reaper ticks every second: it may come just after the actor
            lambda: metric(bport, "headrace_broker_leases_expired_total") >= 1,
            10,
            "the broker to expire the hung lease",
        )
        # the slots came back and asked again: the expired tasks went out under new leases
        wait_for(
            lambda: metric(bport, "headrace_broker_leases_granted_total") >= 2,
            30,
            "the expired task to be granted again",
        )
        assert metric(aport, "headrace_actor_trajectories_acked_total") == 0
    finally:
        for p in (actor, broker):
            p.stop(timeout=10)

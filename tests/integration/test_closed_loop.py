"""The closed loop on real processes: broker, learner and vLLM actors on loopback.

One run is shared by the tests of this module (each vLLM actor takes ~20 s to start); the
tests are ordered and each waits on conditions, never on fixed sleeps.
"""

from __future__ import annotations

import json
import os
import signal

import psutil
import pytest

from tests.helpers import Proc, free_port, metric, scrape, wait_for, write_config

pytestmark = pytest.mark.integration

DESIGN_METRICS = {
    "broker": [
        "headrace_build_info",
        "headrace_broker_trajectories_received_total",
        "headrace_broker_trajectories_acked_total",
        "headrace_broker_replay_size",
        "headrace_broker_leases_active",
        "headrace_rejected_frames_total",
    ],
    "actor": [
        "headrace_build_info",
        "headrace_actor_episodes_total",
        "headrace_actor_tokens_generated_total",
        "headrace_actor_policy_version",
        "headrace_weights_sync_seconds_count",
    ],
    "learner": [
        "headrace_build_info",
        "headrace_learner_steps_total",
        "headrace_learner_policy_version",
        "headrace_learner_reward_mean",
        "headrace_learner_step_seconds_count",
        "headrace_trajectory_staleness_count",
    ],
}


class Run:
    def __init__(self, tmp, model):
        self.tmp = tmp
        self.port = free_port()
        self.ports = {"broker": free_port(), "learner": free_port(), "actor": free_port()}
        self.broker_ep = f"tcp://127.0.0.1:{self.port}"
        self.config = write_config(
            tmp / "run.toml",
            model,
            broker={"port": self.port, "metrics_port": self.ports["broker"]},
            learner={"steps": 100000, "weights_port": free_port(), "lr": 1e-3},
        )
        self.procs: list[Proc] = []

    def start(self, role: str, name: str, *extra: str, nice: int = 0) -> Proc:
        argv = [role, "--config", str(self.config), *extra]
        p = Proc(name, argv, self.tmp, nice=nice)
        self.procs.append(p)
        return p

    def actor(self, name: str, metrics_port: int, nice: int = 0) -> Proc:
        return self.start(
            "actor",
            name,
            "--broker",
            self.broker_ep,
            "--metrics-port",
            str(metrics_port),
            "--actor-id",
            name,
            nice=nice,
        )


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model):
    tmp = tmp_path_factory.mktemp("loop")
    r = Run(tmp, tiny_model)
    # any order: the actor and learner first, the broker last
    r.actor_proc = r.actor("actor1", r.ports["actor"])
    r.learner = r.start(
        "learner",
        "learner",
        "--broker",
        r.broker_ep,
        "--metrics-port",
        str(r.ports["learner"]),
        "--checkpoint-dir",
        str(tmp / "ckpt"),
    )
    r.broker = r.start("broker", "broker", "--data-dir", str(tmp / "broker"))
    yield r
    for p in r.procs:
        p.stop(timeout=20)


def learner_steps(run) -> float:
    return metric(run.ports["learner"], "headrace_learner_steps_total")


def test_trajectories_flow_and_are_acked(run):
    wait_for(
        lambda: metric(run.ports["broker"], "headrace_broker_trajectories_acked_total") >= 8,
        180,
        "acked trajectories",
    )
    wait_for(
        lambda: metric(run.ports["actor"], "headrace_actor_trajectories_acked_total") >= 8,
        30,
        "the actor to see acks",
    )
    wait_for(lambda: learner_steps(run) >= 2, 120, "two learner steps")


def test_actor_policy_version_follows_the_learner(run):
    def caught_up():
        lv = metric(run.ports["learner"], "headrace_learner_policy_version")
        av = metric(run.ports["actor"], "headrace_actor_policy_version")
        return lv >= 2 and av >= lv - 1

    wait_for(caught_up, 120, "the actor to load the learner's latest policy")


def test_every_role_exports_the_design_metrics(run):
    for role, names in DESIGN_METRICS.items():
        samples = scrape(run.ports[role])
        for name in names:
            assert any(k == name or k.startswith(name + "{") for k in samples), (role, name)
    assert metric(run.ports["actor"], "headrace_actor_tokens_generated_total") > 0


def test_status_reports_the_run(run):
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "shared.cli", "status", "--broker", run.broker_ep, "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    info = json.loads(out)
    assert info["stored_trajectories"] >= 8
    assert any("actor1" in json.dumps(a) for a in info["actors"])


def test_a_late_second_actor_joins_with_current_weights(run):
    for p in (run.actor_proc, run.learner, run.broker):
        p.renice(10)  # let the newcomer's engine start while the run keeps going
    port = free_port()
    run.actor2 = run.actor("actor2", port)
    version_at_join = metric(run.ports["learner"], "headrace_learner_policy_version")
    wait_for(
        lambda: metric(port, "headrace_actor_policy_version") >= version_at_join,
        180,
        "the late actor to load the current policy",
    )
    wait_for(
        lambda: metric(port, "headrace_actor_trajectories_acked_total") >= 4,
        120,
        "the late actor's trajectories to be acked",
    )


def test_sigkilled_actor_restarts_rejoins_and_the_run_goes_on(run):
    run.actor_proc.kill9()
    steps = learner_steps(run)
    # the other actor keeps the learner going
    wait_for(lambda: learner_steps(run) >= steps + 2, 180, "learner progress after a kill -9")
    run.actor2.renice(10)
    run.actor_proc = run.actor("actor1", run.ports["actor"])
    version = metric(run.ports["learner"], "headrace_learner_policy_version")
    wait_for(
        lambda: metric(run.ports["actor"], "headrace_actor_policy_version") >= version,
        180,
        "the restarted actor to get the current weights",
    )
    wait_for(
        lambda: metric(run.ports["actor"], "headrace_actor_trajectories_acked_total") >= 4,
        120,
        "the restarted actor to contribute",
    )


def test_a_dead_engine_makes_the_actor_exit_nonzero(run):
    proc = run.actor2.p
    children = psutil.Process(proc.pid).children(recursive=True)
    assert children, "vLLM's engine runs in a child process"
    for c in children:
        os.kill(c.pid, signal.SIGKILL)
    wait_for(lambda: proc.poll() is not None, 30, "the actor to exit after its engine died")
    assert proc.returncode not in (0, None)
    assert "engine" in run.actor2.tail(5).lower()

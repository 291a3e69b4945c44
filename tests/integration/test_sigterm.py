"""SIGTERM stops every role cleanly and exits 0 (what systemd, SLURM and Kubernetes send).

One live run (broker + learner + one vLLM actor on the tiny model); the roles are stopped one
by one, each by SIGTERM to its main process only (as systemd's KillMode=mixed does):

- the actor (stopped while episodes are running) stops taking leases, lets its episodes
  finish, waits until the broker has acked its outbox and exits 0: every trajectory it
  finished is in the broker's store;
- the learner finishes its step (or its wait for a batch), checkpoints and exits 0;
- the broker finishes its commit, closes the store and exits 0; started again on the same data
  dir it has every trajectory it had acked.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import Proc, free_port, metric, wait_for, write_config

pytestmark = pytest.mark.integration


class Run:
    def __init__(self, tmp: Path, model: Path) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.ports = {"broker": free_port(), "learner": free_port(), "actor": free_port()}
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self.data_dir = tmp / "broker"
        self.ckpt_dir = tmp / "ckpt"
        self.config = write_config(
            tmp / "run.toml",
            model,
            broker={"port": self.port, "metrics_port": self.ports["broker"]},
            learner={"steps": 100000, "weights_port": free_port(), "checkpoint_every": 1000},
        )
        self.procs: list[Proc] = []

    def start(self, role: str, *extra: str, name: str | None = None) -> Proc:
        argv = [role, "--config", str(self.config), *extra]
        p = Proc(name or role, argv, self.tmp)
        self.procs.append(p)
        return p

    def start_broker(self, name: str = "broker") -> Proc:
        return self.start("broker", "--data-dir", str(self.data_dir), name=name)

    def status(self) -> dict:
        out = subprocess.run(
            [sys.executable, "-m", "shared.cli", "status", "--broker", self.endpoint, "--json"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        return json.loads(out)


def sigterm(proc: Proc, timeout: float) -> int:
    """SIGTERM to the role's main process; its exit code (fails after `timeout`)."""
    proc.p.send_signal(signal.SIGTERM)
    try:
        return proc.p.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"{proc.name} still running {timeout:.0f}s after SIGTERM:\n{proc.tail()}"
        ) from None


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model):
    r = Run(tmp_path_factory.mktemp("sigterm"), tiny_model)
    r.broker = r.start_broker()
    r.learner = r.start(
        "learner",
        "--broker",
        r.endpoint,
        "--metrics-port",
        str(r.ports["learner"]),
        "--checkpoint-dir",
        str(r.ckpt_dir),
        "--no-progress",
    )
    r.actor = r.start(
        "actor",
        "--broker",
        r.endpoint,
        "--metrics-port",
        str(r.ports["actor"]),
        "--actor-id",
        "actor1",
    )
    yield r
    for p in r.procs:
        p.stop(timeout=20)


def test_actor_drains_its_outbox_and_exits_0(run):
    wait_for(
        lambda: metric(run.ports["learner"], "headrace_learner_steps_total") >= 2,
        240,
        "two learner steps",
    )
    wait_for(
        lambda: metric(run.ports["actor"], "headrace_actor_trajectories_acked_total") >= 8,
        120,
        "the actor's trajectories to be acked",
    )
    # SIGTERM while episodes are running (the learner keeps the rate limiter open)
    wait_for(
        lambda: metric(run.ports["actor"], "headrace_actor_episodes_running") > 0,
        60,
        "episodes in flight",
        interval=0.05,
    )
    # ... and generating: their requests are in the engine (the gauge reads the engine's own
    # count of requests submitted and not finished)
    wait_for(
        lambda: metric(run.ports["actor"], "headrace_actor_requests_generating") > 0,
        60,
        "requests in the engine",
        interval=0.05,
    )
    assert sigterm(run.actor, 90) == 0, run.actor.tail()
    log = run.actor.log.read_text()
    assert "stopped: 0 trajectories left unacked" in log, run.actor.tail()
    # Every trajectory the actor finished was acked, i.e. is in the broker's store.
    finished = re.search(r"stopped: .*?(\d+) episodes finished", log)
    assert finished, run.actor.tail()
    info = run.status()
    assert info["stored_trajectories"] == int(finished.group(1))
    acked = metric(run.ports["broker"], "headrace_broker_trajectories_acked_total")
    received = metric(run.ports["broker"], "headrace_broker_trajectories_received_total")
    assert acked == received >= int(finished.group(1))


def test_learner_finishes_its_step_checkpoints_and_exits_0(run):
    assert metric(run.ports["learner"], "headrace_learner_steps_total") >= 2
    assert sigterm(run.learner, 120) == 0, run.learner.tail()
    log = run.learner.log.read_text()
    stopped = re.search(r"stop requested at step (\d+)", log)
    assert stopped, run.learner.tail()
    step = int(stopped.group(1))
    assert step >= 2
    # checkpoint_every is 1000: this checkpoint is the one SIGTERM wrote
    ckpts = sorted(run.ckpt_dir.glob("step_*/state.json"))
    assert ckpts, "no checkpoint written on SIGTERM"
    assert json.loads(ckpts[-1].read_text())["step"] == step


def test_broker_flushes_its_store_and_exits_0(run):
    stored = run.status()["stored_trajectories"]
    assert stored > 0
    assert sigterm(run.broker, 30) == 0, run.broker.tail()
    assert "stopped" in run.broker.tail(5)
    # The same data dir, a new process: every acked trajectory is there.
    run.broker = run.start_broker(name="broker-again")
    info = wait_for(run.status, 60, "the restarted broker to answer")
    assert info["stored_trajectories"] == stored
    assert sigterm(run.broker, 30) == 0, run.broker.tail()


def test_headrace_run_stops_every_role_on_sigterm(tmp_path, tiny_model):
    """The launcher, SIGTERMed mid-run, stops learner, actor and broker in order and exits
    0; no process it started (the vLLM engine process included) is left running."""
    import psutil

    metrics = free_port()
    config = write_config(
        tmp_path / "run.toml",
        tiny_model,
        broker={"port": free_port(), "metrics_port": 0},
        actor={"metrics_port": 0},
        learner={"steps": 100000, "weights_port": free_port(), "metrics_port": metrics},
    )
    argv = ["shared.cli", "run", "--config", str(config), "--run-dir", str(tmp_path / "run")]
    launcher = Proc("launcher", argv, tmp_path)
    started: list[psutil.Process] = []
    try:
        wait_for(
            lambda: metric(metrics, "headrace_learner_steps_total") >= 1,
            300,
            "the first learner step",
        )
        started += psutil.Process(launcher.p.pid).children(recursive=True)
        names = " ".join(" ".join(p.cmdline()) for p in started)
        assert all(role in names for role in ("broker", "actor", "learner")), names
        assert sigterm(launcher, 150) == 0, launcher.tail()
        assert "stopped on SIGTERM (exit 0)" in launcher.log.read_text()
        _, alive = psutil.wait_procs(started, timeout=10)
        assert not alive, [" ".join(p.cmdline()) for p in alive]
    finally:
        launcher.stop(timeout=20)
        for p in started:  # the roles have sessions of their own: a failed test kills them here
            if p.is_running():
                p.kill()

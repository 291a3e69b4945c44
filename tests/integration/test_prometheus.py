"""A real Prometheus scrapes a live run through ops/prometheus and its alerts fire.

Prometheus (Debian package `prometheus`; installed here with apt-get when running as root and
missing) runs on loopback with a config made from ops/prometheus/prometheus.yml: the same jobs
and file_sd target files (pointing at this run's ports), a 1 s scrape and evaluation interval,
and ops/prometheus/alerts.yml with every window and `for:` rescaled from minutes to seconds.
Through its HTTP API the test checks that every role's series are there, then freezes the
actor (SIGSTOP): the actor is down, the broker gets no trajectories and the learner stalls;
then freezes the learner: the learner is down. Each of those alerts must fire.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import Proc, free_port, metric, wait_for, write_config

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PROM = REPO / "ops" / "prometheus"
JOBS = ("headrace-broker", "headrace-learner", "headrace-actor")


def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(
            ["apt-get", "install", "-y", "--no-install-recommends", "prometheus"],
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            capture_output=True,
            timeout=600,
        )
        path = shutil.which("prometheus")
    if path is None:
        pytest.skip(
            "prometheus is not installed and could not be installed "
            "(as root: apt-get install prometheus)"
        )
    return path


def rescale(text: str, window: str = "15s", for_: str = "3s") -> str:
    """alerts.yml with every [Nm]/[Nh] window and every `for: Nm` made seconds-long."""
    text = re.sub(r"\[\d+[mh]\]", f"[{window}]", text)
    return re.sub(r"(\n\s+for:) \d+m", rf"\1 {for_}", text)


def write_prometheus_config(dest: Path, ports: dict[str, int]) -> Path:
    cfg = yaml.safe_load((PROM / "prometheus.yml").read_text())
    cfg["global"] = {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"}
    cfg.pop("alerting", None)
    (dest / "alerts.yml").write_text(rescale((PROM / "alerts.yml").read_text()))
    files = {"headrace-broker": "broker", "headrace-learner": "learner", "headrace-actor": "actor"}
    for job in cfg["scrape_configs"]:
        for sd in job["file_sd_configs"]:
            sd["refresh_interval"] = "1s"
        role = files.get(job["job_name"])
        targets = [{"targets": [f"127.0.0.1:{ports[role]}"]}] if role else []
        for pattern in (f for sd in job["file_sd_configs"] for f in sd["files"]):
            path = dest / pattern.replace("*", "")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(yaml.safe_dump(targets))
    (dest / "prometheus.yml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return dest / "prometheus.yml"


class Prometheus:
    def __init__(self, binary: str, config: Path, tmp: Path) -> None:
        self.port = free_port()
        self.log = tmp / "prometheus.log"
        self.p = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=open(self.log, "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        body = json.loads(urllib.request.urlopen(url, timeout=5).read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return self.api("query", query=expr)["result"]

    def firing(self) -> set[str]:
        return {
            a["labels"]["alertname"] for a in self.api("alerts")["alerts"] if a["state"] == "firing"
        }

    def stop(self) -> None:
        self.p.terminate()
        try:
            self.p.wait(20)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait(10)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model):
    binary = prometheus_binary()
    tmp = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    ports = {"broker": free_port(), "learner": free_port(), "actor": free_port()}
    endpoint = f"tcp://127.0.0.1:{port}"
    config = write_config(
        tmp / "run.toml",
        tiny_model,
        broker={"port": port, "metrics_port": ports["broker"]},
        learner={"steps": 100000, "weights_port": free_port(), "checkpoint_every": 1000},
    )
    prom_dir = tmp / "prom"
    prom_dir.mkdir()
    prom = Prometheus(binary, write_prometheus_config(prom_dir, ports), tmp)
    procs = {
        "broker": Proc(
            "broker", ["broker", "--config", str(config), "--data-dir", str(tmp / "b")], tmp
        ),
        "learner": Proc(
            "learner",
            ["learner", "--config", str(config), "--broker", endpoint, "--no-progress"]
            + ["--metrics-port", str(ports["learner"]), "--checkpoint-dir", str(tmp / "ckpt")],
            tmp,
        ),
        "actor": Proc(
            "actor",
            ["actor", "--config", str(config), "--broker", endpoint]
            + ["--metrics-port", str(ports["actor"]), "--actor-id", "actor1"],
            tmp,
        ),
    }
    yield prom, procs, ports
    for p in procs.values():
        try:
            os.killpg(p.p.pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
        p.stop(timeout=20)
    prom.stop()


def test_every_role_is_scraped(run):
    prom, procs, ports = run
    wait_for(
        lambda: metric(ports["learner"], "headrace_learner_steps_total") >= 2,
        240,
        "two learner steps",
    )

    def all_up() -> bool:
        up = {r["metric"]["job"]: float(r["value"][1]) for r in prom.query("up")}
        return all(up.get(job) == 1.0 for job in JOBS)

    wait_for(all_up, 30, "up == 1 for every job")
    for job, expr in {
        "headrace-broker": "headrace_broker_trajectories_acked_total > 0",
        "headrace-learner": "headrace_learner_steps_total > 0",
        "headrace-actor": "headrace_actor_tokens_generated_total > 0",
    }.items():
        result = wait_for(lambda e=expr: prom.query(e), 30, expr)
        assert result[0]["metric"]["job"] == job
        assert result[0]["metric"]["host"] == "127.0.0.1"  # relabelled from the address
    for name in ("headrace_build_info", "headrace_rejected_frames_total"):
        jobs = {r["metric"]["job"] for r in prom.query(name)}
        assert {"headrace-broker"} <= jobs, name
    # While the run makes progress nothing about it fires.
    wait_for(
        lambda: not prom.firing() & {"HeadraceLearnerStalled", "HeadraceNoTrajectories"},
        60,
        "no stall alert while the run trains",
    )


def test_frozen_actor_fires_actor_down_no_trajectories_and_learner_stalled(run):
    prom, procs, _ = run
    os.killpg(procs["actor"].p.pid, signal.SIGSTOP)
    expected = {"HeadraceActorDown", "HeadraceNoTrajectories", "HeadraceLearnerStalled"}
    wait_for(lambda: expected <= prom.firing(), 90, f"{sorted(expected)} to fire")
    assert "HeadraceLearnerDown" not in prom.firing()  # stalled, not gone


def test_frozen_learner_fires_learner_down(run):
    prom, procs, _ = run
    os.killpg(procs["learner"].p.pid, signal.SIGSTOP)
    wait_for(lambda: "HeadraceLearnerDown" in prom.firing(), 60, "HeadraceLearnerDown to fire")
    assert "HeadraceBrokerDown" not in prom.firing()

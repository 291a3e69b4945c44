"""The files under ops/ stay well-formed and in step with the code.

Every PromQL expression of the Grafana dashboard and of the alert rules may only name metrics
the roles define (found by reading the `Counter` / `Gauge` / `Histogram` definitions in the
source), so renaming a metric without updating ops/ fails here. With `promtool` installed
(Debian package `prometheus`) the Prometheus config and rules are also checked by Prometheus'
own tool and the alert rules run against their unit tests (ops/prometheus/alerts_test.yml).
"""

from __future__ import annotations

import ast
import configparser
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from shared.config import Config

REPO = Path(__file__).resolve().parents[3]
OPS = REPO / "ops"
PROM = OPS / "prometheus"
JOBS = {"headrace-broker", "headrace-learner", "headrace-actor", "headrace-node"}

# Series that come from Prometheus itself, prometheus_client's default collectors and
# node_exporter, not from headrace's code.
EXTERNAL_METRICS = {
    "up",
    "scrape_duration_seconds",
    "process_resident_memory_bytes",
    "process_cpu_seconds_total",
    "node_filesystem_avail_bytes",
    "node_filesystem_size_bytes",
}
_KINDS = {
    "Counter": ("_total", "_created"),
    "Gauge": ("",),
    "Histogram": ("_bucket", "_count", "_sum", "_created"),
    "Summary": ("", "_count", "_sum", "_created"),
}
_PROMQL_WORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
}


def defined_metrics() -> set[str]:
    """Every series name the roles can export, from the metric definitions in the source."""
    names: set[str] = set()
    for pkg in ("shared", "broker", "learner", "actor"):
        for path in (REPO / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if not isinstance(node, ast.Call) or not node.args:
                    continue
                func = node.func
                kind = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
                first = node.args[0]
                if kind not in _KINDS or not isinstance(first, ast.Constant):
                    continue
                if not isinstance(first.value, str) or not first.value.startswith("headrace_"):
                    continue
                base = first.value
                if kind == "Counter":
                    base = base.removesuffix("_total")
                names.update(base + suffix for suffix in _KINDS[kind])
    return names


def promql_metrics(expr: str) -> set[str]:
    """The metric names an expression selects (a small scanner, not a PromQL parser)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    s = re.sub(r"\{[^}]*\}", "", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", "", s)  # range and subquery windows
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\$\{?\w+\}?", " ", s)  # Grafana variables
    names = set()
    for m in re.finditer(r"(?<![\w.$])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\()?", s):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in _PROMQL_WORDS or re.fullmatch(r"e\d*", word):
            continue
        names.add(word)
    return names


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def alert_rules() -> list[dict[str, Any]]:
    return [r for g in load_yaml(PROM / "alerts.yml")["groups"] for r in g["rules"]]


def dashboard_exprs(dash: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    return out


# ---------------------------------------------------------------- the scanners themselves


def test_metric_definitions_are_found():
    names = defined_metrics()
    assert "headrace_learner_steps_total" in names  # Counter("headrace_learner_steps")
    assert "headrace_broker_trajectories_acked_total" in names
    assert "headrace_broker_commit_seconds_bucket" in names
    assert "headrace_actor_engine_up" in names
    assert "headrace_weights_sync_seconds_count" in names
    assert "headrace_broker_trajectories_acked_total_total" not in names


def test_promql_scanner():
    expr = (
        'sum by (job, le) (rate(headrace_a_bucket{job="x", le!~"1|2"}[5m])) / '
        'on (instance) group_left scalar(max(headrace_b)) > 1e9 and up{job=~"$job"} == bool 0'
    )
    assert promql_metrics(expr) == {"headrace_a_bucket", "headrace_b", "up"}
    assert promql_metrics("histogram_quantile(0.9, x_bucket[$__rate_interval])") == {"x_bucket"}


# ---------------------------------------------------------------- Prometheus


def test_prometheus_config_uses_file_sd_for_every_role():
    cfg = load_yaml(PROM / "prometheus.yml")
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert set(jobs) == JOBS
    for job in jobs.values():
        assert "static_configs" not in job, job["job_name"]
        files = [f for sd in job["file_sd_configs"] for f in sd["files"]]
        matched = [p for f in files for p in PROM.glob(f)]
        assert matched, f"{job['job_name']}: no targets file matches {files}"
        for path in matched:
            groups = load_yaml(path)
            assert isinstance(groups, list), path
            for group in groups:
                assert all(re.fullmatch(r"[^:\s]+:\d+", t) for t in group["targets"]), path
    for rule_file in cfg["rule_files"]:
        assert (PROM / rule_file).is_file()


def test_alert_rules_are_complete():
    rules = alert_rules()
    names = {r["alert"] for r in rules}
    for needed in (
        "HeadraceLearnerStalled",
        "HeadraceLearnerDown",
        "HeadraceNoTrajectories",
        "HeadraceStalenessHigh",
        "HeadraceActorDown",
        "HeadraceActorEngineDown",
        "HeadraceRateLimiterBlocking",
        "HeadraceRejectedFramesRising",
        "HeadraceBrokerDiskNearlyFull",
        "HeadraceBrokerStoreWillFillDisk",
    ):
        assert needed in names
    assert len(names) == len(rules), "alert names must be unique"
    for r in rules:
        assert r["labels"]["severity"] in ("warning", "critical"), r["alert"]
        assert r["annotations"]["summary"], r["alert"]
        # windows and durations in minutes or hours only, so a test can rescale them
        assert re.fullmatch(r"\d+m", r.get("for", "0m")), r["alert"]
        assert all(re.fullmatch(r"\d+[mh]", w) for w in re.findall(r"\[([^\]]+)\]", r["expr"]))
        for job in re.findall(r'job="([^"]+)"', r["expr"]):
            assert job in JOBS, (r["alert"], job)


def test_alert_rules_name_only_defined_metrics():
    known = defined_metrics() | EXTERNAL_METRICS
    for r in alert_rules():
        unknown = promql_metrics(r["expr"]) - known
        assert not unknown, f"{r['alert']}: {sorted(unknown)}"


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not installed (Debian: apt-get install prometheus)")
    return path


@pytest.mark.parametrize(
    "args",
    [
        ["check", "config", "prometheus.yml"],
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts_test.yml"],
    ],
    ids=["check-config", "check-rules", "test-rules"],
)
def test_promtool(args: list[str]):
    r = subprocess.run([promtool(), *args], cwd=PROM, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


# ---------------------------------------------------------------- Grafana


def test_dashboard_is_valid_and_covers_the_run():
    dash = json.loads((OPS / "grafana" / "headrace.json").read_text())
    assert dash["title"] and dash["uid"]
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len(panels) >= 12
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels:
        assert p["targets"], p["title"]
        assert {"x", "y", "w", "h"} <= set(p["gridPos"]), p["title"]
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"]), p["title"]
    exprs = " ".join(e for _, e in dashboard_exprs(dash))
    for topic in (
        "headrace_broker_trajectories_acked_total",  # throughput
        "headrace_learner_reward_mean",  # reward
        "headrace_trajectory_staleness_bucket",  # staleness
        "headrace_weights_sync_seconds_bucket",  # weight-sync phases
        "headrace_broker_replay_size",  # replay
        "headrace_broker_curriculum_pick_share",  # curriculum
        "headrace_actor_engine_up",  # per-actor health
    ):
        assert topic in exprs, topic


def test_dashboard_names_only_defined_metrics():
    dash = json.loads((OPS / "grafana" / "headrace.json").read_text())
    known = defined_metrics() | EXTERNAL_METRICS
    for title, expr in dashboard_exprs(dash):
        unknown = promql_metrics(expr) - known
        assert not unknown, f"panel {title!r}: {sorted(unknown)}"
    for var in dash["templating"]["list"]:
        query = var.get("definition", "")
        for inner in re.findall(r"label_values\((.*),\s*\w+\)", query):
            assert promql_metrics(inner) <= known, var["name"]


# ---------------------------------------------------------------- systemd, SLURM, Kubernetes


def read_unit(path: Path) -> configparser.ConfigParser:
    # systemd allows a key more than once (EnvironmentFile=): strict=False keeps the last
    unit = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(path.read_text())
    return unit


@pytest.mark.parametrize(
    "name,role",
    [
        ("headrace-broker.service", "broker"),
        ("headrace-learner.service", "learner"),
        ("headrace-actor@.service", "actor"),
    ],
)
def test_systemd_units(name: str, role: str):
    unit = read_unit(OPS / "systemd" / name)
    assert set(unit.sections()) == {"Unit", "Service", "Install"}
    svc = unit["Service"]
    assert svc["ExecStart"].split()[0].endswith(f"headrace-{role}")
    assert "--config" in svc["ExecStart"]
    assert svc["KillSignal"] == "SIGTERM"
    assert svc["KillMode"] == "mixed"  # SIGTERM to the role only, not to vLLM's engine
    assert int(svc["TimeoutStopSec"]) >= 30
    assert svc["Restart"] == "on-failure"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    if role == "actor":
        assert "%i" in svc["ExecStart"]


def test_slurm_scripts():
    bash = shutil.which("bash")
    assert bash
    for name in ("head.sbatch", "actors.sbatch"):
        path = OPS / "slurm" / name
        text = path.read_text()
        assert text.startswith("#!/bin/bash\n")
        assert "#SBATCH --signal=B:TERM@" in text
        r = subprocess.run([bash, "-n", str(path)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    head = (OPS / "slurm" / "head.sbatch").read_text()
    assert "--array=" in head and "actors.sbatch" in head
    assert "weights_host" in head and 'bind_host = "0.0.0.0"' in head
    assert "insecure = true" in head  # or neither server would start


def test_kubernetes_manifest():
    docs = [d for d in yaml.safe_load_all((OPS / "k8s" / "headrace.yaml").read_text()) if d]
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for d in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(d), d
        by_kind.setdefault(d["kind"], []).append(d)
    (broker,) = by_kind["StatefulSet"]
    assert broker["spec"]["volumeClaimTemplates"], "the broker's store is on a PVC"
    deployments = {d["metadata"]["name"]: d for d in by_kind["Deployment"]}
    assert set(deployments) == {"headrace-learner", "headrace-actor"}
    services = {d["metadata"]["name"] for d in by_kind["Service"]}
    assert services == {"headrace-broker", "headrace-learner"}

    # The run's TOML is a valid config whose endpoints are the Services.
    (cm,) = by_kind["ConfigMap"]
    cfg = msgspec.convert(tomllib.loads(cm["data"]["run.toml"]), Config)
    assert cfg.broker.bind_host == "0.0.0.0"
    assert cfg.security.insecure or cfg.security.curve  # or neither server would start
    assert cfg.actor.broker == cfg.learner.broker == "tcp://headrace-broker.headrace.svc:5555"
    assert cfg.learner.weights_host.startswith("headrace-learner.")

    for workload in [broker, *deployments.values()]:
        tmpl = workload["spec"]["template"]
        assert (
            workload["spec"]["selector"]["matchLabels"].items()
            <= tmpl["metadata"]["labels"].items()
        )
        assert tmpl["spec"]["terminationGracePeriodSeconds"] >= 30
        (container,) = tmpl["spec"]["containers"]
        assert container["command"][0].startswith("headrace-")
        port = int(tmpl["metadata"]["annotations"]["prometheus.io/port"])
        assert port in [p["containerPort"] for p in container["ports"]]

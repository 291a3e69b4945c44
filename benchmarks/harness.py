"""What the learning benchmarks share: writing a run's config, one `headrace run` as a
subprocess, and the statistics of learning curves.

Each benchmark builds a config dict per run (free ports, seeds, its variant's keys), runs it
with `headrace_run` in a run directory of its own and reads the learner summary's per-step
entries back.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WINDOW = 10  # steps in a moving average and in a run's "final" window


# ------------------------------------------------------------------ config


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def dump_toml(data: dict[str, Any], prefix: str = "") -> str:
    """Minimal TOML writer: scalars and lists first, then each sub-table as `[a.b]`."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for k, v in data.items():
        if isinstance(v, dict):
            name = f"{prefix}{k}"
            lines += ["", f"[{name}]", dump_toml(v, name + ".")]
    return "\n".join(lines).strip("\n") + "\n"


# Below Linux's ephemeral range (ip_local_port_range, 32768-60999 by default): a port that
# bind(0) handed out is closed again before the process it is meant for binds it, and in
# between any outgoing connection (a ZMQ client, vLLM's own sockets) may be given it.
PORTS = range(20000, 32768)
_given: set[int] = set()


def free_port() -> int:
    """A loopback port nothing listens on now, outside the ephemeral range, and never one
    this process has handed out before (two roles of one test never get the same)."""
    rng = random.SystemRandom()  # which free port does not matter; never repeat across runs
    for _ in range(1000):
        port = rng.choice(PORTS)
        if port in _given:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _given.add(port)
        return port
    raise RuntimeError(f"no free loopback port in {PORTS.start}-{PORTS.stop - 1}")


def scrape(port: int) -> dict[str, float]:
    """Every sample a role's Prometheus endpoint on loopback `port` exports, by name."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


def loopback_run(cfg: dict[str, Any], seed: int, steps: int) -> dict[str, Any]:
    """`cfg` made runnable as one benchmark run: free ports, no metrics servers, and `seed`
    in every seed key (model, env, actor, learner, replay, curriculum); a tiny model is built
    per seed, in a folder of its own beside `[model] path`."""
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    cfg.setdefault("env", {})["seed"] = seed
    model = cfg.setdefault("model", {})
    if model.get("build_tiny_if_missing", True):  # the tiny model: one initialisation per seed
        model.update(seed=seed, path=f"{model.get('path', '.cache/models/tiny')}-seed{seed}")
    cfg.setdefault("broker", {}).update(port=port, metrics_port=0)
    cfg["broker"].setdefault("replay", {})["seed"] = seed
    if "curriculum" in cfg["broker"]:
        cfg["broker"]["curriculum"]["seed"] = seed
    cfg.setdefault("actor", {}).update(broker=endpoint, metrics_port=0, seed=seed)
    learner = cfg.setdefault("learner", {})
    learner.update(broker=endpoint, metrics_port=0, weights_port=0, steps=steps, seed=seed)
    return cfg


# ------------------------------------------------------------------ one run


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGINT lets `headrace run` stop its roles in order; SIGKILL its group if it hangs."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def headrace_run(
    cfg: dict[str, Any],
    run_dir: Path,
    timeout_s: float,
    started: Callable[[], None] | None = None,
    finished: Callable[[], None] | None = None,
) -> tuple[int, float, list[dict[str, Any]], Path]:
    """One `headrace run` of `cfg` in `run_dir` (config, summary, log and run data there).

    Returns (exit code, -1 when it timed out and was stopped; seconds; the learner summary's
    per-step entries; the log's path). `started` / `finished` run around the wait.
    """
    cfg_path = run_dir / "config.toml"
    cfg_path.write_text(dump_toml(cfg))
    summary = run_dir / "summary.json"
    log_path = run_dir / "run.log"
    argv = [sys.executable, "-m", "shared.cli", "run", "--config", str(cfg_path)]
    argv += ["--summary-json", str(summary), "--run-dir", str(run_dir / "run")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        if started is not None:
            started()
        try:
            code = proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            stop(proc)
            code = -1
        except BaseException:
            stop(proc)
            raise
        finally:
            if finished is not None:
                finished()
    seconds = time.monotonic() - t0
    entries: list[dict[str, Any]] = []
    if summary.exists():
        try:
            entries = json.loads(summary.read_text()).get("steps", [])
        except json.JSONDecodeError:
            entries = []
    return code, seconds, entries, log_path


def heldout_eval(run_dir: Path, n: int, samples: int = 4) -> dict[str, Any] | None:
    """`headrace eval` of a `headrace_run`'s final weights (`run/learner`, its newest
    checkpoint) on its env's held-out tasks, `n` per family x `samples`: the report's
    `pass_at_1` and `mean_reward`, or None (and why, on stderr) when it fails."""
    checkpoint, config = run_dir / "run" / "learner", run_dir / "config.toml"
    argv = [sys.executable, "-m", "shared.cli", "eval", "--checkpoint", str(checkpoint)]
    argv += ["--config", str(config), "--n", str(n), "--samples", str(samples), "--json"]
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        print(f"  held-out eval failed ({out.returncode}): {out.stderr[-800:]}", file=sys.stderr)
        return None
    report = json.loads(out.stdout)
    return {k: report[k] for k in ("pass_at_1", "mean_reward", "n", "episodes")}


def report_failure(error: str, run_dir: Path, log_path: Path, lines: int = 15) -> None:
    """Say on stderr that a benchmark run failed, where its logs are, and their last lines."""
    last = log_path.read_text(errors="replace").splitlines()[-lines:] if log_path.exists() else []
    print(f"  run failed ({error}); logs in {run_dir}", file=sys.stderr)
    print("\n".join("    " + line for line in last), file=sys.stderr)


# ------------------------------------------------------------------ statistics


def moving_average(xs: Sequence[float], window: int = WINDOW) -> list[float]:
    """Trailing means of full windows: out[i] is the mean of steps i+1 .. i+window (1-based)."""
    return [sum(xs[i : i + window]) / window for i in range(len(xs) - window + 1)]


def steps_to_threshold(xs: Sequence[float], threshold: float, window: int = WINDOW) -> int | None:
    """The first (1-based) step whose trailing `window`-step average reaches `threshold`."""
    for i, m in enumerate(moving_average(xs, window)):
        if m >= threshold:
            return i + window
    return None


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    if not xs:
        return float("nan"), float("nan")
    m = sum(xs) / len(xs)
    var = sum((x - m) ** 2 for x in xs) / (len(xs) - 1) if len(xs) > 1 else 0.0
    return m, math.sqrt(var)


def head(xs: Sequence[float], window: int = WINDOW) -> float:
    return sum(xs[:window]) / max(1, len(xs[:window]))


def tail(xs: Sequence[float], window: int = WINDOW) -> float:
    return sum(xs[-window:]) / max(1, len(xs[-window:]))


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def ci95_mean(xs: Sequence[float]) -> tuple[float, float]:
    """95% confidence interval of the mean (Student's t; a single value gives [x, x])."""
    m, s = mean_std(xs)
    if len(xs) < 2:
        return m, m
    # two-sided 97.5% quantiles of Student's t for small samples (df 1..30), then normal
    t_table = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228]
    df = len(xs) - 1
    t = t_table[df - 1] if df <= len(t_table) else 2.042 if df <= 30 else 1.96
    half = t * s / math.sqrt(len(xs))
    return m - half, m + half


# ------------------------------------------------------------------ a broker alone


class BrokerProcess:
    """`python -m broker` on free loopback ports with `config_toml` (durability "none", logs
    at ERROR), up once it has said it listens; `stop()` returns its exit code."""

    def __init__(self, workdir: Path, config_toml: str = "") -> None:
        self.port, self.metrics_port = free_port(), free_port()
        config = workdir / "broker.toml"
        config.write_text(config_toml)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "broker", "--config", str(config), "--port", str(self.port),
             "--metrics-port", str(self.metrics_port), "--durability", "none",
             "--data-dir", str(workdir / "data"), "--log-level", "ERROR"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # "headrace-broker listening on ..."
        if "listening" not in line:
            raise RuntimeError(f"broker did not start: {line!r} (exit {self.proc.poll()})")
        self.endpoint = f"tcp://127.0.0.1:{self.port}"

    def rss_mb(self) -> float:
        """Resident memory now, MiB (0 once it has exited)."""
        import psutil

        try:
            return psutil.Process(self.proc.pid).memory_info().rss / 2**20
        except psutil.Error:
            return 0.0

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

"""Process, port and metrics helpers for the integration and e2e tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from benchmarks.harness import free_port  # noqa: F401 (tests import it from here)


def wait_for(cond: Callable[[], object], timeout: float, what: str, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = cond()
            if value:
                return value
        except Exception as e:  # the thing we wait for may not be up yet
            last_exc = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last_exc})")


def scrape(port: int) -> dict[str, float]:
    """All samples of a /metrics page, keyed `name{label="v",...}` (labels sorted)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def metric(port: int, name: str, default: float = 0.0) -> float:
    """Sum of every sample of `name` (across labels)."""
    samples = scrape(port)
    vals = [v for k, v in samples.items() if k == name or k.startswith(name + "{")]
    return sum(vals) if vals else default


class Proc:
    def __init__(
        self, name: str, argv: list[str], log_dir: Path, env: dict | None = None, nice: int = 0
    ):
        self.name = name
        self.log = log_dir / f"{name}.log"
        full_env = {**os.environ, **(env or {})}
        self.p = subprocess.Popen(
            [sys.executable, "-m", *argv],
            stdout=open(self.log, "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            env=full_env,
            start_new_session=True,
            preexec_fn=(lambda: os.nice(nice)) if nice else None,
        )

    def renice(self, nice: int) -> None:
        """Lower the priority of the role and its children (vLLM's engine processes).

        Two cores are shared by every role of a test run; a role that is just starting (a vLLM
        engine takes ~20 s of CPU to come up) gets the CPU first when the running ones are niced.
        """
        import psutil

        procs = [psutil.Process(self.p.pid)]
        procs += procs[0].children(recursive=True)
        for pr in procs:
            try:
                pr.nice(nice)
            except psutil.NoSuchProcess:
                pass

    def alive(self) -> bool:
        return self.p.poll() is None

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def kill9(self) -> None:
        """SIGKILL the role and everything it started (vLLM's engine process too)."""
        try:
            os.killpg(self.p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.p.wait(30)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.alive():
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill9()
        return self.p.returncode


def write_config(path: Path, model: Path, **sections: dict) -> Path:
    base: dict[str, dict] = {
        "model": {"path": str(model), "build_tiny_if_missing": False},
        "env.symbols": {"levels": [1], "tasks_per_level": 16, "n_turns": 2, "reasoning_tokens": 2},
        "broker": {"group_size": 4, "lease_deadline_s": 60.0, "heartbeat_timeout_s": 10.0},
        "actor": {"max_concurrent_episodes": 32, "max_model_len": 128, "connect_timeout_s": 30.0},
        "learner": {"batch_groups": 2, "checkpoint_every": 1000, "connect_timeout_s": 30.0},
    }
    for sec, values in sections.items():
        base.setdefault(sec, {}).update(values)
    lines = []
    for sec, values in base.items():
        lines.append(f"[{sec}]")
        for k, v in values.items():
            if isinstance(v, bool):
                lines.append(f"{k} = {'true' if v else 'false'}")
            elif isinstance(v, str):
                lines.append(f'{k} = "{v}"')
            else:
                lines.append(f"{k} = {v}")
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def torchrun_two_ranks(script: str, *args: str, timeout: float = 150) -> None:
    """Run `script` under torchrun on 2 CPU ranks (one thread each); fail with its stderr."""
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    res = subprocess.run(
        [*cmd, script, *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert res.returncode == 0, res.stderr[-4000:]

"""A role whose config disagrees with the broker's on the run is refused at its Welcome: one
line, exit 2, before it starts an engine."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import Proc, free_port, write_config

pytestmark = pytest.mark.integration


def test_an_actor_with_another_env_is_refused_at_welcome(tmp_path, tiny_model):
    port = free_port()
    broker_cfg = write_config(tmp_path / "broker.toml", tiny_model, broker={"port": port})
    actor_cfg = write_config(
        tmp_path / "actor.toml", tiny_model, broker={"port": port}, env={"seed": 1}
    )
    broker = Proc(
        "broker",
        ["broker", "--config", str(broker_cfg), "--data-dir", str(tmp_path / "d")]
        + ["--metrics-port", str(free_port())],
        tmp_path,
    )
    try:
        res = subprocess.run(
            [sys.executable, "-m", "actor", "--config", str(actor_cfg)]
            + ["--broker", f"tcp://127.0.0.1:{port}", "--metrics-port", "0"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        broker.stop()
    assert res.returncode == 2, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert "differs from broker" in last and "[env]" in last
    assert "starting vLLM engine" not in res.stderr  # refused before minutes of engine start

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

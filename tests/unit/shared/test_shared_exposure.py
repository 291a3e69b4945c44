"""A plaintext server beyond loopback refuses to start unless the config says it is meant."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared.config import SecurityConfig
from shared.security import SecurityError, bind_host_for, check_exposure
from tests.helpers import free_port


def test_loopback_curve_or_insecure_pass_anything_else_is_refused() -> None:
    plain = SecurityConfig()
    for host in ("127.0.0.1", "localhost", "::1"):
        check_exposure(plain, host, "the broker")
    check_exposure(SecurityConfig(curve=True), "0.0.0.0", "the broker")
    check_exposure(SecurityConfig(insecure=True), "0.0.0.0", "the broker")
    with pytest.raises(SecurityError, match="the broker would bind 10.0.0.5"):
        check_exposure(plain, "10.0.0.5", "the broker")


def test_the_weight_endpoint_binds_loopback_unless_actors_dial_another_address() -> None:
    assert bind_host_for("127.0.0.1") == "127.0.0.1"
    assert bind_host_for("head-node.cluster") == "0.0.0.0"


@pytest.mark.parametrize(
    ("role", "toml"),
    [
        ("broker", '[broker]\nbind_host = "0.0.0.0"\n'),
        ("learner", '[learner]\nweights_host = "10.1.2.3"\n'),
    ],
)
def test_a_role_exposed_in_plaintext_exits_1_with_one_line(
    tmp_path: Path, role: str, toml: str
) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text(toml)
    argv = [sys.executable, "-m", role, "--config", str(cfg), "--metrics-port", "0"]
    if role == "broker":
        argv += ["--port", str(free_port()), "--durability", "none"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[3])}
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1, r.stderr
    assert len(lines) == 1 and "[security] curve" in lines[0] and "insecure" in lines[0], lines

"""No orphans: a real vLLM engine's processes die with their owner when it is SIGKILLed, even
while the engine is still starting (before `AsyncLLM` returns and registers them)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]

OWNER = """
import sys, time

def main():
    from actor.engine import Engine
    Engine(sys.argv[1], max_model_len=128, max_num_seqs=8)
    print("ready", flush=True)
    time.sleep(600)

if __name__ == "__main__":
    main()
"""


def engines_of(owner: psutil.Process) -> list[psutil.Process]:
    out = []
    for p in owner.children(recursive=True):
        try:
            if " ".join(p.cmdline()).startswith("VLLM::"):
                out.append(p)
        except psutil.Error:
            continue
    return out


def test_sigkill_while_the_engine_starts_leaves_no_engine_process(
    tiny_model: Path, tmp_path: Path
) -> None:
    script = tmp_path / "owner.py"
    script.write_text(OWNER)
    env = dict(os.environ, PYTHONPATH=str(REPO), VLLM_CPU_KVCACHE_SPACE="1")
    owner = subprocess.Popen([sys.executable, str(script), str(tiny_model)], env=env, cwd=REPO)
    proc = psutil.Process(owner.pid)
    seen: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 240
        # the worker is the last process an engine starts: kill once it exists, before the
        # engine has finished starting (so before the owner could register anything)
        while not any("Worker" in " ".join(p.cmdline()) for p in seen):
            assert owner.poll() is None, "the owner died on its own"
            assert time.monotonic() < deadline, "no engine worker appeared"
            seen = engines_of(proc)
            time.sleep(0.2)
        time.sleep(1.0)  # two reaper polls
        owner.kill()
        owner.wait(10)
        _, alive = psutil.wait_procs(seen, timeout=15)
        assert not alive, f"engine processes outlived their owner: {[p.pid for p in alive]}"
    finally:
        if owner.poll() is None:
            owner.kill()
        for p in seen:
            if p.is_running():
                p.kill()

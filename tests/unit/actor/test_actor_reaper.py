"""An actor's child processes die with it, whatever kills it: its reaper kills them once the
actor is gone (SIGKILL included), and leaves them alone while the actor lives."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil

OWNER = """
import subprocess, sys, time
from actor.reaper import Reaper

child = subprocess.Popen(["sleep", "600"])  # stands in for vLLM's engine process
reaper = Reaper()
tracked = reaper.track_children()
assert tracked == [child.pid], tracked
print(child.pid, flush=True)
if sys.argv[1] == "clean":
    child.terminate(); child.wait(); reaper.close(); print("closed", flush=True)
time.sleep(600)
"""


def _reaper(p: psutil.Process) -> bool:
    try:
        return (
            p.is_running()
            and p.status() != psutil.STATUS_ZOMBIE
            and ("actor.reaper" in p.cmdline())
        )
    except psutil.Error:  # gone while we looked
        return False


def start(mode: str) -> tuple[subprocess.Popen[str], int]:
    """The owner process and the pid of its child (in "clean" mode already stopped)."""
    owner = subprocess.Popen([sys.executable, "-c", OWNER, mode], stdout=subprocess.PIPE, text=True)
    assert owner.stdout is not None
    return owner, int(owner.stdout.readline())


def test_a_sigkilled_owner_takes_its_tracked_children_with_it() -> None:
    owner, pid = start("kill")
    child = psutil.Process(pid)
    try:
        time.sleep(1.0)  # two reaper polls: a live owner's children are left alone
        assert child.is_running()
        owner.kill()
        owner.wait(10)
        gone, alive = psutil.wait_procs([child], timeout=10)
        assert not alive, "the tracked child outlived its SIGKILLed owner"
    finally:
        if child.is_running():
            child.kill()


def test_a_clean_close_stops_the_reaper() -> None:
    owner, _ = start("clean")
    try:
        assert owner.stdout is not None and owner.stdout.readline().strip() == "closed"
        reapers = [p for p in psutil.Process(owner.pid).children(recursive=True) if _reaper(p)]
        assert not reapers, "the reaper still runs after close()"
    finally:
        owner.kill()
        owner.wait(10)


STARTING = """
import subprocess, sys, time
from actor.reaper import Reaper

reaper = Reaper()  # as Engine does: before the engine exists
# an engine still starting (never registered) and an unrelated child of the owner
engine = subprocess.Popen(["bash", "-c", "exec -a VLLM::EngineCore sleep 600"])
other = subprocess.Popen(["sleep", "600"])
print(engine.pid, other.pid, flush=True)
time.sleep(600)
"""


def test_an_engine_still_starting_dies_with_its_sigkilled_owner() -> None:
    owner = subprocess.Popen([sys.executable, "-c", STARTING], stdout=subprocess.PIPE, text=True)
    assert owner.stdout is not None
    engine, other = (psutil.Process(int(x)) for x in owner.stdout.readline().split())
    try:
        deadline = time.monotonic() + 10
        while not " ".join(engine.cmdline()).startswith("VLLM::"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(1.2)  # two reaper polls: it has seen the engine
        owner.kill()
        owner.wait(10)
        _, alive = psutil.wait_procs([engine], timeout=10)
        assert not alive, "an unregistered starting engine outlived its SIGKILLed owner"
        assert other.is_running()  # not an engine process: not the reaper's to kill
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait(10)
        for p in (engine, other):
            if p.is_running():
                p.kill()

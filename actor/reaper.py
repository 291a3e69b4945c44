"""The engine's processes die with the actor, whatever kills the actor.

vLLM runs its engine core (and, with several workers, the workers) in child processes. When
the actor exits normally `Engine.shutdown` stops them, but SIGKILL (the OOM killer, a
preempted node, `kill -9`) gives the actor no chance to, and the children keep running,
holding their memory (a GPU, on a GPU machine) with nobody left to use it.

A reaper is a small process of its own session (so a signal to the actor's process group
does not take it first), started before the engine, that watches the actor: every `POLL_S`
it notes the actor's descendants (so an engine still starting up, which takes a minute on a
CPU, is covered too) and, once the actor is gone, kills them and their descendants. The
actor may also register processes on its stdin. It exits when it has reaped, or when the
actor closes its stdin after a clean shutdown (whatever is left over is reaped then too).

    python -m actor.reaper PID     # reads "pid create_time" lines on stdin
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import psutil

POLL_S = 0.5


class Reaper:
    """The actor's handle on its reaper process."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "actor.reaper", str(psutil.Process().pid)],
            stdin=subprocess.PIPE,
            start_new_session=True,
        )

    def track_children(self) -> list[int]:
        """Register every descendant of this process started since the reaper (but the
        reaper): the engine's."""
        since = psutil.Process(self.proc.pid).create_time() - 1.0
        mine = [
            p
            for p in psutil.Process().children(recursive=True)
            # By pid first: a loaded machine can show the just-exec'd reaper's cmdline empty.
            if p.pid != self.proc.pid and not _is_reaper(p) and _created(p) >= since
        ]
        stdin = self.proc.stdin
        assert stdin is not None
        tracked = []
        for p in mine:
            try:
                stdin.write(f"{p.pid} {p.create_time()}\n".encode())
            except psutil.NoSuchProcess:  # gone already: nothing to reap
                continue
            tracked.append(p.pid)
        stdin.flush()
        return tracked

    def close(self) -> None:
        """After a clean shutdown: the reaper reaps any leftovers and exits."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _created(p: psutil.Process) -> float:
    try:
        return p.create_time()
    except psutil.Error:
        return 0.0


def _is_reaper(p: psutil.Process) -> bool:
    try:
        return "actor.reaper" in p.cmdline()
    except psutil.Error:
        return False


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _reap(tracked: list[psutil.Process]) -> None:
    victims: list[psutil.Process] = []
    for p in tracked:
        try:
            if p.is_running():  # compares create_time: a reused pid is not ours
                victims += [p, *p.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    for p in victims:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(victims, timeout=5)
    if victims:
        print(f"reaper: killed {len(victims)} leftover engine process(es)", file=sys.stderr)


def main(argv: list[str]) -> int:
    actor = psutil.Process(int(argv[0]))
    tracked: list[psutil.Process] = []
    closed = threading.Event()

    def read() -> None:  # registrations, until the actor closes stdin (or dies)
        for line in sys.stdin.buffer:
            pid, created = line.split()
            try:
                p = psutil.Process(int(pid))
                if abs(p.create_time() - float(created)) < 0.01:
                    tracked.append(p)
            except psutil.NoSuchProcess:
                pass
        closed.set()

    threading.Thread(target=read, daemon=True).start()
    seen: dict[int, psutil.Process] = {}
    since = psutil.Process().create_time() - 1.0  # create_time has a 10 ms granularity
    while _alive(actor) and not closed.wait(POLL_S):  # a clean close ends it at once
        _observe(actor, seen, since)
    _reap([*tracked, *seen.values()])
    return 0


def _observe(actor: psutil.Process, seen: dict[int, psutil.Process], since: float) -> None:
    """Note the actor's vLLM engine processes started since the reaper (they rename
    themselves `VLLM::...`; other children of the actor are not the engine's). A Process
    remembers its create_time, so a reused pid is never taken for ours."""
    try:
        children = actor.children(recursive=True)
    except psutil.Error:
        return
    me = os.getpid()
    for p in children:
        if p.pid == me or p.pid in seen:
            continue
        try:
            if p.create_time() >= since and " ".join(p.cmdline()).startswith("VLLM::"):
                seen[p.pid] = p
        except psutil.Error:
            continue


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

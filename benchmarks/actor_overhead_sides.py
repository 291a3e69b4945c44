"""The two sides of benchmarks/actor_overhead.py, each a tree of processes that can be frozen
(SIGSTOP) while the other is measured and thawed for its own windows:

- bare: `actor.engine.Engine` in a process of its own, generating without pause on the
  prompts the episodes start from, counting its tokens in shared memory;
- pipeline: a real broker and a real actor playing `symbols` episodes, counted by the actor's
  `headrace_actor_tokens_generated_total`.
"""

from __future__ import annotations

import asyncio
import gc
import multiprocessing as mp
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.harness import free_port, scrape

REPO = Path(__file__).resolve().parents[1]
TOKENS = "headrace_actor_tokens_generated_total"
RUNNING = "headrace_actor_episodes_running"
GENERATING = "headrace_actor_requests_generating"


def engine_pids(parent: int) -> list[int]:
    """vLLM's processes under `parent` (EngineCore, its worker), not the reaper."""
    import psutil

    out = []
    for c in psutil.Process(parent).children(recursive=True):
        try:
            if "reaper" not in " ".join(c.cmdline()):
                out.append(c.pid)
        except psutil.Error:
            pass
    return out


class Side:
    """A measured side: its processes by role; `sample()`: its tokens so far and, for the
    pipeline, (episodes running, requests in the engine) at that moment."""

    def __init__(
        self,
        name: str,
        roots: list[int],
        roles: dict[str, list[int]],
        sample: Callable[[], tuple[float, tuple[float, float] | None]],
        stop: Callable[[], None],
    ) -> None:
        self.name, self.roots, self.roles = name, roots, roles
        self.sample, self.stop = sample, stop

    def tree(self) -> list[Any]:
        import psutil

        procs = []
        for pid in self.roots:
            try:
                root = psutil.Process(pid)
                procs += [root, *root.children(recursive=True)]
            except psutil.Error:
                pass
        return procs

    def freeze(self) -> None:
        """SIGSTOP every process of this side: it takes no CPU while the other side runs."""
        self._signal("suspend")

    def thaw(self) -> None:
        self._signal("resume")

    def _signal(self, what: str) -> None:
        import psutil

        for p in self.tree():
            try:
                getattr(p, what)()
            except psutil.Error:
                pass


# ---------------------------------------------------------------- bare


def bare_child(model: str, ids: list[list[int]], conc: int, opts: dict, count, ready, done) -> None:
    """Child process: `conc` generate loops over `ids` until `done` is set, adding each
    completion's tokens to `count`; then the engine is shut down (not left to the reaper).
    Generation stops where the actor's does: `ignore_eos` as the symbols env asks, and the
    chat template's end-of-turn token (`opts["stops"]`), which `ignore_eos` does not lift."""
    from actor.engine import Engine

    async def main() -> None:
        eng = Engine(model, seed=0, max_model_len=opts["max_model_len"], max_num_seqs=conc)

        async def worker(k: int) -> None:
            i = k
            while True:
                r = await eng.generate(
                    ids[i % len(ids)],
                    max_tokens=opts["max_tokens"],
                    temperature=1.0,
                    ignore_eos=True,
                    stop_token_ids=opts["stops"],
                )
                with count.get_lock():
                    count.value += len(r.token_ids)
                ready.set()
                i += conc

        workers = [asyncio.create_task(worker(k)) for k in range(conc)]
        await asyncio.to_thread(done.wait)
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        eng.shutdown()

    asyncio.run(main())
    # The engine's AsyncLLM sits in a reference cycle: collected here, its __del__ (which
    # calls shutdown again) runs while modules are intact, not at interpreter teardown, where
    # it printed a TypeError traceback.
    gc.collect()


def start_bare(model: Path, ids: list[list[int]], conc: int, opts: dict) -> Side:
    ctx = mp.get_context("spawn")
    count, ready, done = ctx.Value("d", 0.0), ctx.Event(), ctx.Event()
    args = (str(model), ids, conc, opts, count, ready, done)
    p = ctx.Process(target=bare_child, args=args)
    p.start()
    if not ready.wait(900):
        p.kill()
        raise RuntimeError("the bare engine produced nothing in 15 minutes")

    def stop() -> None:
        done.set()
        p.join(60)
        if p.is_alive():
            p.kill()

    assert p.pid is not None
    roles = {"driver": [p.pid], "engine": engine_pids(p.pid)}
    return Side("bare", [p.pid], roles, lambda: (float(count.value), None), stop)


# ---------------------------------------------------------------- pipeline


def pipeline_config(model: Path, conc: int, reasoning: int, max_model_len: int) -> str:
    return (
        f'[model]\npath = "{model}"\nbuild_tiny_if_missing = false\n\n'
        f"[env.symbols]\nlevels = [1]\ntasks_per_level = 1024\nn_turns = 1\n"
        f"reasoning_tokens = {reasoning}\n\n"
        # No learner: nothing is ever sampled, so replay must hold the whole run. Windows
        # freeze the whole pipeline, broker and actor alike, for longer than the default
        # heartbeat timeout: a thawed broker must not take its actor for dead.
        f"[broker]\ngroup_size = 8\nreplay_capacity = 100000000\nmax_staleness = -1\n"
        f"heartbeat_timeout_s = 3600.0\nlease_deadline_s = 3600.0\n\n"
        f"[actor]\nmax_concurrent_episodes = {conc}\nmax_model_len = {max_model_len}\n"
    )


def start_pipeline(
    model: Path,
    work: Path,
    conc: int,
    reasoning: int,
    max_model_len: int,
    sets: dict[str, list[str]],
) -> Side:
    """`sets`: config overrides (KEY=VALUE) by role, "broker" and "actor"."""
    port, bmetrics, ametrics = free_port(), free_port(), free_port()
    cfg = work / "run.toml"
    cfg.write_text(pipeline_config(model, conc, reasoning, max_model_len))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    logs = [open(work / f"{n}.log", "wb") for n in ("broker", "actor")]
    argv = [sys.executable, "-m"]
    broker = [*argv, "broker", "--config", str(cfg), "--port", str(port)]
    broker += ["--metrics-port", str(bmetrics), "--durability", "none", "--log-level", "WARNING"]
    broker += [arg for kv in sets.get("broker", []) for arg in ("--set", kv)]
    actor = [*argv, "actor", "--config", str(cfg), "--broker", f"tcp://127.0.0.1:{port}"]
    actor += ["--metrics-port", str(ametrics), "--log-level", "WARNING"]
    actor += [arg for kv in sets.get("actor", []) for arg in ("--set", kv)]
    procs: list[subprocess.Popen] = []

    def stop() -> None:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        for f in logs:
            f.close()

    try:
        for cmd, log in zip((broker, actor), logs, strict=True):
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=log))
        deadline = time.monotonic() + 600
        while True:  # the engine is up once tokens flow
            if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
                raise RuntimeError("pipeline did not start:\n" + (work / "actor.log").read_text())
            try:
                if scrape(ametrics).get(TOKENS, 0) > 0:
                    break
            except OSError:
                pass
            time.sleep(0.5)
    except BaseException:
        stop()
        raise
    b, a = procs[0].pid, procs[1].pid
    roles = {"driver": [a], "engine": engine_pids(a), "broker": [b]}
    return Side("pipeline", [b, a], roles, lambda: actor_sample(scrape(ametrics)), stop)


def actor_sample(m: dict[str, float]) -> tuple[float, tuple[float, float]]:
    """Tokens so far, (episodes running, requests in the engine) from the actor's metrics."""
    return m[TOKENS], (m.get(RUNNING, 0.0), m.get(GENERATING, 0.0))

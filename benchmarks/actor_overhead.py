"""Actor overhead: episodes through the whole pipeline vs bare vLLM generate, same prompts.

Two measurements in the same run, on the same model and the same machine:

- pipeline: a real broker (`python -m broker`, durability none) and a real actor
  (`python -m actor`) playing single-turn `symbols` episodes: leases, the env, token-in /
  token-out episodes, the outbox and acks, metrics. Tokens/s is the growth of the actor's
  `headrace_actor_tokens_generated_total` over a window after warm-up.
- bare: `actor.engine.Engine` in a process of its own, `generate` on the very prompts those
  episodes start from (the env's first observation, tokenized the same way) with the same
  `max_tokens`, the same concurrency and temperature; nothing else. It runs once before the
  pipeline and once after, and the baseline is the mean of the two, so a machine that speeds
  up or slows down over the run moves both sides alike (to first order).

No learner runs, so the weights never change and both sides sample the same model. Each side
also reports CPU seconds per generated token over its window: of the process that drives the
engine (the actor; the bare loop), of vLLM's engine processes (EngineCore and its worker), and
of the broker. On a CPU machine every process shares the same cores, so the driver's CPU is
taken from the engine's. Prints a table and, as its last line, one JSON object:
`ratio_vs_bare_vllm` (pipeline tokens/s / bare tokens/s; goal >= 0.9),
`pipeline_tokens_per_s`, `bare_tokens_per_s` (and `bare_tokens_per_s_before_after`),
`cpu_us_per_token` (per side and process),
`pipeline_episodes_running` (mean episodes in progress: the slots the actor keeps busy),
`concurrency`, `max_tokens`, `model`, `seconds`. `--profile P` records the actor's and the
broker's windows with py-spy into P.actor and P.broker (collapsed stacks; the sampling costs
CPU too, so such a run is not a measurement).

    python benchmarks/actor_overhead.py [--quick] [--concurrency 64] [--duration 20]
        [--model DIR] [--profile PREFIX] [--broker-set KEY=VALUE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.harness import free_port  # noqa: E402

TOKENS = "headrace_actor_tokens_generated_total"
RUNNING = "headrace_actor_episodes_running"


def scrape(port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds the processes `pids` have used so far (gone ones: 0)."""
    import psutil

    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


def rate(points: list[tuple[float, float]]) -> float:
    """Tokens/s from (time, tokens so far) observations: between the first and the last time
    the count moved, so whole waves of completions are counted, not however many happened to
    finish inside a fixed window (with a slower model, 64 episodes of one length finish
    together, seconds apart)."""
    moved = [i for i in range(1, len(points)) if points[i][1] != points[i - 1][1]]
    if len(moved) < 2:
        moved = [0, len(points) - 1]
    (ta, na), (tb, nb) = points[moved[0]], points[moved[-1]]
    return (nb - na) / (tb - ta) if tb > ta else 0.0


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


def prompts(model: Path, n: int, reasoning_tokens: int, seed: int) -> list[list[int]]:
    """The first prompt of `n` symbols episodes, exactly as the actor builds it (the model's
    chat template, `[model] chat_template = "auto"`, where it has one: SmolLM2's)."""
    from actor.build import text_format
    from actor.envs import make_env
    from shared import protocol as P
    from shared.config import ModelConfig

    text = text_format(ModelConfig(path=str(model)), str(model))
    out = []
    for i in range(n):
        payload: dict[str, str | int | float] = {"level": 1, "seed": seed + i, "n_choices": 4}
        payload.update(n_turns=1, reasoning_tokens=reasoning_tokens)
        task = P.TaskSpec(task_id=f"p{i}", env="symbols", payload=payload)
        obs = asyncio.run(make_env(task, i).reset())
        if text.chat is not None:
            out.append(text.chat.opening(obs).ids)
        else:
            out.append(text.prefix_ids + text.tokenizer.encode(obs, add_special_tokens=False))
    return out


def stop_ids(model: Path) -> list[int]:
    """The stop tokens the actor adds to every generation: its chat template's (none for a
    model without one)."""
    from actor.build import text_format
    from shared.config import ModelConfig

    text = text_format(ModelConfig(path=str(model)), str(model))
    return list(text.chat.stop_token_ids) if text.chat is not None else []


def bare(model: str, ids: list[list[int]], conc: int, max_tokens: int, a: dict, out) -> None:
    """Child process: `conc` concurrent generate loops over `ids`; tokens/s over the window.
    Generation stops where the actor's does: `ignore_eos` as the symbols env asks, and the
    chat template's end-of-turn token (`a["stops"]`), which `ignore_eos` does not lift."""
    from actor.engine import Engine

    async def main() -> None:
        eng = Engine(model, seed=0, max_model_len=a["max_model_len"], max_num_seqs=conc)
        me, engine = [os.getpid()], engine_pids(os.getpid())
        cpu: dict[str, float] = {}
        points: list[tuple[float, float]] = []  # (time, tokens) at each completion in the window
        # The window opens `warmup` seconds after the first completion (as the pipeline's
        # opens once tokens flow), so engine start-up and first compiles stay outside it.
        start = end = float("inf")

        async def worker(k: int) -> None:
            nonlocal start, end
            i = k
            while time.monotonic() < end:
                r = await eng.generate(
                    ids[i % len(ids)],
                    max_tokens=max_tokens,
                    temperature=1.0,
                    ignore_eos=True,
                    stop_token_ids=a["stops"],
                )
                now = time.monotonic()
                if start == float("inf"):
                    start = now + a["warmup"]
                    end = start + a["duration"]
                elif start <= now < end:
                    points.append((now, (points[-1][1] if points else 0.0) + len(r.token_ids)))
                i += conc

        async def clock() -> None:  # CPU seconds at the window's edges
            while start == float("inf"):
                await asyncio.sleep(0.01)
            for edge, at in (("0", start), ("1", end)):
                await asyncio.sleep(max(0.0, at - time.monotonic()))
                cpu["driver" + edge], cpu["engine" + edge] = cpu_seconds(me), cpu_seconds(engine)

        await asyncio.gather(clock(), *(worker(k) for k in range(conc)))
        tps = rate([(start, 0.0), *points])
        used = {k: cpu[k + "1"] - cpu[k + "0"] for k in ("driver", "engine")}
        out.put((tps, {k: v / max(tps * a["duration"], 1) for k, v in used.items()}))
        eng.shutdown()

    asyncio.run(main())


def pipeline(
    model: Path, work: Path, conc: int, reasoning: int, a: argparse.Namespace
) -> tuple[float, dict[str, float], float]:
    port, bmetrics, ametrics = free_port(), free_port(), free_port()
    cfg = work / "run.toml"
    cfg.write_text(
        f'[model]\npath = "{model}"\nbuild_tiny_if_missing = false\n\n'
        f"[env.symbols]\nlevels = [1]\ntasks_per_level = 1024\nn_turns = 1\n"
        f"reasoning_tokens = {reasoning}\n\n"
        # No learner: nothing is ever sampled, so replay must hold the whole run.
        f"[broker]\ngroup_size = 8\nreplay_capacity = 100000000\nmax_staleness = -1\n\n"
        f"[actor]\nmax_concurrent_episodes = {conc}\nmax_model_len = {a.max_model_len}\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    logs = [open(work / f"{n}.log", "wb") for n in ("broker", "actor")]
    argv = [sys.executable, "-m"]
    procs = [
        subprocess.Popen(
            [*argv, "broker", "--config", str(cfg), "--port", str(port)]
            + ["--metrics-port", str(bmetrics), "--durability", "none", "--log-level", "WARNING"]
            + [arg for kv in a.broker_set for arg in ("--set", kv)],
            cwd=REPO,
            env=env,
            stdout=logs[0],
            stderr=subprocess.STDOUT,
        )
    ]
    try:
        procs.append(
            subprocess.Popen(
                [*argv, "actor", "--config", str(cfg), "--broker", f"tcp://127.0.0.1:{port}"]
                + ["--metrics-port", str(ametrics), "--log-level", "WARNING"],
                cwd=REPO,
                env=env,
                stdout=logs[1],
                stderr=subprocess.STDOUT,
            )
        )
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
        time.sleep(a.warmup)
        who = {"driver": [procs[1].pid], "engine": engine_pids(procs[1].pid)}
        who["broker"] = [procs[0].pid]
        spies = [
            profile(proc.pid, a.duration, f"{a.profile}.{name}")
            for name, proc in (("broker", procs[0]), ("actor", procs[1]))
            if a.profile
        ]
        cpu0 = {k: cpu_seconds(v) for k, v in who.items()}
        t0 = time.monotonic()
        points = [(t0, scrape(ametrics)[TOKENS])]
        running = []  # episodes in progress, 5 times a second: the slots actually in use
        while time.monotonic() < t0 + a.duration:
            time.sleep(max(0.0, min(0.2, t0 + a.duration - time.monotonic())))
            m = scrape(ametrics)
            points.append((time.monotonic(), m[TOKENS]))
            running.append(m.get(RUNNING, 0.0))
        tps = rate(points)
        window = points[-1][0] - t0
        cpu = {k: (cpu_seconds(v) - cpu0[k]) / max(tps * window, 1) for k, v in who.items()}
        for spy in spies:
            spy.wait(60)
        return tps, cpu, sum(running) / max(len(running), 1)
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        for f in logs:
            f.close()


def profile(pid: int, seconds: float, out: str) -> subprocess.Popen:
    """py-spy (from this interpreter's environment) sampling `pid` for `seconds`."""
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or "py-spy"
    argv = [spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "200"]
    argv += ["--format", "raw", "--output", out, "--nonblocking"]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run_bare(
    model: Path, ids: list[list[int]], conc: int, max_tokens: int, opts: dict
) -> tuple[float, dict[str, float]]:
    """One bare measurement in a fresh process: (tokens/s, CPU seconds per token by process)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=bare, args=(str(model), ids, conc, max_tokens, opts, q))
    p.start()
    tps, cpu = q.get(timeout=900)
    p.join(60)
    print(f"  bare vLLM generate: {tps:9.0f} tokens/s  {us(cpu)}")
    return tps, cpu


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="shorter windows")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--reasoning-tokens", type=int, default=31, help="max_tokens = this + 1")
    ap.add_argument("--duration", type=float, default=None)
    ap.add_argument("--warmup", type=float, default=None)
    ap.add_argument("--max-model-len", type=int, default=256)
    ap.add_argument("--model", default=None, help="HF model dir (default: the tiny model)")
    ap.add_argument("--profile", help="py-spy the window into PROFILE.actor, PROFILE.broker")
    ap.add_argument(
        "--broker-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a broker config override (diagnostics, e.g. broker.curriculum.pool_size=64)",
    )
    a = ap.parse_args(argv)
    a.duration = a.duration or (8.0 if a.quick else 20.0)
    a.warmup = a.warmup if a.warmup is not None else (3.0 if a.quick else 5.0)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    t_start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="headrace-actor-overhead-"))
    try:
        if a.model:
            model = Path(a.model)
        else:
            from learner.tiny_model import build_tiny_model

            model = build_tiny_model(REPO / ".cache" / "models" / "tiny")
        max_tokens = a.reasoning_tokens + 1
        print(
            f"actor overhead: concurrency {a.concurrency}, {max_tokens} tokens an episode,"
            f" {a.duration:.0f} s windows, model {model.name}"
        )
        ids = prompts(model, 256, a.reasoning_tokens, seed=1)
        stops = stop_ids(model)
        opts = {"warmup": a.warmup, "duration": a.duration, "max_model_len": a.max_model_len}
        opts["stops"] = stops
        bare_runs = [run_bare(model, ids, a.concurrency, max_tokens, opts)]
        pipe_tps, pipe_cpu, running = pipeline(model, work, a.concurrency, a.reasoning_tokens, a)
        print(f"  actor pipeline:     {pipe_tps:9.0f} tokens/s  {us(pipe_cpu)}")
        print(f"  episodes running:   {running:9.1f} of {a.concurrency} (mean over the window)")
        bare_runs.append(run_bare(model, ids, a.concurrency, max_tokens, opts))
        bare_tps = sum(t for t, _ in bare_runs) / 2
        bare_cpu = {k: (bare_runs[0][1][k] + bare_runs[1][1][k]) / 2 for k in bare_runs[0][1]}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratio = pipe_tps / bare_tps if bare_tps else None
    out = {
        "ratio_vs_bare_vllm": round(ratio, 3) if ratio else None,
        "pipeline_tokens_per_s": round(pipe_tps, 1),
        "bare_tokens_per_s": round(bare_tps, 1),
        "bare_tokens_per_s_before_after": [round(t, 1) for t, _ in bare_runs],
        "goal": 0.9,
        "cpu_us_per_token": {
            "bare": {k: round(v * 1e6, 1) for k, v in bare_cpu.items()},
            "pipeline": {k: round(v * 1e6, 1) for k, v in pipe_cpu.items()},
        },
        "pipeline_episodes_running": round(running, 1),
        "model": model.name,
        "concurrency": a.concurrency,
        "max_tokens": max_tokens,
        "seconds": round(time.monotonic() - t_start, 1),
    }
    print()
    print(json.dumps(out))
    return 0


def us(cpu: dict[str, float]) -> str:
    return "CPU us/token: " + ", ".join(f"{k} {v * 1e6:.1f}" for k, v in cpu.items())


if __name__ == "__main__":
    sys.exit(main())

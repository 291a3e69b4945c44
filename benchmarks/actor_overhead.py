"""Actor overhead: episodes through the whole pipeline vs bare vLLM generate, same prompts.

Two sides on the same model and the same machine, alternated in one run
(benchmarks/actor_overhead_sides.py):

- pipeline: a real broker (`python -m broker`, durability none) and a real actor
  (`python -m actor`) playing single-turn `symbols` episodes: leases, the env, token-in /
  token-out episodes, the outbox and acks, metrics. Tokens/s is the growth of the actor's
  `headrace_actor_tokens_generated_total` over a window.
- bare: `actor.engine.Engine` in a process of its own, `generate` on the very prompts those
  episodes start from (the env's first observation, tokenized the same way) with the same
  `max_tokens`, the same concurrency and temperature; nothing else.

Both sides start once and stay up; while one is measured the other is frozen (SIGSTOP, every
process of it), so they never share the cores. The windows alternate bare, pipeline, bare,
..., bare (`--rounds` pipeline windows, each between two bare ones), and each pipeline window
is compared with the mean of its two neighbours: a machine whose speed drifts (other jobs,
clocks) moves both sides of each comparison alike. `ratio_vs_bare_vllm` is the median of
those per-round ratios (goal >= 0.9 on the tiny model, 0.95 on a real one such as
SmolLM2-135M); `ratios` lists them all. Nine rounds by default: on a shared 2-core machine
single rounds ranged 0.70-1.39 within one run, and a median of five moved by 0.1 from run to
run. `ratio_by_cpu`: bare's CPU per token over pipeline's (every process of each side, all
its windows together): what the throughput ratio would be on cores that only these processes
use.

No learner runs, so the weights never change and both sides sample the same model. Each side
also reports CPU seconds per generated token: of the process that drives the engine (the
actor; the bare loop), of vLLM's engine processes (EngineCore and its worker), and of the
broker. On a CPU machine every process shares the same cores, so the driver's CPU is taken
from the engine's. Prints a table and, as its last line, one JSON object:
`ratio_vs_bare_vllm`, `ratios`, `ratio_by_cpu`, `pipeline_tokens_per_s`, `bare_tokens_per_s`
(medians of the windows; `*_windows` lists each), `cpu_us_per_token` (per side and process,
over all its windows), `pipeline_episodes_running` (mean episodes in progress: the slots the
actor keeps busy), `pipeline_requests_generating` (of those, the ones in the engine),
`concurrency`, `max_tokens`, `model`, `seconds`. `--profile P` records the actor's and the
broker's first pipeline window with py-spy into P.driver and P.broker (collapsed stacks of
the thread holding the GIL, so a thread waiting for it is not counted as busy; the sampling
costs CPU too, so such a run is not a measurement). `--actor-set` / `--broker-set` override
a role's config (diagnostics: e.g. `actor.leases_ahead=0`).

    python benchmarks/actor_overhead.py [--quick] [--concurrency 64] [--duration 6]
        [--rounds 9] [--model DIR] [--profile PREFIX] [--broker-set KEY=VALUE]
        [--actor-set KEY=VALUE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.actor_overhead_sides import Side, start_bare, start_pipeline  # noqa: E402


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


def profile(pid: int, seconds: float, out: str) -> subprocess.Popen:
    """py-spy (from this interpreter's environment) sampling `pid` for `seconds`."""
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or "py-spy"
    argv = [spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "200"]
    argv += ["--format", "raw", "--output", out, "--nonblocking", "--gil"]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


SETTLE_S = 2.0  # after a thaw, before a window opens: in-flight work resumes, waves re-form
# Between looks at a side's token count. The pipeline's look is a scrape of the actor's
# metrics (Prometheus' default is one per 15 s): at 0.2 s it took 3.3% of the actor's samples.
SAMPLE_S = 1.0


def window(side: Side, seconds: float, spy: str | None = None) -> dict:
    """Thaw `side`, measure it for `seconds`, freeze it again: tokens/s, CPU seconds by
    role, tokens counted, mean episodes running (pipeline)."""
    side.thaw()
    try:
        time.sleep(SETTLE_S)
        roles = ("driver", "broker") if spy and side.name == "pipeline" else ()
        spies = [profile(side.roles[r][0], seconds, f"{spy}.{r}") for r in roles]
        cpu0 = {k: cpu_seconds(v) for k, v in side.roles.items()}
        t0 = time.monotonic()
        points, running = [(t0, side.sample()[0])], []
        while (now := time.monotonic()) < t0 + seconds:
            # One look per SAMPLE_S: the pipeline's is a scrape of the actor's metrics, work
            # the actor does only for the benchmark, so it stays rare.
            time.sleep(max(0.0, min(SAMPLE_S, t0 + seconds - now)))
            tokens, busy = side.sample()
            points.append((time.monotonic(), tokens))
            if busy is not None:
                running.append(busy)
        cpu = {k: cpu_seconds(v) - cpu0[k] for k, v in side.roles.items()}
        for s in spies:
            s.wait(60)
    finally:
        side.freeze()
    tps = rate(points)
    tokens = tps * (points[-1][0] - t0)
    out = {"tps": tps, "cpu": cpu, "tokens": tokens, "running": running}
    print(f"  {side.name:8s} window: {tps:9.0f} tokens/s  {us(per_token(out))}", flush=True)
    return out


def per_token(*windows: dict) -> dict[str, float]:
    """CPU seconds per token by role over `windows` together."""
    tokens = max(sum(w["tokens"] for w in windows), 1.0)
    return {k: sum(w["cpu"][k] for w in windows) / tokens for k in windows[0]["cpu"]}


def paired_ratios(pipe: list[float], bare: list[float]) -> list[float]:
    """Each pipeline window's tokens/s over the mean of the bare windows either side of it
    (`bare` has one window more: bare, pipeline, bare, ..., bare)."""
    if len(bare) != len(pipe) + 1:
        raise ValueError(f"{len(pipe)} pipeline windows want {len(pipe) + 1} bare ones")
    return [p / ((b0 + b1) / 2) for p, b0, b1 in zip(pipe, bare, bare[1:], strict=False)]


def alternate(bare: Side, pipe: Side, a: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """bare, pipeline, bare, ..., bare: `a.rounds` pipeline windows between bare ones."""
    bares = [window(bare, a.duration)]
    pipes = []
    for r in range(a.rounds):
        pipes.append(window(pipe, a.duration, a.profile if r == 0 else None))
        bares.append(window(bare, a.duration))
    return bares, pipes


def run(a: argparse.Namespace, model: Path, work: Path) -> dict:
    max_tokens = a.reasoning_tokens + 1
    ids = prompts(model, 256, a.reasoning_tokens, seed=1)
    opts = {"max_model_len": a.max_model_len, "max_tokens": max_tokens, "stops": stop_ids(model)}
    sides: list[Side] = []
    try:
        pipe = start_pipeline(
            model,
            work,
            a.concurrency,
            a.reasoning_tokens,
            a.max_model_len,
            {"broker": a.broker_set, "actor": a.actor_set},
        )
        sides.append(pipe)
        time.sleep(a.warmup)  # engine start-up and first compiles stay outside the windows
        pipe.freeze()
        bare = start_bare(model, ids, a.concurrency, opts)
        sides.append(bare)
        time.sleep(a.warmup)
        bare.freeze()
        bares, pipes = alternate(bare, pipe, a)
    finally:
        for side in sides:
            side.thaw()  # a frozen process cannot act on SIGTERM
            side.stop()
    ratios = paired_ratios([p["tps"] for p in pipes], [b["tps"] for b in bares])
    bare_cpu, pipe_cpu = per_token(*bares), per_token(*pipes)
    running = [x for p in pipes for x, _ in p["running"]]
    generating = [x for p in pipes for _, x in p["running"]]
    return {
        "ratio_vs_bare_vllm": round(statistics.median(ratios), 3),
        "ratios": [round(r, 3) for r in ratios],
        "goal": 0.9 if a.model is None else 0.95,  # the tiny model / a real one (SmolLM2)
        "ratio_by_cpu": round(sum(bare_cpu.values()) / max(sum(pipe_cpu.values()), 1e-12), 3),
        "pipeline_tokens_per_s": round(statistics.median(p["tps"] for p in pipes), 1),
        "bare_tokens_per_s": round(statistics.median(b["tps"] for b in bares), 1),
        "pipeline_windows": [round(p["tps"], 1) for p in pipes],
        "bare_windows": [round(b["tps"], 1) for b in bares],
        "cpu_us_per_token": {
            "bare": {k: round(v * 1e6, 1) for k, v in bare_cpu.items()},
            "pipeline": {k: round(v * 1e6, 1) for k, v in pipe_cpu.items()},
        },
        "pipeline_episodes_running": round(sum(running) / max(len(running), 1), 1),
        "pipeline_requests_generating": round(sum(generating) / max(len(generating), 1), 1),
        "concurrency": a.concurrency,
        "max_tokens": max_tokens,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="shorter windows, 2 rounds")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--reasoning-tokens", type=int, default=31, help="max_tokens = this + 1")
    ap.add_argument("--duration", type=float, default=None, help="seconds per window")
    ap.add_argument("--rounds", type=int, default=None, help="pipeline windows")
    ap.add_argument("--warmup", type=float, default=None)
    ap.add_argument("--max-model-len", type=int, default=256)
    ap.add_argument("--model", default=None, help="HF model dir (default: the tiny model)")
    ap.add_argument("--profile", help="py-spy the first pipeline window into PROFILE.*")
    ap.add_argument(
        "--broker-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a broker config override (diagnostics, e.g. broker.curriculum.pool_size=64)",
    )
    ap.add_argument(
        "--actor-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an actor config override (diagnostics, e.g. actor.leases_ahead=0)",
    )
    a = ap.parse_args(argv)
    a.duration = a.duration or (5.0 if a.quick else 6.0)
    a.rounds = a.rounds or (2 if a.quick else 9)
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
        print(
            f"actor overhead: concurrency {a.concurrency}, {a.reasoning_tokens + 1} tokens an"
            f" episode, {a.rounds} rounds of {a.duration:.0f} s windows, model {model.name}",
            flush=True,
        )
        out = run(a, model, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out["model"] = model.name
    out["seconds"] = round(time.monotonic() - t_start, 1)
    print(f"  ratios by round: {out['ratios']}  median {out['ratio_vs_bare_vllm']}")
    print(f"  CPU per token, bare / pipeline, all windows: {out['ratio_by_cpu']}")
    print(
        f"  episodes running: {out['pipeline_episodes_running']} of {a.concurrency},"
        f" generating: {out['pipeline_requests_generating']} (bare: {a.concurrency})"
    )
    print()
    print(json.dumps(out))
    return 0


def us(cpu: dict[str, float]) -> str:
    return "CPU us/token: " + ", ".join(f"{k} {v * 1e6:.1f}" for k, v in cpu.items())


if __name__ == "__main__":
    sys.exit(main())

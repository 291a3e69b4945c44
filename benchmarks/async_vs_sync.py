"""Asynchronous vs synchronous RL on the same job: wall clock, learner idle time, reward.

The job is the case asynchronous pipelines exist for: generating a batch and training on it
take comparable time, and episodes wait on tools whose latency is long-tailed. The whole
pipeline runs (`headrace run`: broker + learner + one vLLM actor on loopback) on the multi-turn
`symbols` env, 3 turns of (2 free tokens + 1 action, then a tool call). Every tool call sleeps
a lognormal delay (`[env.symbols] step_delay_dist = "lognormal"`) of mean 0.2 s and log-sigma
1.0 (median 0.12 s, p99 1.2 s), seeded per episode, so a batch of 64 episodes waits about 2.5 s
for its slowest one. The model is a "small" random Llama built here (the tiny model's
tokenizer; hidden 256, 4 layers, 4.3M parameters) trained with 2 PPO epochs x 2 minibatches
per batch, so a learner step on 64 trajectories takes a time comparable to generating them:
with the 0.2M-parameter tiny model and one pass, the learner trained in a fraction of the
generation time and async had little to overlap (1.19x-1.5x, learner idle 73-80%).
In a deployment the actor's engine and the learner each have a device of their own; the
faithful analogue on a machine with >= 2 cores is a core (set) of their own, so by default
(`--pin`) the actor gets the first half of the cores this process may use (`[actor] cpus`:
the engine's OpenMP threads are bound there) and the learner the rest (`[learner] cpus`,
one torch thread per core); the broker is not pinned. Both modes get the same pinning: sync
then leaves the learner's cores idle while the batch is generated and the actor's while it
trains, as a synchronous pipeline leaves its GPUs idle, and async can overlap the two.
`--no-pin` lets both roles' threads float over all cores (the engine unbound, the learner
on half the cores' worth of threads), where they slow each other down.

Same job, same seeds, same steps x batch (equal samples), two modes:

- async (headrace's normal mode): the actor keeps up to 128 episodes going while the learner
  trains, on policies up to `[broker] max_staleness = 4` versions old (off-policy corrected;
  `--max-staleness N` for another bound);
- sync: generate a batch, train, update weights, repeat: `[actor] sync = true` (per policy
  version the actor takes leases for one learner batch, then waits until it has loaded the
  next version) with `[broker] max_staleness = 0`; every trained token is on-policy
  (`staleness_mean` 0).

Measured from the learner's summary (`headrace run --summary-json`, per step: `wait_seconds`,
the wait for the batch; `step_seconds`, the trainer; `time`, when the step ended) over the
steady window, the end of step 1 to the end of step N (both modes pay the same start-up):

- `speedup` = sync steady wall / async steady wall (> 1: async faster); goal >= 2.0;
- `learner_idle_fraction` (async) = the time waiting for batches / the window; goal <= 0.2;
- `ideal_speedup`, from the sync run's phase times per steady step (means): W = wait (the
  actor loads the new weights and plays the batch to its slowest episode), T = step_seconds,
  O = interval - W - T (publish, acks, feedback), and G = B x E / C, the generation
  throughput bound: B episodes per batch, E the mean episode wall time (the broker store's
  `seconds` column), C = `[actor] max_concurrent_episodes`, i.e. the time per batch of an
  actor whose slots never wait for a batch's slowest episode. ideal = (W + T + O) /
  max(G, T + O): a pipeline that overlaps generation with training perfectly and pays the
  learner's own phases (T + O) in full. `ideal_overlap` = (W + T + O) / max(W, T + O) is the
  same without hiding the tail (overlap alone: at most 2). Both take the phases at their sync
  durations; where actor and learner share CPUs (`--no-pin`) they slow each other down in
  async (2 seeds x 40 steps on 2 cores: the learner step 0.81 s sync vs 1.46 s async, the
  mean episode 0.90 s vs 2.08 s; pinned, 0.79 vs 0.83 s and 0.77 vs 1.63 s), which is most
  of the gap between `ideal_speedup` and `speedup`;
- `reward_per_sample` per mode: the mean of the steps' `reward_mean` (each step's mean
  trajectory reward, every sample weighing the same) over all N steps, with `noise`, twice the
  standard error of the async - sync difference (per-step rewards as samples), and `agrees`:
  |async - sync| <= noise.
- `heldout_pass_at_1` per mode: each run's final weights scored on the env's held-out tasks
  (`headrace eval`, `--eval-n` per family x 4 samples), mean over seeds: what the equal
  samples bought. `reward_per_sample` is what the behaviour policies earned while sampling,
  which lags the learner by the staleness in async mode; this does not.

Each run gets free ports and its own temporary run directory (removed unless `--keep` or it
failed); the broker keeps its store (`durability = "sqlite"`, the default) so episode times
can be read back. Prints a table, then as its last line one JSON object: `speedup`,
`ideal_speedup`, `ideal_overlap`, `learner_idle_fraction`, `reward_per_sample`, `phases`,
`modes` (name -> wall_s, run_s, samples, samples_per_s, learner_idle_fraction,
reward_per_sample, final_reward, staleness_mean, per_seed), `speedup_run_s`, `goal`, `job`,
`cpus` (role -> cores, {} unpinned), `max_staleness` (async's), `seeds`, `steps`, `seconds`.

    python benchmarks/async_vs_sync.py [--quick] [--steps 40] [--seeds 2] [--step-delay 0.2]
        [--delay-dist lognormal] [--delay-sigma 1.0] [--model small|tiny] [--no-pin]
        [--max-staleness 4]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/...`

from benchmarks.harness import (  # noqa: E402
    ROOT,
    free_port,
    headrace_run,
    heldout_eval,
    report_failure,
)

GOAL_SPEEDUP = 2.0
GOAL_IDLE = 0.2

# The job: level-1 `symbols`, 3 turns of (2 free tokens + 1 action, then a tool call).
JOB: dict[str, Any] = {
    "model": {"path": ".cache/models/tiny", "build_tiny_if_missing": True, "seed": 0},
    "env": {
        "name": "symbols",
        "seed": 0,
        "symbols": {
            "levels": [1],
            "tasks_per_level": 64,
            "reasoning_tokens": 2,
            "n_choices": 4,
            "n_turns": 3,
            "step_delay_s": 0.2,
            "step_delay_dist": "lognormal",
            "step_delay_sigma": 1.0,
        },
    },
    "broker": {"durability": "sqlite", "group_size": 8, "max_staleness": 4},
    "actor": {"max_concurrent_episodes": 128, "temperature": 1.0, "max_model_len": 256},
    "learner": {
        "batch_groups": 8,
        "lr": 3e-3,
        "ppo_epochs": 2,
        "minibatches": 2,
        "publish_every": 1,
        "checkpoint_every": 100000,
    },
}
MODES: dict[str, dict[str, dict[str, Any]]] = {
    "async": {"broker": {"max_staleness": 4}, "actor": {"sync": False}},
    "sync": {"broker": {"max_staleness": 0}, "actor": {"sync": True}},
}
# The "small" model: the tiny model's tokenizer and architecture, wider and deeper.
SMALL = {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "heads": 4}


# ------------------------------------------------------------------ the small model


def build_small_model(out: Path, seed: int) -> Path:
    """A random Llama of `SMALL`'s size with the tiny model's tokenizer at `out` (kept if
    already there); the same seed gives the same weights."""
    from learner.tiny_model import build_tiny_model

    return build_tiny_model(
        out,
        seed,
        hidden=SMALL["hidden_size"],
        intermediate=SMALL["intermediate_size"],
        layers=SMALL["num_hidden_layers"],
        heads=SMALL["heads"],
    )


# ------------------------------------------------------------------ config


def delay_keys(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "step_delay_s": args.step_delay,
        "step_delay_dist": args.delay_dist,
        "step_delay_sigma": args.delay_sigma,
    }


def role_cpus(pin: bool) -> dict[str, list[int]]:
    """With `pin` on a machine with >= 2 cores this process may use: the first half of them
    for the actor (`[actor] cpus`), the rest for the learner (`[learner] cpus`); else none."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not pin or len(cores) < 2:
        return {}
    half = len(cores) // 2
    return {"actor": cores[:half], "learner": cores[half:]}


def run_config(mode: str, seed: int, steps: int, args: argparse.Namespace) -> dict[str, Any]:
    cfg = {k: dict(v) for k, v in JOB.items()}
    for section, over in MODES[mode].items():
        cfg[section].update(over)
    if mode == "async":
        cfg["broker"]["max_staleness"] = args.max_staleness
    for section, cpus in role_cpus(args.pin).items():  # the same in both modes
        cfg[section]["cpus"] = cpus
    if args.model == "small":
        path = build_small_model(ROOT / ".cache" / "models" / f"avs-small-seed{seed}", seed)
        cfg["model"] = {"path": str(path.relative_to(ROOT)), "build_tiny_if_missing": False}
    else:  # the tiny model, one initialisation per seed
        cfg["model"] = {**cfg["model"], "path": f".cache/models/tiny-seed{seed}", "seed": seed}
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    cfg["env"].update(seed=seed, symbols={**JOB["env"]["symbols"], **delay_keys(args)})
    cfg["broker"].update(port=port, metrics_port=0)
    cfg["actor"].update(broker=endpoint, metrics_port=0, seed=seed)
    cfg["learner"].update(broker=endpoint, metrics_port=0, weights_port=0, steps=steps, seed=seed)
    return cfg


# ------------------------------------------------------------------ one run


def episode_seconds(run_dir: Path) -> float | None:
    """Mean wall time of the run's episodes, from the broker store's `seconds` column."""
    db = run_dir / "run" / "broker" / "broker.db"
    if not db.exists():
        return None
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        row = con.execute("SELECT AVG(seconds) FROM trajectories WHERE seconds > 0").fetchone()
    return float(row[0]) if row and row[0] is not None else None


def phases(entries: list[dict[str, Any]]) -> dict[str, float]:
    """Mean per steady step (2..N): wait (W), train (T), other (O), and the interval."""
    steady = list(zip(entries, entries[1:], strict=False))
    interval = [float(b["time"]) - float(a["time"]) for a, b in steady]
    wait = [float(b["wait_seconds"]) for _, b in steady]
    train = [float(b["step_seconds"]) for _, b in steady]
    other = [max(0.0, i - w - t) for i, w, t in zip(interval, wait, train, strict=True)]
    return {
        k: statistics.fmean(v)
        for k, v in zip(("interval", "W", "T", "O"), (interval, wait, train, other), strict=True)
    }


def run_once(
    mode: str, seed: int, steps: int, args: argparse.Namespace, timeout_s: float
) -> dict[str, Any]:
    run_dir = Path(tempfile.mkdtemp(prefix=f"headrace-avs-{mode}-s{seed}-"))
    cfg = run_config(mode, seed, steps, args)
    code, run_s, entries, log_path = headrace_run(cfg, run_dir, timeout_s)
    result: dict[str, Any] = {"seed": seed, "code": code, "run_s": round(run_s, 1)}
    if code != 0 or len(entries) < steps or any("time" not in e for e in entries):
        result["error"] = f"exit {code}, {len(entries)}/{steps} steps"
        report_failure(result["error"], run_dir, log_path)
        return result
    batch = cfg["learner"]["batch_groups"] * cfg["broker"]["group_size"]
    window = entries[-1]["time"] - entries[0]["time"]
    waited = sum(float(e["wait_seconds"]) for e in entries[1:])
    rewards = [float(e["reward_mean"]) for e in entries]
    final = max(1, min(10, len(rewards) // 2))
    result.update(
        wall_s=round(window, 2),
        samples=(len(entries) - 1) * batch,
        samples_per_s=round((len(entries) - 1) * batch / window, 2) if window > 0 else None,
        learner_idle_fraction=round(waited / window, 4) if window > 0 else None,
        step_seconds_mean=round(statistics.mean(float(e["step_seconds"]) for e in entries), 3),
        reward_per_sample=round(statistics.mean(rewards), 4),
        final_reward=round(statistics.mean(rewards[-final:]), 4),
        staleness_mean=round(statistics.mean(float(e["staleness_mean"]) for e in entries), 3),
        phases={k: round(v, 3) for k, v in phases(entries).items()},
        episode_s=episode_seconds(run_dir),
        batch=batch,
        concurrency=cfg["actor"]["max_concurrent_episodes"],
        reward=[round(r, 4) for r in rewards],
    )
    if args.eval_n:  # the final weights on held-out tasks: quality at equal samples
        held = heldout_eval(run_dir, args.eval_n)
        result.update(heldout_pass_at_1=held and held["pass_at_1"],
                      heldout_mean_reward=held and held["mean_reward"])  # fmt: skip
    if not args.keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return result


# ------------------------------------------------------------------ summary


def _mean(rows: list[dict[str, Any]], key: str) -> float | None:
    xs = [float(r[key]) for r in rows if r.get(key) is not None]
    return round(statistics.mean(xs), 4) if xs else None


KEYS = (
    "wall_s",
    "run_s",
    "samples",
    "samples_per_s",
    "learner_idle_fraction",
    "step_seconds_mean",
    "reward_per_sample",
    "final_reward",
    "staleness_mean",
    "episode_s",
    "heldout_pass_at_1",
    "heldout_mean_reward",
)


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode, rows in runs.items():
        good = [r for r in rows if "error" not in r]
        out[mode] = {k: _mean(good, k) for k in KEYS}
        out[mode]["failed_runs"] = len(rows) - len(good)
        out[mode]["per_seed"] = rows
    return out


def ideal(sync_rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """The sync runs' mean phases and the speedups they bound (module docstring)."""
    good = [r for r in sync_rows if "error" not in r]
    if not good:
        return {"ideal_speedup": None, "ideal_overlap": None}
    ph = {k: statistics.fmean(r["phases"][k] for r in good) for k in ("W", "T", "O")}
    w, t, o = ph["W"], ph["T"], ph["O"]
    eps = [r["episode_s"] for r in good if r.get("episode_s")]
    g = statistics.fmean(eps) * good[0]["batch"] / good[0]["concurrency"] if eps else w
    g = min(g, w)  # never slower than the sync batch itself
    return {
        "W": round(w, 3),
        "T": round(t, 3),
        "O": round(o, 3),
        "G": round(g, 3),
        "ideal_speedup": round((w + t + o) / max(g, t + o), 3),
        "ideal_overlap": round((w + t + o) / max(w, t + o), 3),
    }


def reward_agreement(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Reward per sample per mode, the difference, and twice its standard error."""
    out: dict[str, Any] = {}
    se2 = 0.0
    for mode, rows in runs.items():
        xs = [x for r in rows if "error" not in r for x in r["reward"]]
        out[mode] = round(statistics.fmean(xs), 4) if xs else None
        se2 += statistics.variance(xs) / len(xs) if len(xs) > 1 else math.inf
    if out.get("async") is None or out.get("sync") is None:
        return out
    out["diff"] = round(out["async"] - out["sync"], 4)
    out["noise"] = round(2 * math.sqrt(se2), 4)
    out["agrees"] = abs(out["diff"]) <= out["noise"]
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b and math.isfinite(a / b) else None


def print_table(stats: dict[str, Any]) -> None:
    hdr = f"{'mode':6s} {'wall s':>8s} {'run s':>7s} {'samples/s':>10s} {'idle':>6s} "
    hdr += f"{'train s':>8s} {'reward/sample':>14s} {'final reward':>13s} {'staleness':>10s}"
    print(hdr)
    print("-" * len(hdr))
    for mode, m in stats.items():
        print(
            f"{mode:6s} {m['wall_s'] or 0:8.1f} {m['run_s'] or 0:7.0f} "
            f"{m['samples_per_s'] or 0:10.1f} {m['learner_idle_fraction'] or 0:6.2f} "
            f"{m['step_seconds_mean'] or 0:8.2f} {m['reward_per_sample'] or 0:14.3f} "
            f"{m['final_reward'] or 0:13.3f} {m['staleness_mean'] or 0:10.2f}"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 seed x 12 steps per mode")
    ap.add_argument("--steps", type=int, help="learner steps per run (default 40; quick 12)")
    ap.add_argument("--seeds", type=int, help="seeds per mode (default 2; quick 1)")
    ap.add_argument("--step-delay", type=float, default=0.2, help="mean tool delay, seconds")
    ap.add_argument("--delay-dist", choices=["fixed", "lognormal"], default="lognormal")
    ap.add_argument("--delay-sigma", type=float, default=1.0, help="lognormal log-sigma")
    ap.add_argument("--model", choices=["small", "tiny"], default="small")
    ap.add_argument("--keep", action="store_true", help="keep every run's directory")
    ap.add_argument(
        "--eval-n", type=int, default=16, help="held-out tasks per family to score each run's"
        " final weights on (headrace eval, 4 samples each; 0: none)",
    )  # fmt: skip
    ap.add_argument(
        "--max-staleness", type=int, default=4, help="async's [broker] max_staleness (sync: 0)"
    )
    ap.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="give the actor and the learner their own cores (default; --no-pin: share all)",
    )
    args = ap.parse_args(argv)
    args.steps = args.steps or (12 if args.quick else 40)
    args.seeds = args.seeds or (1 if args.quick else 2)
    if args.steps < 3:
        ap.error("--steps must be >= 3")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    steps, seeds = args.steps, args.seeds
    print(
        f"async_vs_sync: 2 modes x {seeds} seeds x {steps} steps, {args.model} model, "
        f"{args.delay_dist} tool delay of mean {args.step_delay}s per env step; one run at a "
        f"time; cores {role_cpus(args.pin) or 'shared'}",
        flush=True,
    )
    t_start = time.monotonic()
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    for seed in range(seeds):
        for mode in MODES:
            r = run_once(mode, seed, steps, args, 600.0 + 30.0 * steps)
            runs[mode].append(r)
            status = r.get("error") or (
                f"{r['wall_s']:.1f}s for {r['samples']} samples, idle "
                f"{r['learner_idle_fraction']:.2f}, reward {r['reward_per_sample']:.3f}, "
                f"phases {r['phases']}, episode {r['episode_s'] or 0:.2f}s"
            )
            print(f"  {mode} seed {seed}: run {r['run_s']:.0f}s, {status}", flush=True)
    stats = summarise(runs)
    a, s = stats["async"], stats["sync"]
    speedup = _ratio(s["wall_s"], a["wall_s"])
    bound = ideal(runs["sync"])
    rewards = reward_agreement(runs)
    print()
    print_table(stats)
    print(
        f"\nspeedup (sync wall / async wall, steady state): {speedup} (goal >= {GOAL_SPEEDUP}); "
        f"ideal {bound['ideal_speedup']} (overlap alone {bound['ideal_overlap']}); async "
        f"learner idle {a['learner_idle_fraction']} (goal <= {GOAL_IDLE}); reward per sample "
        f"{rewards}"
    )
    result = {
        "speedup": speedup,
        "ideal_speedup": bound["ideal_speedup"],
        "ideal_overlap": bound["ideal_overlap"],
        "learner_idle_fraction": a["learner_idle_fraction"],  # async mode's
        "learner_idle_fraction_sync": s["learner_idle_fraction"],
        "reward_per_sample": rewards,
        "phases": bound,
        "modes": stats,
        "speedup_run_s": _ratio(s["run_s"], a["run_s"]),
        "final_reward_ratio": _ratio(a["final_reward"], s["final_reward"]),
        "heldout_pass_at_1": {m: stats[m]["heldout_pass_at_1"] for m in ("async", "sync")},
        "goal": {"speedup": GOAL_SPEEDUP, "learner_idle_fraction": GOAL_IDLE, "reward": "agrees"},
        "job": {"model": args.model, **JOB["env"]["symbols"], **delay_keys(args)},
        "cpus": role_cpus(args.pin),
        "max_staleness": args.max_staleness,
        "seeds": list(range(seeds)),
        "steps": steps,
        "seconds": round(time.monotonic() - t_start, 1),
    }
    print(json.dumps(result))
    return 0 if all("error" not in r for rs in runs.values() for r in rs) else 1


if __name__ == "__main__":
    raise SystemExit(main())

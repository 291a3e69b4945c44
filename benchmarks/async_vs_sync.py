"""Asynchronous vs synchronous RL on the same job: wall clock, learner idle time, reward.

Runs the whole pipeline (`headrace run`: broker + learner + one vLLM actor on loopback, the
tiny model) on the multi-turn `symbols` env with a tool delay: every env step awaits
`[env.symbols] step_delay_s` (0.2 s), as a tool call would. Same job, same seeds, same steps, two
modes:

- async (headrace's normal mode): the actor keeps generating while the learner trains, on
  policies up to `[broker] max_staleness = 4` versions old (off-policy corrected);
- sync: generate a batch, train, update weights, repeat: `[actor] sync = true` (per policy
  version the actor takes leases for one learner batch, `[learner] batch_groups` groups, then
  waits until it has loaded the next version) with `[broker] max_staleness = 0` (nothing
  older than the learner's version is trained on). Every trained token is on-policy, which the
  summary's `staleness_mean` (0) confirms.

Measured from the learner's summary (`headrace run --summary-json`, one entry per step with
`wait_seconds`, the time it waited for the batch, and `time`, when the step ended):

- wall clock to N trained samples, steady state: from the end of step 1 to the end of step N
  (both modes pay the same vLLM start-up before step 1; `run_s`, the whole `headrace run`
  including start-up and shutdown, is reported too). `samples` = (N - 1) x batch size;
- learner idle fraction: time spent waiting for batches / that same window;
- reward per sample: the mean of the steps' `reward_mean` (each step's mean trajectory
  reward, so every sample weighs the same) over all steps and over the final window.

`speedup` = sync steady wall / async steady wall (> 1: async faster); the goal is >= 2.5 at
equal reward per sample. Each run gets free ports and its own temporary run directory
(removed unless `--keep` or it failed). Prints a table, then as its last line one JSON object:
`modes` (name -> wall_s, run_s, samples, samples_per_s, learner_idle_fraction,
reward_per_sample, final_reward, staleness_mean, per_seed), `speedup`, `speedup_run_s`,
`reward_ratio`, `goal`, `job`, `seeds`, `steps`, `seconds`.

    python benchmarks/async_vs_sync.py [--quick] [--steps 40] [--seeds 1] [--step-delay 0.2]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/...`

from benchmarks.harness import free_port, headrace_run, report_failure  # noqa: E402

GOAL_SPEEDUP = 2.5

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
        },
    },
    "broker": {"durability": "none", "group_size": 8, "max_staleness": 4},
    "actor": {"max_concurrent_episodes": 128, "temperature": 1.0, "max_model_len": 256},
    "learner": {"batch_groups": 8, "lr": 1e-2, "publish_every": 1, "checkpoint_every": 100000},
}
MODES: dict[str, dict[str, dict[str, Any]]] = {
    "async": {"broker": {"max_staleness": 4}, "actor": {"sync": False}},
    "sync": {"broker": {"max_staleness": 0}, "actor": {"sync": True}},
}


# ------------------------------------------------------------------ config


def run_config(mode: str, seed: int, steps: int, step_delay: float) -> dict[str, dict[str, Any]]:
    cfg = {k: dict(v) for k, v in JOB.items()}
    for section, over in MODES[mode].items():
        cfg[section].update(over)
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    cfg["env"].update(seed=seed, symbols={**JOB["env"]["symbols"], "step_delay_s": step_delay})
    cfg["broker"].update(port=port, metrics_port=0)
    cfg["actor"].update(broker=endpoint, metrics_port=0, seed=seed)
    cfg["learner"].update(broker=endpoint, metrics_port=0, weights_port=0, steps=steps, seed=seed)
    return cfg


# ------------------------------------------------------------------ one run


def run_once(
    mode: str, seed: int, steps: int, step_delay: float, keep: bool, timeout_s: float
) -> dict[str, Any]:
    run_dir = Path(tempfile.mkdtemp(prefix=f"headrace-avs-{mode}-s{seed}-"))
    cfg = run_config(mode, seed, steps, step_delay)
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
        reward=[round(r, 4) for r in rewards],
    )
    if not keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return result


# ------------------------------------------------------------------ summary


def _mean(rows: list[dict[str, Any]], key: str) -> float | None:
    xs = [float(r[key]) for r in rows if r.get(key) is not None]
    return round(statistics.mean(xs), 4) if xs else None


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode, rows in runs.items():
        good = [r for r in rows if "error" not in r]
        out[mode] = {
            k: _mean(good, k)
            for k in (
                "wall_s",
                "run_s",
                "samples",
                "samples_per_s",
                "learner_idle_fraction",
                "step_seconds_mean",
                "reward_per_sample",
                "final_reward",
                "staleness_mean",
            )
        }
        out[mode]["failed_runs"] = len(rows) - len(good)
        out[mode]["per_seed"] = rows
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b and math.isfinite(a / b) else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 seed x 12 steps per mode")
    ap.add_argument("--steps", type=int, help="learner steps per run (default 40; quick 12)")
    ap.add_argument("--seeds", type=int, help="seeds per mode (default 2; quick 1)")
    ap.add_argument("--step-delay", type=float, default=0.2, help="[env.symbols] step_delay_s")
    ap.add_argument("--keep", action="store_true", help="keep every run's directory")
    args = ap.parse_args(argv)
    steps = args.steps or (12 if args.quick else 40)
    seeds = args.seeds or (1 if args.quick else 2)
    if steps < 3:
        ap.error("--steps must be >= 3")
    print(
        f"async_vs_sync: 2 modes x {seeds} seeds x {steps} steps, tool delay "
        f"{args.step_delay}s per env step; one run at a time",
        flush=True,
    )
    t_start = time.monotonic()
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    for seed in range(seeds):
        for mode in MODES:
            r = run_once(mode, seed, steps, args.step_delay, args.keep, 600.0 + 30.0 * steps)
            runs[mode].append(r)
            status = r.get("error") or (
                f"{r['wall_s']:.1f}s for {r['samples']} samples, idle "
                f"{r['learner_idle_fraction']:.2f}, reward {r['reward_per_sample']:.3f}"
            )
            print(f"  {mode} seed {seed}: run {r['run_s']:.0f}s, {status}", flush=True)
    stats = summarise(runs)
    a, s = stats["async"], stats["sync"]
    speedup = _ratio(s["wall_s"], a["wall_s"])
    print()
    hdr = f"{'mode':6s} {'wall s':>8s} {'run s':>7s} {'samples/s':>10s} {'idle':>6s} "
    hdr += f"{'reward/sample':>14s} {'final reward':>13s} {'staleness':>10s}"
    print(hdr)
    print("-" * len(hdr))
    for mode, m in stats.items():
        print(
            f"{mode:6s} {m['wall_s'] or 0:8.1f} {m['run_s'] or 0:7.0f} "
            f"{m['samples_per_s'] or 0:10.1f} {m['learner_idle_fraction'] or 0:6.2f} "
            f"{m['reward_per_sample'] or 0:14.3f} {m['final_reward'] or 0:13.3f} "
            f"{m['staleness_mean'] or 0:10.2f}"
        )
    print(f"\nspeedup (sync wall / async wall, steady state): {speedup}  (goal >= {GOAL_SPEEDUP})")
    result = {
        "modes": stats,
        "speedup": speedup,
        "speedup_run_s": _ratio(s["run_s"], a["run_s"]),
        "learner_idle_fraction": a["learner_idle_fraction"],  # async mode's
        "learner_idle_fraction_sync": s["learner_idle_fraction"],
        "reward_per_sample_async": a["reward_per_sample"],
        "reward_per_sample_sync": s["reward_per_sample"],
        "reward_ratio": _ratio(a["reward_per_sample"], s["reward_per_sample"]),
        "final_reward_ratio": _ratio(a["final_reward"], s["final_reward"]),
        "goal": {"speedup": GOAL_SPEEDUP, "reward": "equal per sample"},
        "job": JOB["env"] | {"symbols": JOB["env"]["symbols"] | {"step_delay_s": args.step_delay}},
        "seeds": list(range(seeds)),
        "steps": steps,
        "seconds": round(time.monotonic() - t_start, 1),
    }
    print(json.dumps(result))
    return 0 if all("error" not in r for rs in runs.values() for r in rs) else 1


if __name__ == "__main__":
    raise SystemExit(main())

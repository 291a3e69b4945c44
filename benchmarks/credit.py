"""Credit assignment on long reasoning spans: uniform GRPO vs ActFocus vs turn-level advantages.

Runs the whole pipeline (`headrace run`: broker + learner + one vLLM actor on loopback, the
tiny model) on the multi-turn `symbols` env configured with long free reasoning spans and a
one-token action per turn (`ops/configs/credit.toml`: level 1, 2 turns, 12 reasoning tokens
before each action), once per (variant, seed), one run at a time, same steps and seeds for
every variant:

- grpo_uniform: GRPO advantages, every trained token weight 1 (the baseline);
- actfocus: GRPO advantages, `[learner.weighting] mode = "actfocus"` (reasoning tokens
  down-weighted, action weight moved towards uncertain action tokens);
- turn_level: `[learner.advantage] estimator = "turn_level"`, uniform token weights.

(`roles` and `gigpo` can be asked for with `--variants` too.)

Success is the learner summary's per-step `pass_rate` (fraction of the step's trajectories with
every turn right; a random policy scores 1/n_choices**n_turns). Per variant it reports the
final success (mean pass rate over the last 10 steps) and the steps to a threshold: the first
step whose trailing 10-step moving average of the pass rate reaches it. The threshold is midway
between the baseline's initial (first 10 steps) and final (last 10 steps) success, averaged
over its seeds, so the baseline reaches it within the budget by construction (`--threshold`
overrides). A seed that never reaches it counts as `steps` (a lower bound) in the mean and
std, and `reached` says how many seeds did. Mean reward (per-turn accuracy) is reported too.

Each run gets free ports (broker; metrics off; weight endpoint picked by the learner) and its
own temporary run directory (broker store, checkpoints, logs), removed afterwards unless
`--keep`. Prints the estimated wall time first, a table at the end, and as its last line one
JSON object: `variants` (name -> final_success_mean/std, steps_to_threshold_mean/std,
reached, final_reward_mean/std, per_seed), `threshold`, `seeds`, `steps`, `env`, `seconds`.

    python benchmarks/credit.py [--quick] [--seeds 3] [--steps 60] [--variants a,b,c]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = ROOT / "ops" / "configs" / "credit.toml"
WINDOW = 10  # steps in the moving average and in the "final" window

# name -> ([learner.advantage] overrides, [learner.weighting] overrides)
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "grpo_uniform": ({"estimator": "grpo"}, {"mode": "uniform"}),
    "actfocus": ({"estimator": "grpo"}, {"mode": "actfocus"}),
    "turn_level": ({"estimator": "turn_level"}, {"mode": "uniform"}),
    "roles": ({"estimator": "grpo"}, {"mode": "roles"}),
    "gigpo": ({"estimator": "gigpo"}, {"mode": "uniform"}),
}
DEFAULT_VARIANTS = ["grpo_uniform", "actfocus", "turn_level"]
BASELINE = "grpo_uniform"

# Measured cost of one run on a busy 2-core CPU box: vLLM start-up + teardown, then per step
# (64 trajectories of 2 x 13 generated tokens). Only the first estimate uses them; the
# progress lines extrapolate from the runs done.
EST_STARTUP_S = 60.0
EST_STEP_S = 3.1


# ------------------------------------------------------------------ config


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def dump_toml(data: dict[str, Any], prefix: str = "") -> str:
    """Minimal TOML writer: scalars and lists first, then each sub-table as `[a.b]`."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for k, v in data.items():
        if isinstance(v, dict):
            name = f"{prefix}{k}"
            lines += ["", f"[{name}]", dump_toml(v, name + ".")]
    return "\n".join(lines).strip("\n") + "\n"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_config(base: dict[str, Any], variant: str, seed: int, steps: int) -> dict[str, Any]:
    cfg = copy.deepcopy(base)
    adv, weighting = VARIANTS[variant]
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    cfg.setdefault("env", {})["seed"] = seed
    cfg.setdefault("broker", {}).update(port=port, metrics_port=0)
    cfg["broker"].setdefault("replay", {})["seed"] = seed
    cfg.setdefault("actor", {}).update(broker=endpoint, metrics_port=0, seed=seed)
    learner = cfg.setdefault("learner", {})
    learner.update(broker=endpoint, metrics_port=0, weights_port=0, steps=steps, seed=seed)
    learner.setdefault("advantage", {}).update(adv)
    learner.setdefault("weighting", {}).update(weighting)
    return cfg


# ------------------------------------------------------------------ one run


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGINT lets `headrace run` stop its roles in order; SIGKILL its group if it hangs."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def headrace_run(
    cfg: dict[str, Any],
    run_dir: Path,
    timeout_s: float,
    started: Callable[[], None] | None = None,
    finished: Callable[[], None] | None = None,
) -> tuple[int, float, list[dict[str, Any]], Path]:
    """One `headrace run` of `cfg` in `run_dir` (config, summary, log and run data there).

    Returns (exit code, -1 when it timed out and was stopped; seconds; the learner summary's
    per-step entries; the log's path). `started` / `finished` run around the wait.
    """
    cfg_path = run_dir / "config.toml"
    cfg_path.write_text(dump_toml(cfg))
    summary = run_dir / "summary.json"
    log_path = run_dir / "run.log"
    argv = [sys.executable, "-m", "shared.cli", "run", "--config", str(cfg_path)]
    argv += ["--summary-json", str(summary), "--run-dir", str(run_dir / "run")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        if started is not None:
            started()
        try:
            code = proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            _stop(proc)
            code = -1
        except BaseException:
            _stop(proc)
            raise
        finally:
            if finished is not None:
                finished()
    seconds = time.monotonic() - t0
    entries: list[dict[str, Any]] = []
    if summary.exists():
        try:
            entries = json.loads(summary.read_text()).get("steps", [])
        except json.JSONDecodeError:
            entries = []
    return code, seconds, entries, log_path


def run_once(
    base: dict[str, Any], variant: str, seed: int, steps: int, keep: bool, timeout_s: float
) -> dict[str, Any]:
    run_dir = Path(tempfile.mkdtemp(prefix=f"headrace-credit-{variant}-s{seed}-"))
    code, seconds, entries, log_path = headrace_run(
        run_config(base, variant, seed, steps), run_dir, timeout_s
    )
    result: dict[str, Any] = {
        "seed": seed,
        "code": code,
        "seconds": round(seconds, 1),
        "pass_rate": [float(e.get("pass_rate", 0.0)) for e in entries],
        "reward": [float(e.get("reward_mean", 0.0)) for e in entries],
    }
    if code != 0 or len(entries) < steps:
        last = log_path.read_text(errors="replace").splitlines()[-15:] if log_path.exists() else []
        result["error"] = f"exit {code}, {len(entries)}/{steps} steps"
        print(f"  run failed ({result['error']}); logs in {run_dir}", file=sys.stderr)
        print("\n".join("    " + line for line in last), file=sys.stderr)
    elif not keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return result


# ------------------------------------------------------------------ statistics


def moving_average(xs: list[float], window: int = WINDOW) -> list[float]:
    """Trailing means of full windows: out[i] is the mean of steps i+1 .. i+window (1-based)."""
    return [sum(xs[i : i + window]) / window for i in range(len(xs) - window + 1)]


def steps_to_threshold(xs: list[float], threshold: float, window: int = WINDOW) -> int | None:
    """The first (1-based) step whose trailing `window`-step average reaches `threshold`."""
    for i, m in enumerate(moving_average(xs, window)):
        if m >= threshold:
            return i + window
    return None


def mean_std(xs: list[float]) -> tuple[float, float]:
    if not xs:
        return float("nan"), float("nan")
    m = sum(xs) / len(xs)
    var = sum((x - m) ** 2 for x in xs) / (len(xs) - 1) if len(xs) > 1 else 0.0
    return m, math.sqrt(var)


def head(xs: list[float]) -> float:
    return sum(xs[:WINDOW]) / max(1, len(xs[:WINDOW]))


def tail(xs: list[float]) -> float:
    return sum(xs[-WINDOW:]) / max(1, len(xs[-WINDOW:]))


def summarise(
    runs: dict[str, list[dict[str, Any]]], steps: int, threshold: float | None
) -> tuple[dict[str, Any], float, dict[str, float]]:
    ok = {v: [r for r in rs if "error" not in r] for v, rs in runs.items()}
    ref = ok.get(BASELINE) or next((rs for rs in ok.values() if rs), [])
    base_initial = mean_std([head(r["pass_rate"]) for r in ref])[0]
    base_final = mean_std([tail(r["pass_rate"]) for r in ref])[0]
    if threshold is None:
        threshold = (base_initial + base_final) / 2
    out: dict[str, Any] = {}
    for v, rs in runs.items():
        per_seed = []
        for r in rs:
            row: dict[str, Any] = {"seed": r["seed"], "seconds": r["seconds"]}
            if "error" in r:
                row["error"] = r["error"]
            else:
                row.update(
                    initial_success=round(head(r["pass_rate"]), 4),
                    final_success=round(tail(r["pass_rate"]), 4),
                    final_reward=round(tail(r["reward"]), 4),
                    steps_to_threshold=steps_to_threshold(r["pass_rate"], threshold),
                    pass_rate=[round(x, 4) for x in r["pass_rate"]],
                )
            per_seed.append(row)
        good = [p for p in per_seed if "error" not in p]
        fs = mean_std([p["final_success"] for p in good])
        fr = mean_std([p["final_reward"] for p in good])
        reached = [p["steps_to_threshold"] for p in good]
        st = mean_std([float(s if s is not None else steps) for s in reached])
        out[v] = {
            "final_success_mean": round(fs[0], 4),
            "final_success_std": round(fs[1], 4),
            "steps_to_threshold_mean": round(st[0], 2),
            "steps_to_threshold_std": round(st[1], 2),
            "reached": f"{sum(s is not None for s in reached)}/{len(good)}",
            "final_reward_mean": round(fr[0], 4),
            "final_reward_std": round(fr[1], 4),
            "failed_runs": len(per_seed) - len(good),
            "per_seed": per_seed,
        }
    ref_stats = {"initial": round(base_initial, 4), "final": round(base_final, 4)}
    return out, threshold, ref_stats


def print_table(variants: dict[str, Any], threshold: float, steps: int) -> None:
    print(f"\nsuccess = pass rate (all turns right); final = mean of the last {WINDOW} steps;")
    print(f"steps to {threshold:.3f} = first step whose {WINDOW}-step average reaches it")
    print(f"(a seed that never does counts as {steps})\n")
    hdr = f"{'variant':<14} {'final success':>16} {'steps to thr':>16} {'reached':>8} "
    hdr += f"{'final reward':>16}   per-seed final / steps"
    print(hdr)
    print("-" * len(hdr))
    for name, s in variants.items():
        seeds = ", ".join(
            f"s{p['seed']}: "
            + ("failed" if "error" in p else f"{p['final_success']:.3f}/")
            + ("" if "error" in p else str(p["steps_to_threshold"] or "-"))
            for p in s["per_seed"]
        )
        print(
            f"{name:<14} {s['final_success_mean']:>8.3f} ± {s['final_success_std']:<5.3f} "
            f"{s['steps_to_threshold_mean']:>8.1f} ± {s['steps_to_threshold_std']:<5.1f} "
            f"{s['reached']:>8} {s['final_reward_mean']:>8.3f} ± {s['final_reward_std']:<5.3f}"
            f"   {seeds}"
        )


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 seeds x 30 steps (~15 min)")
    ap.add_argument("--seeds", type=int, help="seeds per variant (default 3; quick: 2)")
    ap.add_argument("--steps", type=int, help="learner steps per run (default 60; quick: 30)")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help="comma-separated")
    ap.add_argument("--threshold", type=float, help="success threshold (default: see doc)")
    ap.add_argument("--config", type=Path, default=BASE_CONFIG, help="base TOML config")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep every run's directory")
    args = ap.parse_args(argv)
    seeds = args.seeds or (2 if args.quick else 3)
    steps = args.steps or (30 if args.quick else 60)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        ap.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if steps < WINDOW:
        ap.error(f"--steps must be >= {WINDOW}")
    base = tomllib.loads(args.config.read_text())
    env_cfg = base.get("env", {})
    n_runs = seeds * len(variants)
    est = n_runs * (EST_STARTUP_S + steps * EST_STEP_S)
    print(
        f"credit: {len(variants)} variants x {seeds} seeds x {steps} steps = {n_runs} runs, "
        f"one at a time; estimated wall time ~{est / 60:.0f} min",
        flush=True,
    )
    print(f"env: {json.dumps(env_cfg, sort_keys=True)}", flush=True)
    timeout_s = 600.0 + steps * 20.0
    t_start = time.monotonic()
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    done = 0
    # Seed-major order: an interrupted benchmark still has every variant on the same seeds.
    for seed in range(args.first_seed, args.first_seed + seeds):
        for v in variants:
            r = run_once(base, v, seed, steps, args.keep, timeout_s)
            runs[v].append(r)
            done += 1
            elapsed = time.monotonic() - t_start
            left = elapsed / done * (n_runs - done)
            status = r.get("error") or (
                f"initial {head(r['pass_rate']):.3f} final {tail(r['pass_rate']):.3f} "
                f"reward {tail(r['reward']):.3f}"
            )
            print(
                f"[{done}/{n_runs}] {v} seed {seed}: {r['seconds']:.0f} s, {status}; "
                f"~{left / 60:.0f} min left",
                flush=True,
            )
    stats, threshold, ref = summarise(runs, steps, args.threshold)
    print_table(stats, threshold, steps)
    seconds = time.monotonic() - t_start
    print(f"\nbaseline ({BASELINE}) success: initial {ref['initial']}, final {ref['final']}")
    if ref["final"] <= ref["initial"]:
        print("the baseline did not improve: the threshold means nothing; use more --steps")
    print(f"total {seconds / 60:.1f} min")
    # The figure keys: method -> median over seeds (steps: None where any seed did
    # not reach the threshold, as the median is then not known).
    short = {"grpo_uniform": "grpo", "turn_level": "turn"}

    def median_steps(v: dict) -> float | None:
        s = [p.get("steps_to_threshold") for p in v["per_seed"] if "error" not in p]
        return None if not s or any(x is None for x in s) else float(statistics.median(s))

    result = {
        "steps_to_threshold": {short.get(k, k): median_steps(v) for k, v in stats.items()},
        "final_success": {
            short.get(k, k): round(
                statistics.median(p["final_success"] for p in v["per_seed"] if "error" not in p),
                4,
            )
            if any("error" not in p for p in v["per_seed"])
            else None
            for k, v in stats.items()
        },
        "variants": stats,
        "threshold": round(threshold, 4),
        "baseline": {**ref, "improved": ref["final"] > ref["initial"]},
        "seeds": list(range(args.first_seed, args.first_seed + seeds)),
        "steps": steps,
        "env": env_cfg,
        "success_metric": "pass_rate",
        "seconds": round(seconds, 1),
    }
    print(json.dumps(result))
    return 0 if all("error" not in r for rs in runs.values() for r in rs) else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Credit assignment: uniform GRPO vs ActFocus vs turn-level vs GiGPO, on a task a policy that
ignores the symbols cannot solve.

Runs the whole pipeline (`headrace run`: broker + learner + one vLLM actor on loopback, the
tiny model) once per (variant, seed), one run at a time, same steps and seeds for every
variant, on `ops/configs/credit.toml`: a permuted `symbols` level (shared/symbols.py; a
symbol-blind policy scores exactly chance), 2 turns, 1 free reasoning token and a
two-token action word per turn (its last token decides, so ActFocus's redistribution over
action tokens acts), 16 groups of 8 per step. Variants:

- grpo: GRPO advantages, every trained token weight 1 (the baseline);
- actfocus: GRPO advantages, `[learner.weighting] mode = "actfocus"` (reasoning tokens
  down-weighted, action weight moved towards uncertain action tokens);
- turn: `[learner.advantage] estimator = "turn_level"` (TRLOO), uniform token weights;
- gigpo: `[learner.advantage] estimator = "gigpo"`, uniform token weights.

The score is the learner summary's per-step `reward_mean` (mean per-turn accuracy of the
step's episodes). The threshold is absolute, 0.9 by default: the first step whose trailing
10-step moving average reaches it; a seed that never does counts as `steps` in the median.
The blind ceiling, computed exactly from the task bank (`SymbolsBank.blind_ceiling`), is
printed beside the results: a run that ends near it has learned nothing about the symbols.

Prints the estimated wall time first, a table at the end, and as its last line one JSON
object: `steps_to_threshold` (variant -> median over seeds), `reached` (variant -> seeds that
reached it), `final_reward` (variant -> mean of the last 10 steps, averaged over seeds),
`blind_ceiling`, `threshold`, `seeds`, `steps`, `per_seed`, `seconds`.

    python benchmarks/credit.py [--quick] [--seeds 3] [--steps 300] [--variants grpo,actfocus]
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/...`

from benchmarks.harness import (  # noqa: E402
    ROOT,
    WINDOW,
    headrace_run,
    loopback_run,
    median,
    report_failure,
    steps_to_threshold,
    tail,
)

BASE_CONFIG = ROOT / "ops" / "configs" / "credit.toml"

# name -> ([learner.advantage] overrides, [learner.weighting] overrides)
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "grpo": ({"estimator": "grpo"}, {"mode": "uniform"}),
    "actfocus": ({"estimator": "grpo"}, {"mode": "actfocus"}),
    "turn": ({"estimator": "turn_level"}, {"mode": "uniform"}),
    "gigpo": ({"estimator": "gigpo"}, {"mode": "uniform"}),
    "roles": ({"estimator": "grpo"}, {"mode": "roles"}),
}
DEFAULT_VARIANTS = ["grpo", "actfocus", "turn", "gigpo"]
# Per step on this 2-core box (128 episodes of 2 x 3 generated tokens, and the update),
# plus vLLM start-up and teardown; only the first estimate uses them, the progress lines
# extrapolate from the runs done.
EST_STARTUP_S = 45.0
EST_STEP_S = 1.5  # measured 480-580 s per 300-step run, start-up included


def run_config(base: dict[str, Any], variant: str, seed: int, steps: int) -> dict[str, Any]:
    cfg = loopback_run(copy.deepcopy(base), seed, steps)
    adv, weighting = VARIANTS[variant]
    cfg["learner"].setdefault("advantage", {}).update(adv)
    cfg["learner"].setdefault("weighting", {}).update(weighting)
    return cfg


def blind_ceiling(base: dict[str, Any], seed: int) -> dict[str, float]:
    """The bank's exact blind ceiling for `seed` (the bank the broker builds for that run)."""
    import msgspec

    from broker.curriculum.banks import SymbolsBank
    from shared.config import EnvConfig

    env = msgspec.convert({**base.get("env", {}), "seed": seed}, EnvConfig)
    return SymbolsBank(env).blind_ceiling()


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
        "reward": [round(float(e.get("reward_mean", 0.0)), 4) for e in entries],
        "pass_rate": [round(float(e.get("pass_rate", 0.0)), 4) for e in entries],
        "entropy_action": [round(float(e.get("entropy_action", -1.0)), 4) for e in entries],
    }
    if code != 0 or len(entries) < steps:
        result["error"] = f"exit {code}, {len(entries)}/{steps} steps"
        report_failure(result["error"], run_dir, log_path)
    elif not keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return result


def summarise(
    runs: dict[str, list[dict[str, Any]]], steps: int, threshold: float
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for v, rs in runs.items():
        good = [r for r in rs if "error" not in r]
        reached = [steps_to_threshold(r["reward"], threshold) for r in good]
        out[v] = {
            "steps_to_threshold": median([float(s or steps) for s in reached]),
            "reached": sum(s is not None for s in reached),
            "final_reward": round(sum(tail(r["reward"]) for r in good) / max(1, len(good)), 4),
            "final_pass": round(sum(tail(r["pass_rate"]) for r in good) / max(1, len(good)), 4),
            "failed_runs": len(rs) - len(good),
            "per_seed": {
                str(r["seed"]): {
                    "steps_to_threshold": s,
                    "final_reward": round(tail(r["reward"]), 4),
                    "seconds": r["seconds"],
                }
                for r, s in zip(good, reached, strict=True)
            },
        }
    return out


def print_table(stats: dict[str, Any], threshold: float, steps: int, ceiling: dict) -> None:
    print(f"\nreward = mean per-turn accuracy; final = mean of the last {WINDOW} steps")
    print(f"steps to {threshold} = first step whose {WINDOW}-step average reaches it")
    print(f"(a seed that never does counts as {steps})")
    print(
        f"blind ceiling (best policy ignoring the symbols): reward {ceiling['reward']:.3f}, "
        f"pass {ceiling['pass']:.3f}\n"
    )
    hdr = f"{'variant':<10} {'median steps':>13} {'reached':>8} {'final reward':>13}  per seed"
    print(hdr)
    print("-" * (len(hdr) + 30))
    for name, s in stats.items():
        seeds = ", ".join(
            f"s{k}: {p['steps_to_threshold'] or '-'} / {p['final_reward']:.3f}"
            for k, p in s["per_seed"].items()
        )
        n = len(s["per_seed"]) + s["failed_runs"]
        print(
            f"{name:<10} {s['steps_to_threshold']:>13.0f} {s['reached']:>5}/{n:<2} "
            f"{s['final_reward']:>13.3f}  {seeds}"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 seed of grpo and actfocus")
    ap.add_argument("--seeds", type=int, help="seeds per variant (default 3; quick: 1)")
    ap.add_argument("--steps", type=int, default=300, help="learner steps per run (>= 300)")
    ap.add_argument("--variants", help="comma-separated (default all four; quick: 2)")
    ap.add_argument(
        "--seeds-of",
        default="",
        help="fewer seeds for some variants, e.g. 'turn=1,gigpo=1' (their first N seeds)",
    )
    ap.add_argument("--threshold", type=float, default=0.9, help="reward threshold")
    ap.add_argument("--config", type=Path, default=BASE_CONFIG, help="base TOML config")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep every run's directory")
    args = ap.parse_args(argv)
    seeds = list(range(args.first_seed, args.first_seed + (args.seeds or (1 if args.quick else 3))))
    default = ["grpo", "actfocus"] if args.quick else DEFAULT_VARIANTS
    variants = [v.strip() for v in (args.variants or ",".join(default)).split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        ap.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if args.steps < WINDOW:
        ap.error(f"--steps must be >= {WINDOW}")
    few: dict[str, int] = {}
    for item in filter(None, (x.strip() for x in args.seeds_of.split(","))):
        name, _, n = item.partition("=")
        if name.strip() not in variants or not n.strip().isdigit():
            ap.error(f"--seeds-of: {item!r} is not VARIANT=N for one of {', '.join(variants)}")
        few[name.strip()] = int(n)
    plan = [(s, v) for i, s in enumerate(seeds) for v in variants if i < few.get(v, len(seeds))]
    base = tomllib.loads(args.config.read_text())
    ceilings = [blind_ceiling(base, s) for s in seeds]
    ceiling = {k: round(max(c[k] for c in ceilings), 4) for k in ("reward", "pass")}
    n_runs = len(plan)
    est = n_runs * (EST_STARTUP_S + args.steps * EST_STEP_S)
    print(
        f"credit: {len(variants)} variants x up to {len(seeds)} seeds x {args.steps} steps = "
        f"{n_runs} runs, one at a time; estimated wall time ~{est / 60:.0f} min",
        flush=True,
    )
    print(f"env: {json.dumps(base.get('env', {}), sort_keys=True)}", flush=True)
    print(f"blind ceiling: {ceiling}; threshold: reward >= {args.threshold}", flush=True)
    timeout_s = 600.0 + args.steps * 20.0
    t_start = time.monotonic()
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    done = 0
    # Seed-major order: an interrupted benchmark still has every variant on the same seeds.
    for seed, v in plan:
        r = run_once(base, v, seed, args.steps, args.keep, timeout_s)
        runs[v].append(r)
        done += 1
        left = (time.monotonic() - t_start) / done * (n_runs - done)
        status = r.get("error") or (
            f"final reward {tail(r['reward']):.3f}, "
            f"steps to {args.threshold}: {steps_to_threshold(r['reward'], args.threshold)}"
        )
        print(
            f"[{done}/{n_runs}] {v} seed {seed}: {r['seconds']:.0f} s, {status}; "
            f"~{left / 60:.0f} min left",
            flush=True,
        )
    stats = summarise(runs, args.steps, args.threshold)
    print_table(stats, args.threshold, args.steps, ceiling)
    seconds = time.monotonic() - t_start
    print(f"total {seconds / 60:.1f} min")
    result = {
        "steps_to_threshold": {k: v["steps_to_threshold"] for k, v in stats.items()},
        "reached": {k: v["reached"] for k, v in stats.items()},
        "final_reward": {k: v["final_reward"] for k, v in stats.items()},
        "final_pass": {k: v["final_pass"] for k, v in stats.items()},
        "blind_ceiling": ceiling,
        "threshold": args.threshold,
        "seeds": seeds,
        "steps": args.steps,
        "per_seed": {k: v["per_seed"] for k, v in stats.items()},
        "curves": {k: {str(r["seed"]): r["reward"] for r in rs} for k, rs in runs.items()},
        "env": base.get("env", {}),
        "seconds": round(seconds, 1),
    }
    print(json.dumps(result))
    return 0 if all("error" not in r for rs in runs.values() for r in rs) else 1


if __name__ == "__main__":
    raise SystemExit(main())

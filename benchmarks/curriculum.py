"""Curriculum: the curator vs uniform task sampling on a bank whose order matters.

Runs the whole pipeline (`headrace run`, the tiny model, one actor) once per (variant, seed),
one run at a time, the same steps and seeds for `[broker.curriculum] mode = "uniform"` and
`"curator"`, on `ops/configs/curriculum.toml` (its comments describe the bank): families of
one symbol map of rising difficulty, `easy` learnable from scratch, `mid` and `hard` (2 and 4
turns, reward only for a fully right episode) learnable once the map is known, `trivial` and
`noise` teaching nothing, sized so that uniform picking wastes most groups.

Score: held-out pass@1 on the target families (`--target`, default mid and hard), averaged
over them. The held-out set is fixed per seed: indices `size .. size + --eval-tasks - 1` of
each family (never leased in training) under the run's [env] seed (its symbol map). The final
checkpoint is loaded into `actor.engine.Engine` in a subprocess and each task played
`--eval-samples` times with `run_episode` at the training temperature / top_p / top_k.
Reported: mean and 95% interval over seeds (Student t) per variant and family, the held-out
set's exact blind ceiling, the paired difference curator - uniform with its interval, and
each family's groups (broker `Status`, last poll). Prints the estimated wall time first, and
as its last line one JSON object: `success_curator`, `success_uniform`, `ci95_curator`,
`ci95_uniform` (`[lo, hi]`), `separated` (curator's interval above uniform's), `diff`, `seeds`,
`steps`, `target`, `families`, `blind_ceiling`, `per_seed`, `train_pass_final`, `eval`, `env`,
`curriculum`, `seconds`.

    python benchmarks/curriculum.py [--quick] [--seeds 5] [--steps 150] [--target mid,hard]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import math
import shutil
import sys
import tempfile
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/...`

from benchmarks.harness import (  # noqa: E402
    ROOT,
    ci95_mean,
    headrace_run,
    loopback_run,
    mean_std,
    report_failure,
    tail,
)
from benchmarks.heldout import blind_ceilings, evaluate_checkpoint, heldout_tasks  # noqa: E402

BASE_CONFIG = ROOT / "ops" / "configs" / "curriculum.toml"
VARIANTS = ("uniform", "curator")
TARGET = "mid,hard"
# Cost of one run on a busy 2-core CPU box (start-up and teardown of `headrace run`, a learner
# step, the held-out evaluation with its own engine; measured 100-150 s and 120-140 s under
# load); only the first estimate uses them, the progress lines extrapolate from runs done.
EST_STARTUP_S = 100.0
EST_STEP_S = 1.5
EST_EVAL_S = 120.0


def run_config(base: dict[str, Any], variant: str, seed: int, steps: int) -> dict[str, Any]:
    cfg = loopback_run(copy.deepcopy(base), seed, steps)
    cfg["broker"].setdefault("curriculum", {}).update(mode=variant, seed=seed)
    # One checkpoint, at the end (the learner always writes one when it finishes).
    learner = cfg["learner"]
    learner["checkpoint_every"] = max(int(learner.get("checkpoint_every", 0)), steps + 1)
    return cfg


def snapshot_model(base: dict[str, Any], into: Path) -> None:
    """Point [model] path at a private copy: another job rebuilding the shared model directory
    (e.g. `.cache/models/tiny`) mid-benchmark would otherwise break a run's start."""
    model = base.get("model", {})
    src = ROOT / str(model.get("path", ""))
    if model.get("path") and (src / "config.json").is_file():
        shutil.copytree(src, into / "model")
        model["path"] = str(into / "model")


def _num(x: float, nd: int = 4) -> float | None:
    return None if math.isnan(x) else round(x, nd)


# ------------------------------------------------------------------ broker status


class StatusPoller(threading.Thread):
    """Polls the broker's `Status` every `every_s`; `groups`: family -> groups, newest poll."""

    def __init__(self, endpoint: str, every_s: float = 5.0) -> None:
        super().__init__(daemon=True)
        self.endpoint = endpoint
        self.every_s = every_s
        self.groups: dict[str, int] = {}
        self.halt = threading.Event()

    def run(self) -> None:
        from shared.cli import _status

        while not self.halt.wait(self.every_s):
            try:
                info = asyncio.run(_status(self.endpoint, 3.0))
            except Exception:  # not up yet, or already gone
                continue
            fams = (info.get("curriculum") or {}).get("families") or {}
            if fams:
                self.groups = {f: int(x.get("groups", 0)) for f, x in sorted(fams.items())}


# ------------------------------------------------------------------ one run


def run_once(
    base: dict[str, Any], variant: str, seed: int, spec: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    """One training run, then the held-out evaluation of its final checkpoint."""
    from learner.checkpoint import latest

    steps = args.steps
    run_dir = Path(tempfile.mkdtemp(prefix=f"headrace-curriculum-{variant}-s{seed}-"))
    cfg = run_config(base, variant, seed, steps)
    poller = StatusPoller(cfg["actor"]["broker"])
    code, train_seconds, entries, log_path = headrace_run(
        cfg, run_dir, 600.0 + steps * 20.0, started=poller.start, finished=poller.halt.set
    )
    result: dict[str, Any] = {
        "seed": seed,
        "train_seconds": round(train_seconds, 1),
        "pass_rate": [round(float(e.get("pass_rate", 0.0)), 4) for e in entries],
        "groups": poller.groups,
    }
    ckpt = latest(run_dir / "run" / "learner")
    if code != 0 or len(entries) < steps or ckpt is None:
        result["error"] = f"exit {code}, {len(entries)}/{steps} steps, checkpoint {ckpt}"
    else:
        t1 = time.monotonic()
        heldout = evaluate_checkpoint(ckpt, run_dir, {**spec, "seed": seed}, timeout_s=900.0)
        result["eval_seconds"] = round(time.monotonic() - t1, 1)
        if isinstance(heldout, str):
            result["error"] = heldout
        else:
            result["heldout"] = {f: round(x, 4) for f, x in heldout.items()}
    if "error" in result:
        report_failure(result["error"], run_dir, log_path)
    elif not args.keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return result


# ------------------------------------------------------------------ statistics


def target_success(heldout: dict[str, float], target: list[str]) -> float:
    return sum(heldout[f] for f in target) / len(target)


def interval(xs: list[float]) -> dict[str, Any]:
    """Mean and 95% interval of the mean (None where there are no values)."""
    if not xs:
        return {"mean": None, "ci95": [None, None], "n": 0}
    lo, hi = ci95_mean(xs)
    return {"mean": _num(mean_std(xs)[0]), "ci95": [_num(lo), _num(hi)], "n": len(xs)}


def summarise(
    runs: dict[str, list[dict[str, Any]]], target: list[str], families: list[str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(per variant: target interval, per-family intervals, per-seed rows; paired diff)."""
    out: dict[str, Any] = {}
    for v, rs in runs.items():
        good = [r for r in rs if "error" not in r]
        rows = [dict(r) for r in rs]
        for r, row in zip(rs, rows, strict=True):
            if "error" not in r:
                row["success"] = round(target_success(r["heldout"], target), 4)
                row["train_pass_final"] = round(tail(r["pass_rate"]), 4)
        out[v] = {
            "success": interval([target_success(r["heldout"], target) for r in good]),
            "families": {f: interval([r["heldout"][f] for r in good]) for f in families},
            "train_pass_final": _num(mean_std([tail(r["pass_rate"]) for r in good])[0]),
            "failed_runs": len(rs) - len(good),
            "per_seed": rows,
        }
    diff: dict[str, Any] = {"mean": None, "ci95": [None, None], "n": 0, "seeds": []}
    if set(VARIANTS) <= set(out):
        ok = {
            v: {p["seed"]: p["success"] for p in out[v]["per_seed"] if "error" not in p}
            for v in VARIANTS
        }
        both = sorted(set(ok["curator"]) & set(ok["uniform"]))
        diff = {**interval([ok["curator"][s] - ok["uniform"][s] for s in both]), "seeds": both}
    return out, diff


def _cell(s: dict[str, Any], width: int = 6) -> str:
    m, (lo, hi) = s["mean"], s["ci95"]
    if m is None:
        return f"{'-':>{width}} {'':<17}"
    return f"{m:>{width}.3f} [{lo:.3f}, {hi:.3f}]"


def print_table(
    stats: dict[str, Any], diff: dict[str, Any], target: list[str], ceiling: dict[str, float]
) -> None:
    families = list(ceiling)
    print("\nheld-out pass@1, mean [95% CI] over seeds; target = mean of " + ", ".join(target))
    hdr = f"{'variant':<9} {'target':>25} " + " ".join(f"{f:>25}" for f in families)
    print(hdr + f" {'train pass':>11}")
    print("-" * (len(hdr) + 12))
    for name, s in stats.items():
        cells = " ".join(f"{_cell(s['families'][f]):>25}" for f in families)
        train = s["train_pass_final"]
        train_cell = f"{train:>11.3f}" if train is not None else f"{'-':>11}"
        print(f"{name:<9} {_cell(s['success']):>25} {cells} {train_cell}")
    ceil_target = sum(ceiling[f] for f in target) / len(target)
    cells = " ".join(f"{ceiling[f]:>6.4f}{'':<19}" for f in families)
    print(f"{'blind':<9} {ceil_target:>6.4f}{'':<19} {cells}")
    if diff["n"]:
        lo, hi = diff["ci95"]
        print(
            f"\ncurator - uniform, paired over seeds {diff['seeds']}: "
            f"{diff['mean']:+.3f} [{lo:+.3f}, {hi:+.3f}]"
        )
    print("\nper seed: target (per family); groups per family (broker Status, last poll)")
    for name, s in stats.items():
        for p in s["per_seed"]:
            groups = ", ".join(f"{f} {n}" for f, n in p["groups"].items()) or "-"
            if "error" in p:
                print(f"  {name:<8} s{p['seed']}: failed ({p['error']}); {groups}")
                continue
            fams = ", ".join(f"{f} {x:.3f}" for f, x in p["heldout"].items())
            print(f"  {name:<8} s{p['seed']}: {p['success']:.3f} ({fams}); {groups}")


# ------------------------------------------------------------------ main


def run_all(
    base: dict[str, Any], args: argparse.Namespace, seeds: list[int], spec: dict[str, Any]
) -> dict[str, list[dict[str, Any]]]:
    """Every (seed, variant) run, seed-major: an interrupted benchmark still has both variants
    on the same seeds. Prints a line per run."""
    t_start, done = time.monotonic(), 0
    n_runs = len(seeds) * len(args.variants)
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in args.variants}
    snap = Path(tempfile.mkdtemp(prefix="headrace-curriculum-model-"))
    try:
        snapshot_model(base, snap)
        for seed in seeds:
            for v in args.variants:
                r = run_once(base, v, seed, spec, args)
                runs[v].append(r)
                done += 1
                left = (time.monotonic() - t_start) / done * (n_runs - done)
                status = r.get("error") or (
                    f"held-out {target_success(r['heldout'], args.target):.3f} {r['heldout']}; "
                    f"train pass {tail(r['pass_rate']):.3f}; groups {r['groups']}"
                )
                print(
                    f"[{done}/{n_runs}] {v} seed {seed}: {r['train_seconds']:.0f} s + eval "
                    f"{r.get('eval_seconds', 0):.0f} s, {status}; ~{left / 60:.0f} min left",
                    flush=True,
                )
    finally:
        shutil.rmtree(snap, ignore_errors=True)
    return runs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 seed x 40 steps, the same bank")
    ap.add_argument("--seeds", type=int, help="seeds per variant (default 5; quick: 1)")
    ap.add_argument("--steps", type=int, help="learner steps per run (default 150; quick: 40)")
    ap.add_argument("--target", default=TARGET, help="families scored (comma-separated)")
    ap.add_argument("--config", type=Path, default=BASE_CONFIG, help="base TOML config")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--eval-tasks", type=int, default=128, help="held-out tasks per family")
    ap.add_argument("--eval-samples", type=int, default=4, help="episodes per held-out task")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    ap.add_argument("--keep", action="store_true", help="keep every run's directory")
    args = ap.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not args.variants or any(v not in VARIANTS for v in args.variants):
        ap.error(f"--variants: choose from {', '.join(VARIANTS)}")
    args.seeds = args.seeds or (1 if args.quick else 5)
    args.steps = args.steps or (40 if args.quick else 150)
    if args.steps < 1 or args.seeds < 1 or min(args.eval_tasks, args.eval_samples) < 1:
        ap.error("--seeds, --steps, --eval-tasks and --eval-samples must be >= 1")
    args.target = [f.strip() for f in args.target.split(",") if f.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base = tomllib.loads(args.config.read_text())
    env_cfg, actor = base.get("env", {}), base.get("actor", {})
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    # The held-out answer sequences depend on the indices only; the ceiling is the same per seed.
    ceiling = blind_ceilings(heldout_tasks(env_cfg, seeds[0], args.eval_tasks))
    if not args.target or any(f not in ceiling for f in args.target):
        raise SystemExit(f"--target: choose from the learnable families {list(ceiling)}")
    spec = {
        "env": env_cfg,
        "tasks": args.eval_tasks,
        "samples": args.eval_samples,
        "temperature": float(actor.get("temperature", 1.0)),
        "top_p": float(actor.get("top_p", 1.0)),
        "top_k": int(actor.get("top_k", 0)),
        "max_model_len": int(actor.get("max_model_len", 256)),
    }
    n_runs = len(seeds) * len(args.variants)
    est = n_runs * (EST_STARTUP_S + args.steps * EST_STEP_S + EST_EVAL_S)
    print(
        f"curriculum: {len(args.variants)} variants x {len(seeds)} seeds x {args.steps} steps "
        f"= {n_runs} runs + held-out evaluations, one at a time; "
        f"estimated wall time ~{est / 60:.0f} min",
        flush=True,
    )
    print(f"env: {json.dumps(env_cfg, sort_keys=True)}", flush=True)
    print(f"curriculum: {json.dumps(base.get('broker', {}).get('curriculum', {}))}", flush=True)
    print(
        f"held-out: {args.eval_tasks} tasks x {args.eval_samples} samples per family, "
        f"target {args.target}; blind ceiling (pass) {ceiling}",
        flush=True,
    )
    t_start = time.monotonic()
    runs = run_all(base, args, seeds, spec)
    stats, diff = summarise(runs, args.target, list(ceiling))
    print_table(stats, diff, args.target, ceiling)
    seconds = time.monotonic() - t_start
    print(f"total {seconds / 60:.1f} min")
    print(json.dumps(result_json(args, stats, diff, ceiling, base, seeds, seconds)))
    return 0 if all("error" not in r for rs in runs.values() for r in rs) else 1


def result_json(
    args: argparse.Namespace,
    stats: dict[str, Any],
    diff: dict[str, Any],
    ceiling: dict[str, float],
    base: dict[str, Any],
    seeds: list[int],
    seconds: float,
) -> dict[str, Any]:
    none = {"mean": None, "ci95": [None, None], "n": 0}
    cur, uni = (stats.get(v, {}).get("success", none) for v in ("curator", "uniform"))
    separated = None  # an interval needs two seeds per variant
    if min(cur["n"], uni["n"]) >= 2:
        separated = cur["ci95"][0] > uni["ci95"][1]
    return {
        "success_curator": cur["mean"],
        "success_uniform": uni["mean"],
        "ci95_curator": cur["ci95"],
        "ci95_uniform": uni["ci95"],
        "separated": separated,
        "diff": diff,
        "seeds": seeds,
        "steps": args.steps,
        "target": args.target,
        "families": {v: s["families"] for v, s in stats.items()},
        "blind_ceiling": {
            "target": round(sum(ceiling[f] for f in args.target) / len(args.target), 4),
            **{f: round(x, 4) for f, x in ceiling.items()},
        },
        "per_seed": {v: s["per_seed"] for v, s in stats.items()},
        "train_pass_final": {v: s["train_pass_final"] for v, s in stats.items()},
        "eval": {"tasks_per_family": args.eval_tasks, "samples_per_task": args.eval_samples},
        "env": base.get("env", {}),
        "curriculum": base.get("broker", {}).get("curriculum", {}),
        "seconds": round(seconds, 1),
    }


if __name__ == "__main__":
    raise SystemExit(main())

"""Curriculum: the curator vs uniform task sampling on a mixed-difficulty bank.

Runs the whole pipeline (`headrace run`: broker + learner + one vLLM actor on loopback, the
tiny model) on a `symbols` bank that mixes a trivial level, a learnable one and levels too hard
for the tiny model (`ops/configs/curriculum.toml`: levels 0, 1, 3, 4, 64 tasks each, 2 turns,
2 reasoning tokens per turn), once per (variant, seed), one run at a time, the same learner
steps and seeds for both variants:

- uniform: `[broker.curriculum] mode = "uniform"` (every task equally likely);
- curator: `mode = "curator"` with the config's pool_size / arm_by / tau / eta (family arms,
  the whole bank as the pool; see the config for why).

Evaluation is on a FIXED HELD-OUT set: the same families built by `SymbolsBank` under another
`[env] seed` (`--heldout-seed`, never a training seed), `--eval-tasks` tasks per family, each
played `--eval-samples` times at temperature 1 (the policy as trained, not its greedy mode), by
loading the run's final learner checkpoint into `actor.engine.Engine` (in a subprocess) and
calling `run_episode`. Success = every turn right; it reports per-family held-out success and
the overall mean over families (each family weighs the same).

Training speed comes from the learner summary's per-step `pass_rate` as in `credit.py`: steps
until its trailing 10-step average reaches a threshold midway between the uniform baseline's
initial and final pass rate (a seed that never does counts as `steps`). Caveat: the training
pass rate is over the tasks each variant chose to play, so a curator that stops drawing the
trivial L0 lowers its own pass rate; the held-out numbers are the comparable ones. While a run
goes, the broker's `Status` is polled for the per-family group counts (the curator's picks).

Each run gets free ports and its own temporary directory (removed unless `--keep`). Prints a
table, and as its last line one JSON object: `success_curator`, `success_uniform` (mean
held-out success over seeds), `seeds`, `steps`, `families`, `variants` (per variant: held-out
success mean/std overall and per family, steps to threshold, final training pass rate,
per-seed values with pick counts), `threshold`, `eval`, `env`, `curriculum`, `seconds`.

    python benchmarks/curriculum.py [--quick] [--seeds 3] [--steps 60]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/...`

from benchmarks.credit import (  # noqa: E402
    WINDOW,
    _stop,
    free_port,
    head,
    headrace_run,
    mean_std,
    steps_to_threshold,
    tail,
)

ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = ROOT / "ops" / "configs" / "curriculum.toml"
VARIANTS = ("uniform", "curator")
BASELINE = "uniform"
HELDOUT_SEED = 1_000_003  # [env] seed of the held-out tasks; training uses seeds 0, 1, ...

# Measured cost of one run on a busy 2-core CPU box (vLLM start-up + teardown, per step, and
# the held-out evaluation); only the first estimate uses them.
EST_STARTUP_S = 60.0
EST_STEP_S = 3.0
EST_EVAL_S = 60.0


# ------------------------------------------------------------------ config


def run_config(base: dict[str, Any], variant: str, seed: int, steps: int) -> dict[str, Any]:
    cfg = copy.deepcopy(base)
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    cfg.setdefault("env", {})["seed"] = seed
    broker = cfg.setdefault("broker", {})
    broker.update(port=port, metrics_port=0)
    broker.setdefault("replay", {})["seed"] = seed
    broker.setdefault("curriculum", {}).update(mode=variant, seed=seed)
    cfg.setdefault("actor", {}).update(broker=endpoint, metrics_port=0, seed=seed)
    learner = cfg.setdefault("learner", {})
    learner.update(broker=endpoint, metrics_port=0, weights_port=0, steps=steps, seed=seed)
    # One checkpoint, at the end (the learner always writes one when it finishes).
    learner["checkpoint_every"] = max(int(learner.get("checkpoint_every", 0)), steps + 1)
    return cfg


# ------------------------------------------------------------------ broker status


class StatusPoller(threading.Thread):
    """Polls the broker's `Status` every `every_s`; `last` keeps the newest curriculum info."""

    def __init__(self, endpoint: str, every_s: float = 15.0) -> None:
        super().__init__(daemon=True)
        self.endpoint = endpoint
        self.every_s = every_s
        self.last: dict[str, Any] | None = None
        self.halt = threading.Event()

    def run(self) -> None:
        from shared.cli import _status

        while not self.halt.wait(self.every_s):
            try:
                info = asyncio.run(_status(self.endpoint, 3.0))
            except Exception:  # not up yet, or already gone
                continue
            if info.get("curriculum"):
                self.last = info["curriculum"]


def family_groups(curriculum: dict[str, Any] | None) -> dict[str, int]:
    fams = (curriculum or {}).get("families") or {}
    return {name: int(f.get("groups", 0)) for name, f in sorted(fams.items())}


# ------------------------------------------------------------------ held-out evaluation


def heldout_tasks(env_cfg: dict[str, Any], heldout_seed: int, n: int) -> dict[str, list[Any]]:
    """family -> its first `n` tasks under [env] seed = `heldout_seed`."""
    import msgspec

    from broker.curriculum.banks import SymbolsBank
    from shared.config import EnvConfig

    if env_cfg.get("name", "symbols") != "symbols":
        raise SystemExit("curriculum benchmark: the held-out set is built for [env] symbols")
    env = msgspec.convert({**env_cfg, "seed": heldout_seed}, EnvConfig)
    bank = SymbolsBank(env)
    return {p.family.name: [p.make(i) for i in range(n)] for p in bank.parts}


async def _evaluate(
    model: str, tasks: dict[str, list[Any]], samples: int, max_model_len: int, seed: int
) -> dict[str, float]:
    from transformers import AutoTokenizer

    from actor.engine import Engine
    from actor.envs import make_env
    from actor.episode import run_episode
    from shared import protocol as P

    tokenizer = AutoTokenizer.from_pretrained(model)
    engine = Engine(model, seed=seed, max_model_len=max_model_len, max_num_seqs=64)
    slots = asyncio.Semaphore(64)

    async def one(task: P.TaskSpec, k: int) -> bool:
        async with slots:
            lease = P.Lease(lease_id=f"eval-{task.task_id}", task=task, group_size=1, deadline_s=0)
            traj = await run_episode(
                engine,
                make_env(task, episode_seed=k),
                tokenizer,
                lease,
                "eval",
                temperature=1.0,
                max_model_len=max_model_len,
                bos_id=tokenizer.bos_token_id,
            )
            return bool(traj.success)

    try:
        out: dict[str, float] = {}
        for family, fam_tasks in tasks.items():
            wins = await asyncio.gather(*(one(t, k) for t in fam_tasks for k in range(samples)))
            out[family] = sum(wins) / len(wins)
        return out
    finally:
        engine.shutdown()


def eval_main(args: argparse.Namespace) -> int:
    """The evaluation subprocess: `--eval-model DIR`, writes per-family success to --eval-out."""
    spec = json.loads(Path(args.eval_spec).read_text())
    tasks = heldout_tasks(spec["env"], spec["heldout_seed"], spec["tasks"])
    success = asyncio.run(
        _evaluate(args.eval_model, tasks, spec["samples"], spec["max_model_len"], spec["seed"])
    )
    Path(args.eval_out).write_text(json.dumps(success))
    return 0


def evaluate_checkpoint(
    ckpt: Path, run_dir: Path, spec: dict[str, Any], timeout_s: float
) -> dict[str, float] | str:
    """Per-family held-out success of `ckpt`, or an error string."""
    spec_path, out_path = run_dir / "eval_spec.json", run_dir / "eval.json"
    spec_path.write_text(json.dumps(spec))
    argv = [sys.executable, str(Path(__file__).resolve()), "--eval-model", str(ckpt)]
    argv += ["--eval-spec", str(spec_path), "--eval-out", str(out_path)]
    log_path = run_dir / "eval.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            _stop(proc)
            code = -1
        except BaseException:
            _stop(proc)
            raise
    if code != 0 or not out_path.exists():
        last = log_path.read_text(errors="replace").splitlines()[-10:]
        print("\n".join("    " + line for line in last), file=sys.stderr)
        return f"evaluation exit {code}"
    return {k: float(v) for k, v in json.loads(out_path.read_text()).items()}


# ------------------------------------------------------------------ one run


def run_once(
    base: dict[str, Any],
    variant: str,
    seed: int,
    steps: int,
    spec: dict[str, Any],
    keep: bool,
    timeout_s: float,
) -> dict[str, Any]:
    from learner.checkpoint import latest

    run_dir = Path(tempfile.mkdtemp(prefix=f"headrace-curriculum-{variant}-s{seed}-"))
    cfg = run_config(base, variant, seed, steps)
    poller = StatusPoller(cfg["actor"]["broker"])
    code, train_seconds, entries, log_path = headrace_run(
        cfg, run_dir, timeout_s, started=poller.start, finished=poller.halt.set
    )
    result: dict[str, Any] = {
        "seed": seed,
        "code": code,
        "train_seconds": round(train_seconds, 1),
        "pass_rate": [float(e.get("pass_rate", 0.0)) for e in entries],
        "reward": [float(e.get("reward_mean", 0.0)) for e in entries],
        "groups": family_groups(poller.last),
    }
    ckpt = latest(run_dir / "run" / "learner")
    if code != 0 or len(entries) < steps or ckpt is None:
        result["error"] = f"exit {code}, {len(entries)}/{steps} steps, checkpoint {ckpt}"
    else:
        t1 = time.monotonic()
        heldout = evaluate_checkpoint(ckpt, run_dir, spec, timeout_s=600.0)
        result["eval_seconds"] = round(time.monotonic() - t1, 1)
        if isinstance(heldout, str):
            result["error"] = heldout
        else:
            result["heldout"] = heldout
    if "error" in result:
        last = log_path.read_text(errors="replace").splitlines()[-15:] if log_path.exists() else []
        print(f"  run failed ({result['error']}); logs in {run_dir}", file=sys.stderr)
        print("\n".join("    " + line for line in last), file=sys.stderr)
    elif not keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return result


# ------------------------------------------------------------------ statistics


def overall(heldout: dict[str, float]) -> float:
    return sum(heldout.values()) / len(heldout)


def summarise(
    runs: dict[str, list[dict[str, Any]]], families: list[str], steps: int, threshold: float | None
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
            row: dict[str, Any] = {"seed": r["seed"], "train_seconds": r["train_seconds"]}
            row["groups"] = r["groups"]
            if "error" in r:
                row["error"] = r["error"]
            else:
                row.update(
                    heldout_success=round(overall(r["heldout"]), 4),
                    heldout=r["heldout"],
                    initial_pass_rate=round(head(r["pass_rate"]), 4),
                    final_pass_rate=round(tail(r["pass_rate"]), 4),
                    steps_to_threshold=steps_to_threshold(r["pass_rate"], threshold),
                    eval_seconds=r["eval_seconds"],
                    pass_rate=[round(x, 4) for x in r["pass_rate"]],
                )
            per_seed.append(row)
        good = [p for p in per_seed if "error" not in p]
        hs = mean_std([p["heldout_success"] for p in good])
        fam = {f: mean_std([p["heldout"].get(f, float("nan")) for p in good]) for f in families}
        fp = mean_std([p["final_pass_rate"] for p in good])
        reached = [p["steps_to_threshold"] for p in good]
        st = mean_std([float(s if s is not None else steps) for s in reached])
        out[v] = {
            "heldout_success_mean": round(hs[0], 4),
            "heldout_success_std": round(hs[1], 4),
            "heldout_by_family": {
                f: {"mean": round(m, 4), "std": round(s, 4)} for f, (m, s) in fam.items()
            },
            "steps_to_threshold_mean": round(st[0], 2),
            "steps_to_threshold_std": round(st[1], 2),
            "reached": f"{sum(s is not None for s in reached)}/{len(good)}",
            "final_pass_rate_mean": round(fp[0], 4),
            "final_pass_rate_std": round(fp[1], 4),
            "failed_runs": len(per_seed) - len(good),
            "per_seed": per_seed,
        }
    return out, threshold, {"initial": round(base_initial, 4), "final": round(base_final, 4)}


def print_table(
    variants: dict[str, Any], families: list[str], threshold: float, steps: int
) -> None:
    print("\nheld-out success (all turns right, temperature 1), mean ± std over seeds;")
    print(f"steps to {threshold:.3f} = first step whose {WINDOW}-step training pass rate reaches")
    print(
        f"it (a seed that never does counts as {steps}); train = last {WINDOW} steps' pass rate\n"
    )
    cols = [f"{'variant':<9}", f"{'held-out':>14}"] + [f"{f:>13}" for f in families]
    cols += [f"{'steps to thr':>14}", f"{'reached':>7}", f"{'train':>13}"]
    hdr = " ".join(cols)
    print(hdr)
    print("-" * len(hdr))
    for name, s in variants.items():
        fam = s["heldout_by_family"]
        cells = [
            f"{name:<9}",
            f"{s['heldout_success_mean']:>6.3f} ± {s['heldout_success_std']:<5.3f}",
        ]
        cells += [f"{fam[f]['mean']:>5.3f} ± {fam[f]['std']:<5.3f}" for f in families]
        cells += [
            f"{s['steps_to_threshold_mean']:>6.1f} ± {s['steps_to_threshold_std']:<5.1f}",
            f"{s['reached']:>7}",
            f"{s['final_pass_rate_mean']:>5.3f} ± {s['final_pass_rate_std']:<5.3f}",
        ]
        print(" ".join(cells))
    print("\nper seed: held-out overall / steps to threshold / groups per family (training picks)")
    for name, s in variants.items():
        for p in s["per_seed"]:
            if "error" in p:
                print(f"  {name:<8} s{p['seed']}: failed ({p['error']})")
                continue
            picks = ", ".join(f"{f} {n}" for f, n in p["groups"].items()) or "-"
            print(
                f"  {name:<8} s{p['seed']}: {p['heldout_success']:.3f} / "
                f"{p['steps_to_threshold'] or '-'} / {picks}"
            )


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 seeds x 30 steps (~15 min)")
    ap.add_argument("--seeds", type=int, help="seeds per variant (default 3; quick: 2)")
    ap.add_argument("--steps", type=int, help="learner steps per run (default 60; quick: 30)")
    ap.add_argument("--threshold", type=float, help="training pass-rate threshold (see doc)")
    ap.add_argument("--config", type=Path, default=BASE_CONFIG, help="base TOML config")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--eval-tasks", type=int, default=32, help="held-out tasks per family")
    ap.add_argument("--eval-samples", type=int, default=4, help="episodes per held-out task")
    ap.add_argument("--heldout-seed", type=int, default=HELDOUT_SEED)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    ap.add_argument("--keep", action="store_true", help="keep every run's directory")
    # internal: the evaluation subprocess
    ap.add_argument("--eval-model", help=argparse.SUPPRESS)
    ap.add_argument("--eval-spec", help=argparse.SUPPRESS)
    ap.add_argument("--eval-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.eval_model:
        return eval_main(args)
    seeds = args.seeds or (2 if args.quick else 3)
    steps = args.steps or (30 if args.quick else 60)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants or any(v not in VARIANTS for v in variants):
        ap.error(f"--variants: choose from {', '.join(VARIANTS)}")
    if steps < WINDOW:
        ap.error(f"--steps must be >= {WINDOW}")
    seed_list = list(range(args.first_seed, args.first_seed + seeds))
    if args.heldout_seed in seed_list:
        ap.error("--heldout-seed must differ from every training seed")
    base = tomllib.loads(args.config.read_text())
    env_cfg = base.get("env", {})
    families = list(heldout_tasks(env_cfg, args.heldout_seed, 1))
    spec = {
        "env": env_cfg,
        "heldout_seed": args.heldout_seed,
        "tasks": args.eval_tasks,
        "samples": args.eval_samples,
        "max_model_len": int(base.get("actor", {}).get("max_model_len", 256)),
        "seed": 0,
    }
    n_runs = seeds * len(variants)
    est = n_runs * (EST_STARTUP_S + steps * EST_STEP_S + EST_EVAL_S)
    print(
        f"curriculum: {len(variants)} variants x {seeds} seeds x {steps} steps = {n_runs} runs "
        f"+ held-out evaluations, one at a time; estimated wall time ~{est / 60:.0f} min",
        flush=True,
    )
    print(f"env: {json.dumps(env_cfg, sort_keys=True)}", flush=True)
    print(f"curriculum: {json.dumps(base.get('broker', {}).get('curriculum', {}))}", flush=True)
    timeout_s = 600.0 + steps * 20.0
    t_start = time.monotonic()
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    done = 0
    # Seed-major order: an interrupted benchmark still has both variants on the same seeds.
    for seed in seed_list:
        for v in variants:
            r = run_once(base, v, seed, steps, spec, args.keep, timeout_s)
            runs[v].append(r)
            done += 1
            elapsed = time.monotonic() - t_start
            left = elapsed / done * (n_runs - done)
            status = r.get("error") or (
                f"held-out {overall(r['heldout']):.3f} "
                f"({', '.join(f'{f} {x:.2f}' for f, x in r['heldout'].items())}); "
                f"train pass rate {head(r['pass_rate']):.3f} -> {tail(r['pass_rate']):.3f}; "
                f"groups {r['groups']}"
            )
            print(
                f"[{done}/{n_runs}] {v} seed {seed}: {r['train_seconds']:.0f} s "
                f"+ eval {r.get('eval_seconds', 0):.0f} s, {status}; ~{left / 60:.0f} min left",
                flush=True,
            )
    stats, threshold, ref = summarise(runs, families, steps, args.threshold)
    print_table(stats, families, threshold, steps)
    seconds = time.monotonic() - t_start
    print(
        f"\nbaseline ({BASELINE}) training pass rate: initial {ref['initial']}, "
        f"final {ref['final']}"
    )
    print(f"total {seconds / 60:.1f} min")

    def pick(v: str, key: str) -> Any:
        return stats[v][key] if v in stats else None

    result = {
        "success_curator": pick("curator", "heldout_success_mean"),
        "success_uniform": pick("uniform", "heldout_success_mean"),
        "success_curator_std": pick("curator", "heldout_success_std"),
        "success_uniform_std": pick("uniform", "heldout_success_std"),
        "seeds": seed_list,
        "steps": steps,
        "families": families,
        "variants": stats,
        "threshold": round(threshold, 4),
        "baseline_pass_rate": ref,
        "eval": {
            "heldout_env_seed": args.heldout_seed,
            "tasks_per_family": args.eval_tasks,
            "samples_per_task": args.eval_samples,
            "temperature": 1.0,
            "success": "all turns right; overall = mean over families",
        },
        "env": env_cfg,
        "curriculum": base.get("broker", {}).get("curriculum", {}),
        "seconds": round(seconds, 1),
    }
    print(json.dumps(result))
    return 0 if all("error" not in r for rs in runs.values() for r in rs) else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Held-out evaluation for `curriculum.py`: the tasks a run never trained on, their exact
blind ceiling, and a checkpoint's success on them, played by `actor.engine.Engine` in a
subprocess of its own (so the engine's memory goes back when it is done).

    python benchmarks/heldout.py --model CKPT --spec SPEC.json --out OUT.json

SPEC holds `env` (the [env] table), `seed`, `tasks` (per family), `samples` (episodes per
task), `temperature`, `top_p`, `top_k`, `max_model_len`; OUT gets family -> success rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/...`

from benchmarks.harness import ROOT, stop  # noqa: E402

EVAL_SEQS = 256  # concurrent held-out episodes (the tiny model batches them cheaply)


# ------------------------------------------------------------------ held-out set


def heldout_tasks(env_cfg: dict[str, Any], seed: int, n: int) -> dict[str, list[Any]]:
    """Learnable family -> its tasks `size .. size + n - 1` under [env] seed = `seed` (the
    training bank's symbol map; indices it never leases). Trivial and noise families are
    left out: there is nothing to measure on them."""
    import msgspec

    from broker.curriculum.banks import SymbolsBank
    from shared import symbols as S
    from shared.config import EnvConfig

    if env_cfg.get("name", "symbols") != "symbols":
        raise SystemExit("curriculum benchmark: the held-out set is built for [env] symbols")
    bank = SymbolsBank(msgspec.convert({**env_cfg, "seed": seed}, EnvConfig))
    out = {}
    for p in bank.parts:
        level = int(p.make(0).payload["level"])
        if level not in (0, S.NOISE_LEVEL):
            out[p.family.name] = [p.make(p.family.size + i) for i in range(n)]
    return out


def blind_ceilings(tasks: dict[str, list[Any]]) -> dict[str, float]:
    from broker.curriculum.banks import symbols_blind_ceiling

    return {f: symbols_blind_ceiling(ts)["pass"] for f, ts in tasks.items()}


# ------------------------------------------------------------------ held-out evaluation


async def _evaluate(ckpt: str, tasks: dict[str, list[Any]], spec: dict[str, Any]) -> dict:
    from transformers import AutoTokenizer

    from actor.engine import Engine
    from actor.envs import make_env
    from actor.episode import run_episode, special_prefix
    from shared import protocol as P

    max_len = int(spec["max_model_len"])
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    engine = Engine(ckpt, seed=int(spec["seed"]), max_model_len=max_len, max_num_seqs=EVAL_SEQS)
    slots = asyncio.Semaphore(EVAL_SEQS)
    prefix = special_prefix(tokenizer)  # once, not per episode

    async def one(task: P.TaskSpec, k: int) -> bool:
        async with slots:
            lease = P.Lease(lease_id=f"eval-{task.task_id}", task=task, group_size=1, deadline_s=0)
            traj = await run_episode(
                engine,
                make_env(task, episode_seed=k),
                tokenizer,
                lease,
                "eval",
                temperature=float(spec["temperature"]),
                top_p=float(spec["top_p"]),
                top_k=int(spec["top_k"]),  # 0: off, as in [actor]
                max_model_len=max_len,
                prefix_ids=prefix,
            )
            return bool(traj.success)

    try:  # every family at once: full batches
        keys = [(f, t, k) for f, ts in tasks.items() for t in ts for k in range(spec["samples"])]
        results = await asyncio.gather(*(one(t, k) for _, t, k in keys))
        wins: dict[str, list[bool]] = {f: [] for f in tasks}
        for (f, _, _), w in zip(keys, results, strict=True):
            wins[f].append(w)
        return {f: sum(w) / len(w) for f, w in wins.items()}
    finally:
        engine.shutdown()


def evaluate_checkpoint(
    ckpt: Path, run_dir: Path, spec: dict[str, Any], timeout_s: float
) -> dict[str, float] | str:
    """Per-family held-out success of `ckpt`, or an error string."""
    spec_path, out_path = run_dir / "eval_spec.json", run_dir / "eval.json"
    spec_path.write_text(json.dumps(spec))
    argv = [sys.executable, str(Path(__file__).resolve()), "--model", str(ckpt)]
    argv += ["--spec", str(spec_path), "--out", str(out_path)]
    log_path = run_dir / "eval.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            code = -1
        finally:
            stop(proc)  # a no-op once it has exited
    if code != 0 or not out_path.exists():
        last = log_path.read_text(errors="replace").splitlines()[-10:]
        print("\n".join("    " + line for line in last), file=sys.stderr)
        return f"evaluation exit {code}"
    return {k: float(v) for k, v in json.loads(out_path.read_text()).items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--model", required=True, help="checkpoint directory")
    ap.add_argument("--spec", required=True, help="the evaluation's JSON spec")
    ap.add_argument("--out", required=True, help="where family -> success goes (JSON)")
    args = ap.parse_args(argv)
    spec = json.loads(Path(args.spec).read_text())
    tasks = heldout_tasks(spec["env"], spec["seed"], spec["tasks"])
    success = asyncio.run(_evaluate(args.model, tasks, spec))
    Path(args.out).write_text(json.dumps(success))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

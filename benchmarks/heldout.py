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
    """Family -> success rate (pass@1) of `spec["samples"]` episodes per task, played by
    `actor.evaluate` (as `headrace eval` plays them) on raw-text prompts."""
    from transformers import AutoTokenizer

    from actor.build import TextFormat
    from actor.engine import Engine
    from actor.episode import special_prefix
    from actor.evaluate import play_tasks
    from shared import passk
    from shared.config import ActorConfig

    max_len = int(spec["max_model_len"])
    sampling = {k: spec[k] for k in ("temperature", "top_p", "top_k")}  # top_k 0: off
    ac = ActorConfig(max_model_len=max_len, **sampling)
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    text = TextFormat(tokenizer, special_prefix(tokenizer), None)
    engine = Engine(ckpt, seed=int(spec["seed"]), max_model_len=max_len, max_num_seqs=EVAL_SEQS)
    try:  # every family at once: full batches
        flat = [t for ts in tasks.values() for t in ts]
        results = await play_tasks(
            engine, text, ac, flat, int(spec["samples"]), concurrency=EVAL_SEQS
        )
        _, by_family = passk.score_by_family(results)
        return {f: by_family[f].pass_at_1 for f in tasks}
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

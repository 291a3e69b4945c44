"""Learner step throughput with packed micro-batches (`[learner] packing = true`) vs
right-padded rows (`false`), same model, same batch, measured in the same run.

The batch has a realistic length skew: episode lengths drawn long-tailed (Pareto, most short,
a few near `--max-len`, one at it), GRPO groups of 4 with mixed rewards. Each model gets one
warm-up step per variant, then `--repeats` timed steps of each, interleaved (the order flips
every repeat, so drift in a shared machine's load hits both alike); the figure is the median.
The optimiser is SGD with lr 0, so the weights never move and every step of either variant
sees the same policy: the losses of the two variants must agree (float32); their largest
difference is reported, with the largest per-token logprob difference. tokens/s counts the
batch's real tokens (prompt and trained) per second of `Trainer.step`; the default
`micro_batch_tokens` (16384) applies to both.

    python benchmarks/packing.py [--models tiny,smollm2] [--episodes 32] [--max-len 512]
        [--smollm2-episodes 8] [--smollm2-max-len 256] [--repeats 3]

SmolLM2-135M comes from `headrace models smollm2` (.cache/models/smollm2-135m); a model
directory that is missing is skipped with a note. The goal is speedup >= 1.5. The last line is
one JSON object: `speedup` (the smallest tokens/s ratio packed / padded over the models
measured), `max_abs_loss_diff` (largest over models and steps), `max_abs_logp_diff`, `goal`
and per model its tokens/s, step seconds, batch lengths and padded vs packed token slots.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GOAL = 1.5
MODELS = {"tiny": ROOT / ".cache/models/tiny", "smollm2": ROOT / ".cache/models/smollm2-135m"}


def skewed_lengths(n: int, max_len: int, seed: int = 0) -> list[int]:
    """Long-tailed: Pareto(1.5) scaled to max_len / 8 above a floor of 16; one at max_len."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = np.clip((rng.pareto(1.5, n) * max_len / 8 + 16).astype(int), 16, max_len)
    lengths[0] = max_len
    return [int(x) for x in lengths]


def batch(lengths: list[int], vocab_size: int) -> list:
    from shared.synthetic import trajectory

    return [
        trajectory(
            f"t{i}",
            f"g{i // 4}",
            n_tokens=n,
            reward=float(i % 2),
            behav_logprob=-2.0,
            vocab_size=vocab_size,
            rng=i,
        )
        for i, n in enumerate(lengths)
    ]


def slots(trainer: Any, trajs: list, packing: bool) -> int:
    """Token slots (rows x width, padding included) the decoder runs over in one pass."""
    import numpy as np

    from learner.batch import collate, plan_micro_batches

    b = collate(trajs, np.zeros(len(trajs)))
    micros = plan_micro_batches(b, trainer.micro_batch_tokens, packing=packing)
    return sum(int(m.input_ids.numel()) for m in micros)


def logp_diff(trainer: Any, trajs: list) -> float:
    """Largest |logp packed - logp padded| over the batch's trained tokens."""
    import numpy as np
    import torch

    from learner.batch import collate, plan_micro_batches

    b = collate(trajs, np.zeros(len(trajs)))
    out = {}
    for packing in (False, True):
        logp = torch.zeros(b.n_tokens)
        with torch.no_grad():
            for m in plan_micro_batches(b, trainer.micro_batch_tokens, packing=packing):
                args = (m.input_ids, m.attention_mask, m.row, m.pos, m.position_ids)
                logp[m.sel] = trainer.token_logprobs(*args)[0].float().cpu()
        out[packing] = logp
    return float((out[True] - out[False]).abs().max())


def measure(name: str, path: Path, episodes: int, max_len: int, repeats: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from learner.train import Trainer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    pad = model.config.pad_token_id
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.0), pad_id=int(pad or 0))
    lengths = skewed_lengths(episodes, max_len)
    trajs = batch(lengths, int(model.config.vocab_size))
    n_tokens = sum(lengths)
    times: dict[bool, list[float]] = {False: [], True: []}
    losses: dict[bool, list[float]] = {False: [], True: []}
    for r in range(repeats + 1):  # r = 0: warm-up
        for packing in (False, True) if r % 2 == 0 else (True, False):
            trainer.packing = packing
            t0 = time.perf_counter()
            diag, _ = trainer.step(trajs)
            elapsed = time.perf_counter() - t0
            losses[packing].append(diag["loss"])
            if r:
                times[packing].append(elapsed)
            print(f"{name} packing={packing} step {r}: {elapsed:.2f} s", file=sys.stderr)
    tps = {p: n_tokens / statistics.median(ts) for p, ts in times.items()}
    diff = max(abs(a - b) for a in losses[True] for b in losses[False])
    return {
        "tokens_per_s_padded": round(tps[False], 1),
        "tokens_per_s_packed": round(tps[True], 1),
        "speedup": round(tps[True] / tps[False], 3),
        "max_abs_loss_diff": diff,
        "max_abs_logp_diff": logp_diff(trainer, trajs),
        "step_s_padded": [round(t, 3) for t in times[False]],
        "step_s_packed": [round(t, 3) for t in times[True]],
        "tokens": n_tokens,
        "slots_padded": slots(trainer, trajs, False),
        "slots_packed": slots(trainer, trajs, True),
        "lengths": lengths,
        "episodes": episodes,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,smollm2")
    ap.add_argument("--episodes", type=int, default=32, help="tiny model")
    ap.add_argument("--max-len", type=int, default=512, help="tiny model")
    ap.add_argument("--smollm2-episodes", type=int, default=8)
    ap.add_argument("--smollm2-max-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    import torch

    results: dict[str, Any] = {}
    for name in args.models.split(","):
        path = MODELS.get(name, Path(name))
        if name == "tiny":
            from learner.tiny_model import build_tiny_model

            build_tiny_model(path)
        if not (path / "config.json").exists():
            print(f"skipping {name}: no model at {path} (headrace models smollm2)")
            continue
        small = name == "smollm2"
        episodes = args.smollm2_episodes if small else args.episodes
        max_len = args.smollm2_max_len if small else args.max_len
        results[name] = measure(name, path, episodes, max_len, args.repeats)
        r = results[name]
        print(
            f"{name}: {r['tokens']} tokens in {r['slots_padded']} padded / "
            f"{r['slots_packed']} packed slots; tokens/s padded {r['tokens_per_s_padded']}, "
            f"packed {r['tokens_per_s_packed']} ({r['speedup']}x); "
            f"max |loss diff| {r['max_abs_loss_diff']:.2e}, "
            f"max |logp diff| {r['max_abs_logp_diff']:.2e}"
        )
    speedup = min((r["speedup"] for r in results.values()), default=0.0)
    diff = max((r["max_abs_loss_diff"] for r in results.values()), default=0.0)
    logp = max((r["max_abs_logp_diff"] for r in results.values()), default=0.0)
    print(f"goal: speedup >= {GOAL}: {'met' if speedup >= GOAL else 'NOT met'} ({speedup}x)")
    summary = {
        "speedup": speedup,
        "max_abs_loss_diff": diff,
        "max_abs_logp_diff": logp,
        "goal": f"speedup >= {GOAL}",
        "goal_met": speedup >= GOAL,
        "torch_threads": torch.get_num_threads(),
        "models": results,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

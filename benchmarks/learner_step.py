"""Learner step throughput and memory of a real model, per precision, on a fixed batch.

Each variant runs in a fresh process (so its peak RSS is its own): it loads the model as the
learner does (float32 weights and AdamW state; the forward autocast to `dtype`), builds one
fixed batch of synthetic trajectories (seeded; random tokens, the last three quarters of each
trained), takes one warm-up step and then `--steps` timed steps. tokens/s counts every token
of the batch (prompt and trained) per second of `Trainer.step`.

    python benchmarks/learner_step.py [--model .cache/models/smollm2-135m] [--episodes 8]
        [--tokens 160] [--steps 2] [--micro-batch-tokens 16384]

The last line is one JSON object: `tokens_per_s` and `peak_rss_mib` (each dtype -> value),
`step_s`, `ratio_bf16_vs_fp32`, `checkpointing` (bfloat16 with activation checkpointing:
tokens/s and peak RSS), the batch's shape and the torch thread count.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = (("float32", False), ("bfloat16", False), ("bfloat16", True))


def child(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from learner.train import Trainer
    from shared.synthetic import synthetic_batch

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    if args.ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainer = Trainer(
        model,
        torch.optim.AdamW(model.parameters(), lr=1e-6),
        micro_batch_tokens=args.micro_batch_tokens,
        autocast_dtype=None if args.dtype == "float32" else getattr(torch, args.dtype),
        pad_id=int(model.config.pad_token_id or 0),
    )
    groups = max(1, args.episodes // 4)
    batch = synthetic_batch(
        groups,
        args.episodes // groups,
        args.tokens,
        seed=0,
        vocab_size=int(model.config.vocab_size),
    )
    n_tokens = sum(len(t.array("token_ids")) for t in batch)
    trainer.step(batch)  # warm-up: allocator, optimiser state
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        trainer.step(batch)
        times.append(time.perf_counter() - t0)
    step_s = min(times)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
    return {
        "tokens": n_tokens,
        "step_s": step_s,
        "tokens_per_s": n_tokens / step_s,
        "peak_rss_mib": peak,
        "threads": torch.get_num_threads(),
    }


def run_variant(args: argparse.Namespace, dtype: str, ckpt: bool) -> dict:
    argv = [
        sys.executable,
        __file__,
        "--child",
        "--dtype",
        dtype,
        "--model",
        args.model,
        "--episodes",
        str(args.episodes),
        "--tokens",
        str(args.tokens),
        "--steps",
        str(args.steps),
        "--micro-batch-tokens",
        str(args.micro_batch_tokens),
    ]
    out = subprocess.run(
        argv + (["--ckpt"] if ckpt else []), capture_output=True, text=True, cwd=ROOT, check=False
    )
    if out.returncode != 0:
        raise SystemExit(f"{dtype} (checkpointing {ckpt}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / ".cache/models/smollm2-135m"))
    ap.add_argument("--episodes", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=160, help="tokens per episode (at most)")
    ap.add_argument("--steps", type=int, default=2, help="timed steps (the fastest counts)")
    ap.add_argument("--micro-batch-tokens", type=int, default=16384)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return
    res = {}
    for dtype, ckpt in VARIANTS:
        r = run_variant(args, dtype, ckpt)
        res[(dtype, ckpt)] = r
        print(
            f"{dtype:9s} checkpointing={ckpt!s:5s}  {r['tokens']} tokens  step {r['step_s']:.1f} s"
            f"  {r['tokens_per_s']:.0f} tok/s  peak RSS {r['peak_rss_mib']:.0f} MiB",
            flush=True,
        )
    plain = {d: r for (d, c), r in res.items() if not c}
    ck = res[("bfloat16", True)]
    print(
        json.dumps(
            {
                "model": Path(args.model).name,
                "episodes": args.episodes,
                "tokens": plain["float32"]["tokens"],
                "threads": plain["float32"]["threads"],
                "step_s": {d: round(r["step_s"], 2) for d, r in plain.items()},
                "ratio_bf16_vs_fp32": round(
                    plain["float32"]["step_s"] / plain["bfloat16"]["step_s"], 3
                ),
                "checkpointing": {
                    "dtype": "bfloat16",
                    "tokens_per_s": round(ck["tokens_per_s"], 1),
                    "peak_rss_mib": round(ck["peak_rss_mib"]),
                },
                "tokens_per_s": {d: round(r["tokens_per_s"], 1) for d, r in plain.items()},
                "peak_rss_mib": {d: round(r["peak_rss_mib"]) for d, r in plain.items()},
            }
        )
    )


if __name__ == "__main__":
    main()

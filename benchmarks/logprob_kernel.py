"""Fused chunked logprob/entropy vs the naive [N x V] log-softmax: peak memory and time.

    python benchmarks/logprob_kernel.py [--quick] [--repeats K] [--chunk ROWS]

Each variant runs in a fresh child process so its memory high-water mark (getrusage
ru_maxrss) is its own: the number reported is that peak minus the child's resident size once
the inputs exist, i.e. the extra memory forward + backward needed. Time is the best of K
forward + backward runs (logp and entropy both carry gradient, as in a PG step with an entropy
bonus). The default shape is SmolLM2-135M's head (V=49,152, H=576) over 8,192 tokens in fp32;
--quick shrinks it. Prints a table, then as its LAST line one JSON object with the ratios and
the goals they are judged against.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

GOALS = {"peak_mem_ratio": 0.125, "time_ratio": 1.0}
FULL = {"n": 8192, "v": 49152, "h": 576}
QUICK = {"n": 4096, "v": 16384, "h": 256}
# The default chunk budget would cover half of the quick batch; the quick run keeps the full
# run's chunk-to-batch proportion (672 of 8192 rows) instead.
QUICK_CHUNK = 336
VARIANTS = ("naive", "fused")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _child(variant: str, n: int, v: int, h: int, repeats: int, chunk: int | None) -> dict:
    """Runs inside the child process: one variant, memory first, then timing."""
    import torch

    from kernels.logprobs import naive_token_logprobs_and_entropy, token_logprobs_and_entropy

    torch.manual_seed(0)
    # In-place scaling so setup leaves no larger transient than the inputs themselves.
    hidden = torch.randn(n, h).mul_(0.5).requires_grad_()
    weight = torch.randn(v, h).mul_(h**-0.5).requires_grad_()
    targets = torch.randint(0, v, (n,))
    g = torch.Generator().manual_seed(1)
    coef = torch.rand(n, generator=g) - 0.5  # advantage-like weights on logp

    def step() -> tuple[float, float]:
        if variant == "naive":
            logp, ent = naive_token_logprobs_and_entropy(hidden, weight, targets)
        else:
            logp, ent = token_logprobs_and_entropy(hidden, weight, targets, chunk, backend="torch")
        ((logp * coef).sum() + 0.01 * ent.sum()).backward()
        return float(logp.detach().double().sum()), float(ent.detach().double().sum())

    base = _rss_bytes()
    sums = step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    checksum = {
        "logp_sum": sums[0],
        "ent_sum": sums[1],
        "grad_h_norm": float(hidden.grad.norm()),
        "grad_w_norm": float(weight.grad.norm()),
    }
    times = []
    for _ in range(repeats):
        hidden.grad = weight.grad = None
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {
        "variant": variant,
        "peak_mib": (peak - base) / 2**20,
        "best_s": min(times),
        "threads": torch.get_num_threads(),
        **checksum,
    }


def _run_child(variant: str, shape: dict, repeats: int, chunk: int | None) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    )
    cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, "--repeats", str(repeats)]
    cmd += ["--n", str(shape["n"]), "--v", str(shape["v"]), "--h", str(shape["h"])]
    if chunk:
        cmd += ["--chunk", str(chunk)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{variant} child failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (seconds, not minutes)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per variant (best of)")
    ap.add_argument("--chunk", type=int, default=None, help="fused rows per chunk (default: auto)")
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--v", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--h", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        res = _child(args.child, args.n, args.v, args.h, args.repeats, args.chunk)
        print(json.dumps(res))
        return

    shape = QUICK if args.quick else FULL
    repeats = args.repeats or (3 if args.quick else 2)
    chunk = args.chunk or (QUICK_CHUNK if args.quick else None)
    res = {name: _run_child(name, shape, repeats, chunk) for name in VARIANTS}
    naive, fused = res["naive"], res["fused"]
    print(
        f"shape N={shape['n']} V={shape['v']} H={shape['h']} fp32, fwd+bwd, best of {repeats}, "
        f"fused chunk rows: {chunk or 'auto'}"
    )
    print(f"{'variant':<8} {'peak extra MiB':>15} {'time s':>9}   grad|h|     grad|W|")
    for r in (naive, fused):
        print(
            f"{r['variant']:<8} {r['peak_mib']:>15.1f} {r['best_s']:>9.3f}   "
            f"{r['grad_h_norm']:.6g}  {r['grad_w_norm']:.6g}"
        )
    rel = max(
        abs(fused[k] - naive[k]) / max(abs(naive[k]), 1e-12)
        for k in ("logp_sum", "ent_sum", "grad_h_norm", "grad_w_norm")
    )
    summary = {
        "shape": shape,
        "dtype": "float32",
        "threads": fused["threads"],
        "chunk_rows": chunk or "auto",
        "naive_s": round(naive["best_s"], 4),
        "fused_s": round(fused["best_s"], 4),
        "time_ratio": round(fused["best_s"] / naive["best_s"], 4),
        "naive_peak_mib": round(naive["peak_mib"], 1),
        "fused_peak_mib": round(fused["peak_mib"], 1),
        "peak_mem_ratio": round(fused["peak_mib"] / naive["peak_mib"], 4),
        "max_rel_diff": float(f"{rel:.3g}"),
        "goals": GOALS,
    }
    summary["goals_met"] = (
        summary["peak_mem_ratio"] <= GOALS["peak_mem_ratio"]
        and summary["time_ratio"] <= GOALS["time_ratio"]
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

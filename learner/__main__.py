"""`headrace-learner` / `python -m learner`: the training process.

Exit codes: 0 done or stopped by SIGTERM/SIGINT (after a checkpoint); 2 bad config, model or
port, or a checkpoint of another run without --resume / --fresh (learner/resume.py); 3 the
broker did not answer Hello (or refused it); 4 the broker went silent mid-run.
Every non-zero exit prints one line `headrace-learner: <reason>` on stderr.

Under `torchrun --nproc_per_node N -m learner ...` the N ranks train one FSDP-sharded model
(see `learner.distributed`): rank 0 is the learner the broker and actors see, the other ranks
only follow its steps.

`python -m learner replay --input FILE [--config FILE] ...` trains offline on a recorded run
(a frame file from `python -m broker export`; see learner/replay.py).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import zmq

from learner.tracking import require_backends
from shared.affinity import pin_process
from shared.config import Config, ConfigError, load_config
from shared.models import resolve_model
from shared.overrides import add_resume_arguments, add_set_argument, set_argv
from shared.security import SecurityError, bind_host_for, check_exposure

if TYPE_CHECKING:
    from learner.loop import Options


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="headrace-learner", description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, help="TOML config (defaults if omitted)")
    ap.add_argument("--broker", help="broker endpoint, tcp://HOST:PORT ([learner].broker)")
    ap.add_argument("--steps", type=int, help="train until this global step ([learner].steps)")
    ap.add_argument("--metrics-port", type=int, help="Prometheus port, 0 disables")
    ap.add_argument("--weights-port", type=int, help="weight endpoint port, 0 picks a free one")
    ap.add_argument("--checkpoint-dir", type=Path, help="checkpoints ([learner].checkpoint_dir)")
    ap.add_argument("--summary-json", type=Path, help="per-step summary, rewritten every step")
    ap.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="torch intra-op threads; 0 = auto: one per core of [learner] cpus, or on a CPU "
        "half the cores (actors share them)",
    )
    ap.add_argument("--no-progress", action="store_true", help="log lines instead of a bar")
    ap.add_argument("--log-level", default="INFO")
    add_set_argument(ap)
    add_resume_arguments(ap)  # a checkpoint of another run (learner/resume.py)
    return ap.parse_args(argv)


def _set_threads(n: int, cpus: list[int] | None = None) -> None:
    """`n` torch threads; n <= 0 (auto): one per core of `[learner] cpus` when it lists any,
    else on a CPU half the machine's cores (the actors share them), else torch's default."""
    import torch

    if n <= 0 and cpus:
        n = len(cpus)
    elif n <= 0 and not torch.cuda.is_available():
        # Measured: on 2 shared cores a tiny-model step takes ~75 ms with 1 thread and ~1 s
        # with 2 (OpenMP spin-waits against the actor's and broker's processes).
        n = max(1, (os.cpu_count() or 2) // 2)
    if n > 0:
        torch.set_num_threads(n)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["replay"]:  # record and replay: offline, no broker
        from learner.replay import main as replay_main

        return replay_main(argv[1:])
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"headrace-learner: {e}", file=sys.stderr)
        return 2
    lc = cfg.learner
    try:
        pin_process(lc.cpus, "[learner] cpus")  # before torch starts any thread
    except ValueError as e:
        print(f"headrace-learner: {e}", file=sys.stderr)
        return 2
    try:
        check_exposure(cfg.security, bind_host_for(lc.weights_host), "the weight endpoint")
    except SecurityError as e:
        print(f"headrace-learner: {e}", file=sys.stderr)
        return 1
    try:
        cfg.model.path = resolve_model(cfg.model)
        require_backends(cfg.logging.backends)  # before minutes of model loading
    except ConfigError as e:  # ModelNotFound, a tracker not installed: one line, exit code 2
        print(f"headrace-learner: {e}", file=sys.stderr)
        return 2

    from learner.loop import Options

    opts = Options(
        broker=args.broker or lc.broker,
        steps=args.steps if args.steps is not None else lc.steps,
        checkpoint_dir=args.checkpoint_dir or Path(lc.checkpoint_dir),
        weights_port=args.weights_port if args.weights_port is not None else lc.weights_port,
        metrics_port=args.metrics_port if args.metrics_port is not None else lc.metrics_port,
        summary_json=args.summary_json,
        torch_threads=args.torch_threads,
        progress=False if args.no_progress else None,
        config_args=(
            *(["--config", str(args.config)] if args.config else []),
            *set_argv(args.overrides),
        ),
        resume=args.resume,
    )
    _set_threads(opts.torch_threads, lc.cpus)
    from learner import distributed as D

    try:
        D.init_distributed()  # no-op unless torchrun started more than one rank
        if not D.is_main():
            code = _follow(cfg, opts)
        else:
            code = _run(cfg, opts)
            # Only after an orderly end: after a crash the followers may be inside a
            # collective, and torchrun tears the group down when this rank exits.
            D.stop_followers()
    finally:
        D.shutdown()
    if D.launched_distributed():
        D.exit_rank(code)  # past the teardown that can abort a sharded rank
    return code


def _run(cfg: Config, opts: Options) -> int:
    from learner.loop import LearnerExit, run_learner

    try:
        return asyncio.run(run_learner(cfg, opts, install_signals=True))
    except LearnerExit as e:
        print(f"headrace-learner: {e}", file=sys.stderr)
        return e.code
    except (OSError, zmq.ZMQError) as e:  # e.g. a metrics or weights port already in use
        print(f"headrace-learner: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _follow(cfg: Config, opts: Options) -> int:
    """A follower rank: the same model, optimizer and checkpoint as rank 0, then its commands."""
    import signal

    from learner.loop import Learner

    # torchrun forwards SIGTERM/SIGINT to every rank; rank 0 finishes its step, checkpoints
    # (a collective this rank must join) and then sends stop, so the signal is not ours to act on.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    learner = Learner(cfg, opts)
    learner._load()  # the exact setup rank 0 runs, with the checkpoint rank 0 chose
    learner.trainer.follow()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

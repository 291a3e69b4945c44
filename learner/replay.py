"""`python -m learner replay`: train a fresh learner on a recorded run, offline, deterministically.

The input is a frame file from `python -m broker export` (`shared.framefile`): one `Batch`
frame per GRPO group, in stored order. Every `[learner] batch_groups` consecutive groups form
one step's batch, trained with `Trainer.step(trajectories, None, version)` where `version` is
the step index (the learner's policy version when it would have fetched the batch); the
trajectories keep the policy versions they were sampled under, so staleness and the
off-policy correction see the recorded lags. The model, optimiser and trainer are built as
the learner process builds them (`learner.build`), with every RNG seeded from `[learner]
seed`, a fixed number of torch threads (default 1) and deterministic kernels, so two replays
of the same data and config give bit-identical losses and weights.

There is no broker, no actor, no weight publishing and no prioritised-replay weight. The
summary (`--summary-json`) has the format of the learner's (`{"steps": [...]}`, one entry per
step with the same keys, `loss` included). Exit codes: 0 done, 2 bad config / input / model.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from learner.build import ModelMissing, build_trainer
from learner.checkpoint import save_checkpoint
from learner.util import json_safe, write_json_atomic
from shared import framefile
from shared import protocol as P
from shared.config import Config, ConfigError, load_config
from shared.overrides import add_set_argument

log = logging.getLogger("learner.replay")
PROG = "headrace-learner replay"


class ReplayError(Exception):
    """Ends the replay with one line on stderr and exit code 2."""


@dataclass
class ReplayOptions:
    input: str  # frame file, or "-" for stdin
    steps: int | None = None  # None: as many as the data forms
    summary_json: Path | None = None
    checkpoint_dir: Path | None = None  # a final checkpoint goes here
    torch_threads: int = 1


def make_deterministic(threads: int) -> None:
    """Fixed thread count and deterministic kernels (call before the model touches CUDA)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    torch.set_num_threads(max(1, threads))
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    if torch.cuda.is_available():
        # The fused attention backwards (memory-efficient, cuDNN) accumulate in a varying
        # order; the math kernel does not (its memory grows with the sequence length squared).
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
        torch.backends.cuda.enable_cudnn_sdp(False)


def decode_group(frame: bytes, index: int) -> P.Batch:
    try:
        msg = P.decode(frame, max_bytes=framefile.MAX_FRAME_BYTES)
    except P.ProtocolError as e:
        raise ReplayError(f"group {index}: undecodable frame: {e}") from None
    if not isinstance(msg, P.Batch) or not msg.items:
        raise ReplayError(f"group {index}: expected a non-empty Batch, got {type(msg).__name__}")
    return msg


class Replay:
    def __init__(self, cfg: Config, opts: ReplayOptions) -> None:
        self.cfg, self.opts = cfg, opts
        self.step = 0
        self.version = 0
        self.cursor = 0
        self.summary: list[dict[str, Any]] = []

    def run(self, f: BinaryIO) -> int:
        bg = max(1, self.cfg.learner.batch_groups)
        limit = self.opts.steps
        try:
            self.trainer = build_trainer(self.cfg)
        except ModelMissing as e:
            raise ReplayError(str(e)) from None
        pending: list[P.Batch] = []
        n_groups = 0
        try:
            for frame in framefile.read_frames(f, self.opts.input):
                n_groups += 1
                if limit is not None and self.step >= limit:
                    continue  # done training: only count what the data would form
                pending.append(decode_group(frame, n_groups))
                if len(pending) == bg:
                    self._train_one(pending)
                    pending = []
        except framefile.FrameFileError as e:
            raise ReplayError(str(e)) from None
        formable = n_groups // bg
        self._finish(n_groups, formable, bg)
        return 0

    def _train_one(self, groups: list[P.Batch]) -> None:
        items = [t for g in groups for t in g.items]
        behaviour = [P.min_policy_version(t) for t in items]
        stale = [self.version - v for v in behaviour]
        t0 = time.perf_counter()
        diag, _ = self.trainer.step(items, None, self.version)
        dt = time.perf_counter() - t0
        self.step += 1
        self.version += 1
        self.cursor = max(self.cursor, *(g.cursor for g in groups))
        entry = {
            "step": self.step,
            "reward_mean": diag.pop("reward_mean"),
            "policy_version": self.version,
            **diag,
            "step_seconds": dt,
            "staleness_mean": sum(stale) / len(stale),
            "staleness_max": float(max(stale)),
            "wait_seconds": 0.0,
            "time": time.time(),
            # what was recorded: the store seqs and the policy versions the data came from
            "cursor": self.cursor,
            "behaviour_version_min": min(behaviour),
            "behaviour_version_max": max(behaviour),
        }
        self.summary.append(json_safe(entry))
        self._write_summary()
        log.info(
            "step %d loss %.6f reward %.3f stale %.1f (%.2fs)",
            self.step,
            entry["loss"],
            entry["reward_mean"],
            entry["staleness_mean"],
            dt,
        )

    def _write_summary(self) -> None:
        if self.opts.summary_json is not None:
            write_json_atomic(self.opts.summary_json, {"steps": self.summary})

    def _finish(self, n_groups: int, formable: int, bg: int) -> None:
        if formable == 0:
            raise ReplayError(
                f"{self.opts.input}: {n_groups} groups form no batch of"
                f" [learner] batch_groups = {bg}"
            )
        self._write_summary()
        if self.opts.checkpoint_dir is not None:
            path = save_checkpoint(
                self.opts.checkpoint_dir,
                self.step,
                self.trainer.model,
                self.trainer.optimizer,
                policy_version=self.version,
                broker_cursor=self.cursor,
                extra={"replay": True},
                scheduler=self.trainer.scheduler,
                copy_from=self.cfg.model.path,
            )
            log.info("checkpoint %s", path)
        left = n_groups - self.step * bg
        log.info(
            "replayed %d steps; the data forms %d (%d groups, %d per step, %d left over)",
            self.step,
            formable,
            n_groups,
            bg,
            left,
        )
        if self.opts.steps is not None and self.opts.steps > formable:
            log.warning("the data ran out after %d of %d steps", formable, self.opts.steps)


def replay(cfg: Config, opts: ReplayOptions) -> int:
    make_deterministic(opts.torch_threads)
    if opts.input == "-":
        return Replay(cfg, opts).run(sys.stdin.buffer)
    try:
        f = open(opts.input, "rb")  # noqa: SIM115 - closed below
    except OSError as e:
        raise ReplayError(f"{opts.input}: {e.strerror or e}") from None
    with f:
        return Replay(cfg, opts).run(f)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    ap.add_argument("--input", required=True, help="frame file from `broker export`, - = stdin")
    ap.add_argument("--config", type=Path, help="TOML config (defaults if omitted)")
    ap.add_argument("--steps", type=int, help="train at most this many steps (default: all)")
    ap.add_argument("--summary-json", type=Path, help="per-step summary, rewritten every step")
    ap.add_argument("--checkpoint-dir", type=Path, help="write a final checkpoint here")
    ap.add_argument("--torch-threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--log-level", default="INFO")
    add_set_argument(ap)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        if args.steps is not None and args.steps < 1:
            raise ReplayError("--steps must be >= 1")
        cfg = load_config(args.config, args.overrides)
        opts = ReplayOptions(
            input=args.input,
            steps=args.steps,
            summary_json=args.summary_json,
            checkpoint_dir=args.checkpoint_dir,
            torch_threads=args.torch_threads,
        )
        return replay(cfg, opts)
    except (ConfigError, ReplayError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130

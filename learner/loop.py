"""The learner process: pull batches from the broker, train, publish weights, checkpoint.

Everything socket-facing runs on one asyncio loop (broker client, weight endpoint); the
optimiser step, weight serialisation and checkpoint writes run in a worker thread, so actors
keep fetching chunks of the previous version while the next step trains. Steps are strictly
sequential: a new batch is requested only after the previous update, publish and feedback, so
the weights never change under a running publish or checkpoint. What the learner says to the
broker, and how it waits, is `learner/broker_side.py`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from learner import metrics as M
from learner.broker_side import FENCED, BrokerSide, LearnerExit
from learner.build import ModelMissing, build_trainer
from learner.checkpoint import latest, load_checkpoint, save_checkpoint
from learner.console import Progress, closing_summary
from learner.distributed import full_state_dict
from learner.evaluation import Evaluations, eval_scalars
from learner.lora import publishable
from learner.publish import WeightPublisher, wire_dtype
from learner.resume import Refused, RunIdentity, agree, choose, config_digest
from learner.tracking.step import StepTracker, open_step_tracker
from learner.trained_log import TrainedLog
from learner.util import json_safe, write_json_atomic
from shared import protocol as P
from shared.config import Config
from shared.metrics import TRAJECTORY_STALENESS, serve_metrics
from shared.models import model_dtype
from shared.security import bind_host_for, client_keys, server_keys
from shared.transport import Client

log = logging.getLogger("learner")


@dataclass
class Options:
    """Per-process settings (CLI flags override the config file's [learner] section)."""

    broker: str
    steps: int
    checkpoint_dir: Path
    weights_port: int
    metrics_port: int = 0
    summary_json: Path | None = None
    torch_threads: int = 0  # 0: auto (half the cores on CPU, see __main__)
    progress: bool | None = None  # None: a bar only on a TTY
    # The flags that give this config (--config FILE, --set ...): for the commands a run ends with
    config_args: tuple[str, ...] = ()
    # A checkpoint of another run: None refuses it, "resume" / "fresh" (learner/resume.py)
    resume: str | None = None


class Learner(BrokerSide):
    def __init__(self, cfg: Config, opts: Options) -> None:
        self.cfg, self.opts, self.lc = cfg, opts, cfg.learner
        self.stop = asyncio.Event()
        self.step = 0
        self.version = 0
        self.cursor = 0
        self.summary: list[dict[str, Any]] = []
        self.peer_id = f"learner-{socket.gethostname()}-{os.getpid()}"
        self.run_id = ""  # the broker's (its Welcome): each checkpoint records it
        self.group_size = cfg.broker.group_size  # the broker's, once its Welcome is in
        self.client: Client | None = None
        self.publisher: WeightPublisher | None = None
        self.weights_endpoint = ""
        self.last_published = -1
        self.trained_log: TrainedLog | None = None
        # batch id -> the step that trained it (recent ones): a batch the broker hands again
        # because our acknowledgement crossed its reply is acknowledged again, not retrained
        self.acked: dict[int, int] = {}
        # Every number and sample for people (learner/tracking/step.py): records nothing until
        # run() opens [logging]'s backends. Evaluation results: self.tracker.scalars(step, ...)
        self.tracker = StepTracker()
        self.evals = Evaluations(self.lc, lambda: self.client, self._on_eval)

    # ------------------------------------------------------------ setup

    def _load(self, ckpt: Path | None = None) -> None:
        """Build the trainer and load `ckpt` (rank 0's choice: followers pass None)."""
        try:
            self.trainer = build_trainer(self.cfg)  # seeds, model, optimiser (learner.build)
        except ModelMissing as e:
            raise LearnerExit(str(e)) from None
        model, opt = self.trainer.model, self.trainer.optimizer
        ckpt = agree(ckpt)
        if ckpt is not None:
            # also restores the RNG streams and the lr schedule
            st = load_checkpoint(ckpt, model, opt, scheduler=self.trainer.scheduler)
            self.step, self.version, self.cursor = st.step, st.policy_version, st.broker_cursor
            log.info("resumed from %s: step %d, policy v%d", ckpt, self.step, self.version)
            self._load_summary()
        self.last_ckpt_step = self.step  # a fresh run has nothing worth saving at step 0
        self.trained_log = TrainedLog(self.opts.checkpoint_dir, self.step)
        self.acked = dict(self.trained_log.batches)

    def _load_summary(self) -> None:
        p = self.opts.summary_json
        if p is not None and p.is_file():
            try:
                old = json.loads(p.read_text())
                self.summary = [s for s in old.get("steps", []) if s.get("step", 0) <= self.step]
                self.evals.restore(old.get("evals", []), self.step)
            except (ValueError, AttributeError):
                log.warning("ignoring unreadable summary %s", p)

    # ------------------------------------------------------------ per step

    async def _publish(self) -> None:
        assert self.publisher is not None and self.client is not None
        model = self.trainer.model
        state = await asyncio.to_thread(full_state_dict, model)  # an FSDP gather: off the loop
        # Under LoRA the actors keep the base weights and get the adapter alone.
        tensors, kind, adapter_cfg = publishable(model, state)
        manifest = await asyncio.to_thread(
            self.publisher.publish, self.version, tensors, kind, adapter_cfg
        )
        await self.client.send(
            P.PolicyPublished(
                version=self.version, weights_endpoint=self.weights_endpoint, manifest=manifest
            )
        )
        self.last_published = self.version

    async def _train_one(self, batch: P.Batch) -> dict[str, Any]:
        stale = [self.version - P.min_policy_version(t) for t in batch.items]
        for s in stale:
            TRAJECTORY_STALENESS.observe(max(0, s))
        t0 = time.perf_counter()
        diag, adv = await asyncio.to_thread(
            self.trainer.step, batch.items, batch.is_weights, self.version
        )
        dt = time.perf_counter() - t0
        self.step += 1
        self.version += 1
        self.cursor = max(self.cursor, batch.cursor)
        M.STEPS.inc()
        M.STEP_SECONDS.observe(dt)
        M.POLICY_VERSION.set(self.version)
        M.REWARD_MEAN.set(diag["reward_mean"])
        M.observe_diagnostics(diag)
        M.TRAJECTORIES.inc(len(batch.items))
        M.TOKENS.inc(diag["n_tokens"])
        await self._acknowledge(batch)
        if self.step % max(1, self.lc.publish_every) == 0:
            await self._publish()
        await self._feedback(batch, adv)
        entry = {
            "step": self.step,
            "reward_mean": diag.pop("reward_mean"),
            "policy_version": self.version,
            **diag,
            "step_seconds": dt,
            "staleness_mean": float(np.mean(stale)),
            "staleness_max": float(max(stale)),
        }
        return json_safe(entry)

    async def _checkpoint(self) -> None:
        await asyncio.to_thread(
            save_checkpoint,
            self.opts.checkpoint_dir,
            self.step,
            self.trainer.model,
            self.trainer.optimizer,
            policy_version=self.version,
            broker_cursor=self.cursor,
            copy_from=self.cfg.model.path,
            scheduler=self.trainer.scheduler,
            extra=RunIdentity(self.run_id, config_digest(self.cfg)).extra(),
            keep=self.lc.keep_checkpoints,
        )
        self.last_ckpt_step = self.step
        log.info("checkpoint step %d (policy v%d)", self.step, self.version)
        if self.client is not None:
            # The broker may forget the batches up to here. Bounded: at exit the broker may be
            # gone, and then it learns the step from our next Hello instead.
            try:
                await asyncio.wait_for(self.client.send(P.Checkpointed(self.step)), 5.0)
            except TimeoutError:
                log.warning("broker did not take the checkpoint notice (step %d)", self.step)

    def _on_eval(self, entry: dict[str, Any]) -> None:
        self.tracker.scalars(int(entry["step"]), eval_scalars(entry))
        self._write_summary()

    def _write_summary(self) -> None:
        if self.opts.summary_json is not None:
            summary = {"steps": self.summary, "evals": self.evals.entries}
            write_json_atomic(self.opts.summary_json, summary)

    # ------------------------------------------------------------ main

    async def run(self) -> int:
        serve_metrics(self.opts.metrics_port, "learner")
        o = self.opts
        try:  # before the model is built: a refusal is quick
            choice = await self._until_stop(
                choose(self.cfg, o.checkpoint_dir, o.resume, o.broker, self.peer_id)
            )
        except Refused as e:
            raise LearnerExit(str(e), e.code) from None
        if choice is None:
            return 0  # stopped while asking the broker
        self._load(choice.checkpoint)
        M.POLICY_VERSION.set(self.version)
        port = self.opts.weights_port
        self.publisher = WeightPublisher(
            f"tcp://{bind_host_for(self.lc.weights_host)}:{port if port else '*'}",
            curve=server_keys(self.cfg.security, "learner", admit=("actor",)),  # actors only
            dtype=wire_dtype(model_dtype(self.cfg.model, self.cfg.model.path)),  # the engine's
        )
        self.weights_endpoint = f"tcp://{self.lc.weights_host}:{self.publisher.port}"
        self.publisher.start()
        self.client = Client(
            self.opts.broker,
            peer_id=self.peer_id,
            curve=client_keys(self.cfg.security, "learner", "broker"),
        )
        self.client.start()
        try:
            self.tracker = open_step_tracker(self.cfg, self.opts.checkpoint_dir, self.step)
            if not await self._connect():
                return 0  # stopped while connecting: nothing trained, nothing to save
            heartbeats = asyncio.get_running_loop().create_task(self._heartbeats())
            try:
                await self._publish()
                return await self._train_loop()
            finally:
                heartbeats.cancel()
        finally:
            self.client.close()
            await self.publisher.aclose()
            if self.trained_log is not None:
                self.trained_log.close()
            self.tracker.close()

    async def _train_loop(self) -> int:
        bar = Progress(self.opts.steps, self.step, self.opts.progress)  # learner/console.py
        try:
            while self.step < self.opts.steps and not self.stop.is_set():
                t_wait = time.monotonic()
                batch = await self._next_batch()
                if batch is None:
                    break
                waited = time.monotonic() - t_wait
                entry = await self._train_one(batch)
                # idle time (waiting for the batch) and when the step ended, for benchmarks
                entry.update(wait_seconds=waited, time=time.time())
                self.summary.append(entry)
                self._write_summary()
                self.tracker.record_step(entry, batch.items)
                if self.step % max(1, self.lc.checkpoint_every) == 0:
                    await self._checkpoint()
                await self.evals.after_step(self.step, self.last_published)
                bar.report(self.step, self.version, entry)
        except LearnerExit as e:
            # The broker is gone: keep what was trained. Not when fenced: another learner
            # owns the run (and maybe this checkpoint dir) now.
            if e.code != FENCED and self.step != self.last_ckpt_step:
                await self._checkpoint()
            raise
        finally:
            bar.close()
        if self.last_published != self.version:
            await self._publish()
        if self.step != self.last_ckpt_step:
            await self._checkpoint()
        await self.evals.finish(self.step, self.last_published, self.stop)
        self._write_summary()
        why = "stop requested" if self.stop.is_set() else "done"
        log.info("%s at step %d (policy v%d)", why, self.step, self.version)
        ckpt, viewers = latest(self.opts.checkpoint_dir), self.tracker.viewers()
        text = closing_summary(
            self.summary, ckpt, self.opts.config_args, viewers, self.evals.entries
        )
        print(text, file=sys.stderr)
        return 0

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        if self.stop.is_set():
            raise SystemExit(130)  # a second signal: stop now
        log.info("%s: stopping after the current step", signal.Signals(sig).name)
        self.stop.set()


async def run_learner(cfg: Config, opts: Options, install_signals: bool = False) -> int:
    learner = Learner(cfg, opts)
    if install_signals:
        learner.install_signal_handlers()
    return await learner.run()

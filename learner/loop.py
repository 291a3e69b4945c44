"""The learner process: pull batches from the broker, train, publish weights, checkpoint.

Everything socket-facing runs on one asyncio loop (broker client, weight endpoint); the
optimiser step, weight serialisation and checkpoint writes run in a worker thread, so actors
keep fetching chunks of the previous version while the next step trains. Steps are strictly
sequential: a new batch is requested only after the previous update, publish and feedback, so
the weights never change under a running publish or checkpoint.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import signal
import socket
import sys
import time
from collections import defaultdict
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from learner import metrics as M
from learner.build import ModelMissing, build_trainer
from learner.checkpoint import latest, load_checkpoint, save_checkpoint
from learner.console import Progress, closing_summary
from learner.distributed import full_state_dict
from learner.evaluation import Evaluations, eval_scalars
from learner.lora import publishable
from learner.publish import WeightPublisher, wire_dtype
from learner.resume import Refused, RunIdentity, agree, choose, config_digest
from learner.tracking.step import StepTracker, open_step_tracker
from learner.trained_log import MAX_REMEMBERED, TrainedLog
from learner.util import json_safe, write_json_atomic
from shared import protocol as P
from shared.config import Config
from shared.handshake import ConfigMismatch, check_welcome, group_size
from shared.metrics import TRAJECTORY_STALENESS, serve_metrics
from shared.models import model_dtype
from shared.security import bind_host_for, client_keys, server_keys
from shared.transport import Client, PeerUnreachable

log = logging.getLogger("learner")
T = TypeVar("T")


FENCED = 5  # exit code of a learner the broker replaced by another


class LearnerExit(Exception):
    """A condition that ends the run with a one-line reason and a non-zero exit code."""

    def __init__(self, reason: str, code: int = 2) -> None:
        super().__init__(reason)
        self.code = code


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


class Learner:
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

    async def _until_stop(self, aw: Awaitable[T]) -> T | None:
        """Await `aw` unless a stop is requested first (then cancel it and return None)."""
        task = asyncio.ensure_future(aw)
        stopper = asyncio.ensure_future(self.stop.wait())
        done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            stopper.cancel()
            return task.result()
        task.cancel()
        return None

    async def _connect(self) -> bool:
        assert self.client is not None
        timeout = self.lc.connect_timeout_s
        per_try = min(5.0, timeout)
        hello = P.Hello(
            role="learner",
            peer_id=self.peer_id,
            protocol_version=P.PROTOCOL_VERSION,
            capabilities={
                "weights_endpoint": self.weights_endpoint,
                "policy_version": str(self.version),
                "step": str(self.step),
                "cursor": str(self.cursor),
            },
        )
        retries = max(0, math.ceil(timeout / per_try) - 1)
        deadline = time.monotonic() + timeout
        while True:
            try:
                welcome = await self._until_stop(
                    self.client.request(hello, P.Welcome, timeout=per_try, retries=retries)
                )
                break
            except PeerUnreachable:
                raise LearnerExit(
                    f"broker {self.opts.broker} did not answer Hello within {timeout:.0f}s", 3
                ) from None
            except P.ProtocolError as e:
                # Another learner is active. A restarted learner may come back before the
                # broker has given up on its dead predecessor: wait for that, within the
                # connect budget; a second learner next to a live one is refused for good.
                if e.reason != "forbidden" or time.monotonic() > deadline:
                    msg = f"broker {self.opts.broker} refused the learner: {e}"
                    raise LearnerExit(msg, 3) from None
                log.warning("%s; waiting for it to go silent", e.detail)
                await self._until_stop(asyncio.sleep(1.0))
                if self.stop.is_set():
                    return False
        if welcome is None:
            return False
        try:
            check_welcome(self.cfg, welcome, "learner", self.opts.broker)
        except ConfigMismatch as e:
            raise LearnerExit(str(e), 2) from None
        # Batches are asked for in the broker's groups, whatever this config says.
        self.group_size = group_size(self.cfg, welcome)
        log.info("connected to %s (run %s)", self.opts.broker, welcome.run_id)
        self.run_id = welcome.run_id
        if welcome.policy_version > self.version:
            # Versions must stay monotonic for actors even if our checkpoint is older.
            log.warning(
                "broker knows policy v%d > our v%d; continuing from v%d",
                welcome.policy_version,
                self.version,
                welcome.policy_version,
            )
            self.version = welcome.policy_version
        return True

    # ------------------------------------------------------------ per step

    async def _heartbeats(self) -> None:
        """Tell the broker this learner is alive while a long step trains (it refuses a
        second learner only while the active one is heard from)."""
        assert self.client is not None
        every = max(0.5, self.cfg.broker.heartbeat_timeout_s / 4)
        while True:
            stats = {"step": float(self.step), "policy_version": float(self.version)}
            try:
                await asyncio.wait_for(
                    self.client.send(P.Heartbeat(peer_id=self.peer_id, stats=stats)), every
                )
            except TimeoutError:
                pass  # the broker is away; the request path notices and decides
            await asyncio.sleep(every)

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

    async def _next_batch(self) -> P.Batch | None:
        assert self.client is not None
        n = self.lc.batch_groups * self.group_size  # SampleRequest counts trajectories
        t0 = time.monotonic()
        lost_since: float | None = None
        last_log = t0
        while not self.stop.is_set():
            req = P.SampleRequest(batch_size=n, policy_version=self.version)
            try:
                reply = await self._until_stop(
                    self.client.request(
                        req,
                        (P.Batch, P.NotReady),
                        timeout=min(10.0, self.lc.connect_timeout_s),
                        retries=0,
                    )
                )
            except PeerUnreachable:
                now = time.monotonic()
                lost_since = lost_since or now
                if now - lost_since > self.lc.connect_timeout_s:
                    raise LearnerExit(
                        f"broker {self.opts.broker} silent for {now - lost_since:.0f}s", 4
                    ) from None
                log.warning("broker not answering SampleRequest; retrying")
                continue
            except P.ProtocolError as e:
                if e.reason == "forbidden":  # another learner took over: this one must stop
                    msg = f"broker {self.opts.broker} refused this learner: {e}"
                    raise LearnerExit(msg, FENCED) from None
                log.warning("broker refused SampleRequest: %s", e)
                reply = P.NotReady(replay_size=-1, retry_after_s=1.0)
            if reply is None:
                break
            lost_since = None
            if isinstance(reply, P.Batch) and reply.batch_id in self.acked:
                await self.client.send(P.BatchTrained(reply.batch_id, self.acked[reply.batch_id]))
                continue  # trained already: ask again
            if isinstance(reply, P.Batch) and reply.items:
                M.WAIT_SECONDS.inc(time.monotonic() - t0)
                return reply
            delay = reply.retry_after_s if isinstance(reply, P.NotReady) else 0.5
            if time.monotonic() - last_log > 10:
                last_log = time.monotonic()
                size = reply.replay_size if isinstance(reply, P.NotReady) else 0
                log.info("waiting for a batch of %d (replay size %d)", n, size)
            await self._until_stop(asyncio.sleep(max(0.05, delay)))
        M.WAIT_SECONDS.inc(time.monotonic() - t0)
        return None

    async def _feedback(self, batch: P.Batch, adv: np.ndarray) -> None:
        assert self.client is not None
        by_task: dict[str, list[int]] = defaultdict(list)
        for i, t in enumerate(batch.items):
            by_task[t.task_id].append(i)
        for task_id, idx in by_task.items():
            await self.client.send(
                P.TaskFeedback(
                    task_id=task_id,
                    mean_abs_advantage=float(np.abs(adv[idx]).mean()),
                    pass_rate=float(np.mean([batch.items[i].success for i in idx])),
                    policy_version=self.version,
                )
            )
        if batch.sample_ids and len(batch.sample_ids) == len(adv):
            # |A| is constant over a trajectory's tokens, so it is also its mean token |A|.
            await self.client.send(
                P.PriorityUpdate(sample_ids=list(batch.sample_ids), priorities=np.abs(adv).tolist())
            )

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

    async def _acknowledge(self, batch: P.Batch) -> None:
        """Log what this step trained and tell the broker (which otherwise hands it again)."""
        if self.trained_log is not None:
            self.trained_log.append(self.step, batch.batch_id, [t.traj_id for t in batch.items])
        if batch.batch_id:
            assert self.client is not None
            self.acked[batch.batch_id] = self.step
            if len(self.acked) > MAX_REMEMBERED:
                del self.acked[next(iter(self.acked))]
            await self.client.send(P.BatchTrained(batch.batch_id, self.step))

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

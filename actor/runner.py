"""The actor process: leases in, episodes on one engine, trajectories out, weights in.

Concurrency is a fixed number of episode slots. The actor asks the broker for leases (one
lease = one task × group_size episodes) for the groups of slots that are free and `[actor]
leases_ahead` groups more, so a group that ends is followed at once; it runs every episode of
a lease as an asyncio task, and drops each finished trajectory into the outbox. Weight
updates arrive as `PolicyPublished` pushes and are applied while episodes run.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import deque

from prometheus_client import Counter, Gauge

from actor.build import TextFormat, play_episode, start_engine, text_format
from actor.engine import Engine, EngineDead, PolicyRejected
from actor.envs import make_env
from actor.outbox import Outbox
from actor.weights import WEIGHTS_REJECTED, WeightBuffer, WeightDigestMismatch, fetch_weights
from shared import protocol as P
from shared.config import Config
from shared.handshake import check_welcome, group_size
from shared.metrics import WEIGHTS_SYNC_SECONDS
from shared.models import model_dtype, resolve_model
from shared.security import client_keys
from shared.transport import Client

log = logging.getLogger(__name__)

EPISODES = Counter("headrace_actor_episodes_total", "Episodes finished", ["termination"])
TOKENS = Counter("headrace_actor_tokens_generated_total", "Tokens sampled by the engine")
VERSION = Gauge("headrace_actor_policy_version", "Policy version the engine is running")
RUNNING = Gauge("headrace_actor_episodes_running", "Episodes in progress")
GENERATING = Gauge(
    "headrace_actor_requests_generating",
    "Generation requests in the engine now (episodes running minus those between turns)",
)
EPISODES_TIMED_OUT = Counter(
    "headrace_actor_episodes_timed_out_total",
    "Episodes stopped at their lease's timeout_s (the broker re-grants the task)",
)
REWARD = Gauge("headrace_actor_reward_mean", "Mean outcome reward of recent episodes")
ENGINE_UP = Gauge("headrace_actor_engine_up", "1 while the vLLM engine is alive")
UPDATES = Counter("headrace_actor_weight_updates_total", "Policies loaded into the engine")


class Actor:
    def __init__(self, cfg: Config, actor_id: str | None = None) -> None:
        self.cfg = cfg
        self.acfg = cfg.actor
        self.actor_id = actor_id or f"actor-{socket.gethostname()}-{os.getpid()}"
        # [security] curve: the broker's and the weight endpoint's keys (None: plaintext)
        self.client = Client(
            self.acfg.broker, self.actor_id, curve=client_keys(cfg.security, "actor", "broker")
        )
        self._weights_curve = client_keys(cfg.security, "actor", "learner")
        self._weights_buffer: WeightBuffer | None = None  # reused by every policy fetch
        self.outbox = Outbox(self.client, self.acfg.outbox_batch, self.acfg.outbox_flush_s)
        self.engine: Engine | None = None
        self.text: TextFormat | None = None  # tokenizer and chat template, with the engine
        self._latest: P.PolicyPublished | None = None
        self._new_policy = asyncio.Event()
        self._slots = asyncio.Semaphore(self.acfg.max_concurrent_episodes)
        self._free = self.acfg.max_concurrent_episodes
        self._freed = asyncio.Event()  # set whenever an episode gives its slot back
        self._unanswered = 0  # task requests sent and not yet answered by a grant
        # leases granted ahead of free slots ([actor] leases_ahead), with when they came
        self._ready: deque[tuple[P.Lease, float]] = deque()
        self._stopping = False  # SIGTERM: no more leases
        self.group_size = cfg.broker.group_size  # the broker's, once its Welcome is in
        self._episodes_done = 0
        self._stop = asyncio.Event()
        self._recent_rewards: deque[float] = deque(maxlen=256)
        self._fatal: EngineDead | None = None
        # eval lease id -> episode k -> (reward, success, policy version): reported together
        self._eval_scores: dict[str, dict[int, tuple[float, bool, int]]] = {}

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        self.client.start()
        self.client.on(P.PolicyPublished, self._on_policy)
        welcome = await self._hello()
        mc = self.cfg.model
        path = resolve_model(mc)
        self.text = text_format(mc, path)
        log.info("starting vLLM engine for %s (%s)", path, model_dtype(mc, path))
        # [learner.lora] of the same TOML: rank > 0 serves the learner's adapters
        self.engine = start_engine(
            self.cfg, path, max_num_seqs=max(self.acfg.max_concurrent_episodes, 8)
        )
        ENGINE_UP.set(1)
        engine = self.engine
        GENERATING.set_function(lambda: engine.generating)
        # Starting the engine blocks for a while and the broker may have given up on us
        # meanwhile: say hello again now that we can work, and take the newest policy.
        welcome = await self._hello()
        if welcome.manifest is not None and welcome.weights_endpoint:
            self._on_policy(
                P.PolicyPublished(
                    version=welcome.manifest.version,
                    weights_endpoint=welcome.weights_endpoint,
                    manifest=welcome.manifest,
                )
            )
        log.info("actor %s ready (policy v%d on the broker)", self.actor_id, welcome.policy_version)
        tasks = [
            asyncio.create_task(self.outbox.run(), name="outbox"),
            asyncio.create_task(self._heartbeats(), name="heartbeat"),
            asyncio.create_task(self._weights_loop(), name="weights"),
            asyncio.create_task(self._lease_loop(), name="leases"),
            asyncio.create_task(self._watch_engine(), name="engine-watch"),
        ]
        stop = asyncio.create_task(self._stop.wait())
        done, _ = await asyncio.wait([*tasks, stop], return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            if t is not stop and t.exception() is not None:
                for other in tasks:
                    other.cancel()
                raise t.exception()  # type: ignore[misc]
        if self._fatal is not None or (self.engine is not None and self.engine.dead):
            for t in tasks:
                t.cancel()
            raise self._fatal or EngineDead("the vLLM engine process died")
        # Graceful stop: let the outbox hand over what it holds.
        await self.outbox.drain(timeout=10.0)
        for t in tasks:
            t.cancel()

    def stop(self) -> None:
        self._stop.set()

    @property
    def episodes_done(self) -> int:
        return self._episodes_done

    async def stop_gracefully(self, grace_s: float = 30.0) -> None:
        """SIGTERM: take no more leases, let the episodes in flight finish (up to `grace_s`),
        then stop; `run` then waits for the broker to ack the outbox before it returns."""
        # Take every episode slot: the lease loop asks for leases only while slots are free,
        # and each running episode gives its slot back when it ends (a grant already on its
        # way still starts its episodes, and they are waited for too). Leases held ahead are
        # played too: the broker granted them to us, and would otherwise wait out their timeout.
        self._stopping = True
        self._start_ready(all_of_them=True)
        self._free -= self.acfg.max_concurrent_episodes
        deadline = asyncio.get_running_loop().time() + grace_s
        while self._free < 0 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        self.stop()

    def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
        if self._weights_buffer is not None:
            self._weights_buffer.close()
        self.client.close()

    async def _hello(self) -> P.Welcome:
        hello = P.Hello(
            role="actor",
            peer_id=self.actor_id,
            protocol_version=P.PROTOCOL_VERSION,
            capabilities={"max_concurrent_episodes": str(self.acfg.max_concurrent_episodes)},
        )
        tries = max(1, int(self.acfg.connect_timeout_s / 5.0))
        welcome = await self.client.request(hello, P.Welcome, timeout=5.0, retries=tries - 1)
        # before the engine starts: a run this actor's config disagrees with is refused at once
        check_welcome(self.cfg, welcome, "actor", self.acfg.broker)
        self.group_size = group_size(self.cfg, welcome)
        return welcome

    # ------------------------------------------------------------------ loops

    async def _heartbeats(self) -> None:
        while True:
            stats = {
                "episodes": float(self._episodes_done),
                "running": float(self.acfg.max_concurrent_episodes - self._free),
                "policy_version": float(self.engine.version if self.engine else 0),
                "outbox": float(len(self.outbox)),
            }
            await self.client.send(P.Heartbeat(peer_id=self.actor_id, stats=stats))
            await asyncio.sleep(self.acfg.heartbeat_s)

    async def _watch_engine(self) -> None:
        assert self.engine is not None
        while True:
            if self.engine.dead:
                ENGINE_UP.set(0)
                raise EngineDead("the vLLM engine process died")
            await asyncio.sleep(0.5)

    async def _lease_loop(self) -> None:
        group = self.group_size  # episodes per lease: slots are taken a whole group at a time
        sync_version, sync_groups, sync_since = -1, 0, time.monotonic()  # [actor] sync
        while True:
            # stopping: no lease is asked for ahead, and one on its way is played at once
            self._start_ready(all_of_them=self._stopping)
            free, ahead = self._free, 0 if self._stopping else self.acfg.leases_ahead
            if self.acfg.sync and self.engine is not None:
                # One learner batch per policy version, then wait for the next version.
                stuck = time.monotonic() - sync_since > self.cfg.broker.lease_deadline_s
                if self.engine.version != sync_version or stuck:
                    sync_version, sync_groups, sync_since = self.engine.version, 0, time.monotonic()
                free = min(free, (self.cfg.learner.batch_groups - sync_groups) * group)
                ahead = 0  # a lease held ahead would be played on the next version
            want = max(0, free) // group + ahead - len(self._ready)
            if want <= 0:
                # Woken by the slot that makes a group free (at once: a group's episodes end
                # together and every ms the engine runs short of requests is lost), or after
                # 20 ms for what else changes `free` ([actor] sync's versions, a stop).
                self._freed.clear()
                try:
                    await asyncio.wait_for(self._freed.wait(), 0.02)
                except TimeoutError:
                    pass
                continue
            grant = await self._next_grant(want)
            if grant is None:
                continue
            if not grant.leases:
                await asyncio.sleep(grant.retry_after_s or 0.2)
                continue
            sync_groups += sum(lease.purpose != "eval" for lease in grant.leases)
            now = time.monotonic()
            self._ready.extend((lease, now) for lease in grant.leases)

    def _start_ready(self, all_of_them: bool = False) -> None:
        """Start the episodes of leases granted ahead, while a whole group's slots are free.
        `[actor] leases_ahead` groups are asked for before their slots free up, so a group
        that ends is followed at once, not after a round trip to the broker (on a fast engine
        that trip left ~4% of the engine's batch empty). `all_of_them`: whatever is free."""
        while self._ready and (all_of_them or self._free >= self._ready[0][0].group_size):
            lease, granted = self._ready.popleft()
            for k in range(lease.group_size):
                self._free -= 1
                asyncio.create_task(self._episode(lease, k, granted))

    async def _next_grant(self, groups: int) -> P.TaskGrant | None:
        """A grant for up to `groups` leases (None: the broker did not answer in 5 s).

        Not `client.request`: it drops replies that come after its timeout, and a TaskGrant
        that comes late (a stalled broker, a cut link) holds leases the broker renews with
        every heartbeat of ours - dropped, they are never worked on and never expire. Every
        grant is used, whichever request it answers; one already here goes first. Only while
        a request is unanswered can one be here, so only then is it looked for (the look
        waits 10 ms, which every group's restart would otherwise pay)."""
        grant: P.TaskGrant | None = None
        if self._unanswered > 0:
            try:
                grant = await self.client.recv(P.TaskGrant, timeout=0.01)
            except TimeoutError:
                pass
        if grant is None:
            await self.client.send(P.TaskRequest(n=groups))
            self._unanswered += 1
            try:
                grant = await self.client.recv(P.TaskGrant, timeout=5.0)
            except TimeoutError:
                log.warning("broker did not answer a task request; retrying")
                return None
        self._unanswered = max(0, self._unanswered - 1)
        return grant

    async def _episode(self, lease: P.Lease, k: int, granted: float | None = None) -> None:
        """Play episode `k` of `lease`, within what is left of the lease's `timeout_s`
        (counted from `granted`, the grant's arrival; None: now)."""
        assert self.engine is not None
        RUNNING.inc()
        try:
            env = make_env(lease.task, episode_seed=k, options=self.cfg.env.options)
            assert self.text is not None
            episode = play_episode(self.engine, self.text, self.acfg, env, lease, self.actor_id)
            # The broker expires the lease at timeout_s after its grant, heartbeats or not;
            # an episode still running then would be refused anyway (its group is gone).
            held = 0.0 if granted is None else time.monotonic() - granted
            left = lease.timeout_s - held
            traj = await asyncio.wait_for(episode, max(left, 1e-3) if lease.timeout_s else None)
        except TimeoutError:
            EPISODES_TIMED_OUT.inc()
            log.warning(
                "episode %d of %s stopped after the lease's %.0f s",
                k,
                lease.lease_id,
                lease.timeout_s,
            )
            return
        except EngineDead as e:
            # The watcher may not have noticed yet: make sure the process exits non-zero.
            self._fatal = e
            self._stop.set()
            return
        except Exception:
            log.exception("episode of %s failed", lease.task.task_id)
            if lease.purpose == "eval":  # scored as a failure: the round still completes
                await self._eval_scored(lease, k, 0.0, False, self.engine.version)
            return
        finally:
            self._free += 1
            RUNNING.dec()
            # a lease held ahead takes the slots as soon as they are free: the lease loop
            # may be waiting for a grant just now
            self._start_ready(all_of_them=self._stopping)
            self._freed.set()
        if lease.purpose == "eval":  # scored, never sent: evaluation stays out of replay
            await self._eval_scored(
                lease, k, traj.outcome_reward, bool(traj.success), P.min_policy_version(traj)
            )
            return
        self._episodes_done += 1
        EPISODES.labels(termination=traj.termination).inc()
        TOKENS.inc(traj.loss_mask.count(1))  # one byte per token, 1 where sampled
        self._recent_rewards.append(traj.outcome_reward)
        REWARD.set(sum(self._recent_rewards) / len(self._recent_rewards))
        self.outbox.put(traj)

    async def _eval_scored(
        self, lease: P.Lease, k: int, reward: float, success: bool, version: int
    ) -> None:
        scores = self._eval_scores.setdefault(lease.lease_id, {})
        scores[k] = (reward, success, version)
        if len(scores) < lease.group_size:
            return
        del self._eval_scores[lease.lease_id]
        ks = sorted(scores)
        # Not acked: if it is lost, the broker's eval lease expires and is played again.
        await self.client.send(
            P.EvalOutcome(
                lease_id=lease.lease_id,
                task_id=lease.task.task_id,
                rewards=[scores[i][0] for i in ks],
                successes=[scores[i][1] for i in ks],
                policy_versions=[scores[i][2] for i in ks],
            )
        )

    # ------------------------------------------------------------------ weights

    def _on_policy(self, msg: P.PolicyPublished) -> None:
        # Only the broker's announcement says what a version's bytes are (actor/weights.py).
        if msg.manifest.version != msg.version:
            WEIGHTS_REJECTED.labels(reason="manifest_version").inc()
            log.error("policy v%d announced with a v%d manifest", msg.version, msg.manifest.version)
            return
        latest = self._latest
        # The same version with another digest: the learner re-published it (resumed from a
        # checkpoint); the older manifest would fail every fetch from now on.
        if (
            latest is None
            or msg.version > latest.version
            or (msg.version == latest.version and msg.manifest.digest != latest.manifest.digest)
        ):
            self._latest = msg
            self._new_policy.set()

    async def _weights_loop(self) -> None:
        assert self.engine is not None
        while True:
            await self._new_policy.wait()
            self._new_policy.clear()
            pub = self._latest
            if pub is None or pub.version <= self.engine.version:
                continue
            if (pub.manifest.kind == "lora") != self.engine.lora_enabled:
                # [learner.lora] differs between the learner's config and ours: no use fetching
                WEIGHTS_REJECTED.labels(reason="kind").inc()
                log.error(
                    "refused policy v%d: a %s policy, but this actor has LoRA %s",
                    pub.version,
                    pub.manifest.kind,
                    "on" if self.engine.lora_enabled else "off",
                )
                continue
            t0 = time.perf_counter()
            if self._weights_buffer is None:
                self._weights_buffer = WeightBuffer()
            try:
                path = await fetch_weights(
                    pub.weights_endpoint,
                    pub.manifest,
                    self.actor_id,
                    curve=self._weights_curve,
                    buffer=self._weights_buffer,
                )
            except WeightDigestMismatch as e:
                # Retrying cannot help: wait for the broker's next announcement (a newer
                # version, or this one re-published) and keep running the current policy.
                log.error("refused policy v%d: %s", pub.version, e)
                continue
            except Exception as e:
                log.warning("fetching policy v%d failed: %s; will retry", pub.version, e)
                await asyncio.sleep(1.0)
                self._new_policy.set()
                continue
            fetched = time.perf_counter() - t0
            try:
                phases = await self.engine.update_weights(
                    path, pub.version, pub.manifest.adapter_config
                )
            except PolicyRejected as e:
                WEIGHTS_REJECTED.labels(reason="adapter").inc()
                log.error("refused policy v%d: %s", pub.version, e)
                continue
            VERSION.set(self.engine.version)
            UPDATES.inc()
            WEIGHTS_SYNC_SECONDS.labels(phase="fetch").observe(fetched)
            WEIGHTS_SYNC_SECONDS.labels(phase="total").observe(time.perf_counter() - t0)
            log.info(
                "policy v%d loaded in %.3fs (fetch %.3fs, %s)",
                pub.version,
                time.perf_counter() - t0,
                fetched,
                ", ".join(f"{k} {v:.3f}s" for k, v in phases.items()),
            )

"""The actor process (`actor.runner.Actor`) on a scripted engine and a fake broker client
(tests/unit/actor/fakes.py): leases in, one episode per group member, trajectories to the
outbox, evaluation scored and reported, failures kept to the episode they hit."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
from prometheus_client import REGISTRY

from actor.build import TextFormat
from actor.engine import EngineDead
from actor.runner import Actor
from learner.tiny_model import build_tokenizer
from shared import protocol as P
from shared.config import Config
from tests.unit.actor.fakes import FakeClient, FakeEngine, RecordingOutbox

GROUP = 4
TOOL_ENV = "tests.unit.actor.fakes:ToolEnv"  # loaded by name, as a user's environment is


def lease(lease_id: str = "L1", purpose: str = "train", **kw) -> P.Lease:
    task = P.TaskSpec(
        task_id=f"tool-{lease_id}", env=TOOL_ENV, family="f", difficulty=1.0, payload=kw
    )
    return P.Lease(lease_id=lease_id, task=task, group_size=GROUP, deadline_s=30.0, purpose=purpose)


@pytest.fixture(scope="module")
def text() -> TextFormat:
    return TextFormat(build_tokenizer(), [], None)


@pytest.fixture
def actor(text):
    cfg = Config()
    cfg = msgspec.structs.replace(
        cfg,
        broker=msgspec.structs.replace(cfg.broker, group_size=GROUP),
        actor=msgspec.structs.replace(cfg.actor, max_concurrent_episodes=2 * GROUP),
    )
    a = Actor(cfg, actor_id="actor-1")
    real = a.client
    a.client, a.outbox, a.engine, a.text = FakeClient(), RecordingOutbox(), FakeEngine(), text
    yield a
    real.close()


async def finish(a: Actor, timeout: float = 10.0) -> None:
    """Until every episode slot is free again."""
    async with asyncio.timeout(timeout):
        while a._free < a.acfg.max_concurrent_episodes:
            await asyncio.sleep(0.01)


async def test_a_lease_plays_group_size_episodes_into_the_outbox(actor) -> None:
    actor.client.grants.append(P.TaskGrant(leases=[lease("L1"), lease("L2")]))
    loop = asyncio.create_task(actor._lease_loop())
    try:
        async with asyncio.timeout(10):
            while len(actor.outbox) < 2 * GROUP:
                await asyncio.sleep(0.01)
    finally:
        loop.cancel()
    await finish(actor)
    trajs = actor.outbox.items
    for lease_id in ("L1", "L2"):
        group = [t for t in trajs if t.group_id == lease_id]
        assert len(group) == GROUP
        assert {t.task_id for t in group} == {f"tool-{lease_id}"}
        assert {t.lease_id for t in group} == {lease_id}
    assert len({t.traj_id for t in trajs}) == 2 * GROUP
    assert all(t.termination == P.Termination.DONE and t.n_turns == 3 for t in trajs)
    assert actor.episodes_done == 2 * GROUP


async def first_request(a: Actor) -> P.Base:
    """What the lease loop sends first."""
    loop = asyncio.create_task(a._lease_loop())
    try:
        async with asyncio.timeout(10):
            while not a.client.sent:
                await asyncio.sleep(0.01)
    finally:
        loop.cancel()
    return a.client.sent[0]


async def test_free_slots_ask_for_whole_groups_and_one_more_ahead(actor) -> None:
    # 8 free slots = 2 groups of 4, and [actor] leases_ahead = 1 group asked for ahead
    assert await first_request(actor) == P.TaskRequest(n=3)


async def test_a_lease_held_ahead_starts_when_a_group_ends_without_asking_again(actor) -> None:
    actor.engine.hold = asyncio.Event()  # the first two groups keep generating until set
    actor.client.grants.append(P.TaskGrant(leases=[lease("L1"), lease("L2"), lease("L3")]))
    loop = asyncio.create_task(actor._lease_loop())
    try:
        async with asyncio.timeout(10):
            while actor._free > 0 or not actor._ready:
                await asyncio.sleep(0.01)
            assert [held.lease_id for held, _ in actor._ready] == ["L3"]
            actor.engine.hold.set()  # L1 and L2 end; L3 takes their slots at once
            while len(actor.outbox) < 3 * GROUP:
                await asyncio.sleep(0.01)
    finally:
        loop.cancel()
    await finish(actor)
    # one request, answered by one grant, played all three groups on 8 slots
    assert {t.group_id for t in actor.outbox.items} == {"L1", "L2", "L3"}
    assert actor.client.sent[0] == P.TaskRequest(n=3) and not actor.client.grants


async def test_sync_actors_hold_no_lease_ahead(actor) -> None:
    actor.acfg = msgspec.structs.replace(actor.acfg, sync=True)
    actor.cfg = msgspec.structs.replace(
        actor.cfg, learner=msgspec.structs.replace(actor.cfg.learner, batch_groups=2)
    )
    assert await first_request(actor) == P.TaskRequest(n=2)


async def test_a_graceful_stop_plays_the_leases_held_ahead(actor) -> None:
    actor._ready.append((lease("L9"), 0.0))
    stop = asyncio.create_task(actor.stop_gracefully(grace_s=10))
    async with asyncio.timeout(10):
        await stop
    assert {t.group_id for t in actor.outbox.items} == {"L9"}
    assert len(actor.outbox) == GROUP and not actor._ready


async def test_an_eval_lease_is_scored_and_reported_never_sent_for_training(actor) -> None:
    actor.engine.version = 5
    for k in range(GROUP):
        await actor._episode(lease("E1", purpose="eval"), k)
    assert len(actor.outbox) == 0 and actor.episodes_done == 0
    (outcome,) = actor.client.sent
    assert isinstance(outcome, P.EvalOutcome) and outcome.lease_id == "E1"
    assert len(outcome.rewards) == GROUP and outcome.policy_versions == [5] * GROUP


async def test_an_engine_error_drops_only_that_episode(actor) -> None:
    actor.engine.fail = RuntimeError("CUDA error: an illegal memory access")
    actor._free -= 1  # the lease loop takes the slot before it starts the episode
    await actor._episode(lease(), 0)
    assert len(actor.outbox) == 0 and actor.episodes_done == 0
    assert actor._free == actor.acfg.max_concurrent_episodes  # the slot is given back
    assert not actor._stop.is_set() and actor._fatal is None  # the actor plays on
    actor.engine.fail = None
    actor._free -= 1
    await actor._episode(lease(), 1)
    assert len(actor.outbox) == 1


async def test_a_failed_eval_episode_is_scored_as_a_failure(actor) -> None:
    actor.engine.fail = RuntimeError("boom")
    for k in range(GROUP):
        await actor._episode(lease("E2", purpose="eval"), k)
    (outcome,) = actor.client.sent
    assert outcome.rewards == [0.0] * GROUP and outcome.successes == [False] * GROUP


async def test_a_dead_engine_stops_the_actor_with_its_error(actor) -> None:
    actor.engine.fail = EngineDead("the vLLM engine process died")
    await actor._episode(lease(), 0)
    assert actor._stop.is_set() and isinstance(actor._fatal, EngineDead)
    assert len(actor.outbox) == 0


async def test_an_env_error_is_sent_as_an_env_error_episode(actor) -> None:
    await actor._episode(lease(env_error_at=0), 0)
    (traj,) = actor.outbox.items
    assert traj.termination == P.Termination.ENV_ERROR and not traj.success


async def test_an_episode_still_running_at_the_lease_timeout_is_stopped(actor) -> None:
    def timed_out() -> float:
        return REGISTRY.get_sample_value("headrace_actor_episodes_timed_out_total") or 0.0

    before = timed_out()
    actor.engine.hold = asyncio.Event()  # a generation that never ends
    hung = msgspec.structs.replace(lease(), timeout_s=0.05)
    actor._free -= 1
    await actor._episode(hung, 0)
    assert timed_out() == before + 1
    assert len(actor.outbox) == 0
    assert actor._free == actor.acfg.max_concurrent_episodes


async def test_a_grant_is_looked_for_before_asking_only_while_a_request_is_unanswered(
    actor,
) -> None:
    """Every TaskRequest is answered by one grant; only one that came after its request's
    5 s wait can be here already. So a request is sent at once (no 10 ms look per group), and
    after a timeout the late grant is used before anything more is asked."""
    actor.client.grants.append(P.TaskGrant(leases=[lease("L1")]))
    grant = await actor._next_grant(2)
    assert actor.client.sent == [P.TaskRequest(n=2)] and grant.leases[0].lease_id == "L1"
    assert actor._unanswered == 0
    actor._unanswered = 1  # a request whose 5 s wait ran out: its grant comes late
    actor.client.grants.append(P.TaskGrant(leases=[lease("L2")]))
    grant = await actor._next_grant(2)
    assert grant.leases[0].lease_id == "L2" and len(actor.client.sent) == 1  # nothing asked
    assert actor._unanswered == 0


async def test_tokens_and_rewards_are_counted_per_episode(actor) -> None:
    def tokens() -> float:
        return REGISTRY.get_sample_value("headrace_actor_tokens_generated_total") or 0.0

    before = tokens()
    actor._free -= 1
    await actor._episode(lease(), 0)
    (traj,) = actor.outbox.items
    assert tokens() - before == int(traj.array("loss_mask").sum()) > 0
    assert list(actor._recent_rewards) == [traj.outcome_reward]

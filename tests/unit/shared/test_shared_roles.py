"""Roles are authorised: under CurveZMQ each key stands for one role and the broker refuses
every message that role may not send; routing ids stay bound to their key; the weight
endpoint serves actor keys only; forged policy versions are refused and cannot evict replay.
Real sockets on loopback, real keys."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
from prometheus_client import REGISTRY

from learner.publish import WeightPublisher
from shared import protocol as P
from shared.cli import main as cli_main
from shared.config import Config, SecurityConfig
from shared.security import client_keys, client_roles, generate_keys, server_keys
from shared.transport import Client
from shared.weights import fetch_blob
from tests.broker_helpers import make_traj, running
from tests.unit.broker.test_broker_server import FakeClock
from tests.unit.shared.test_shared_protocol import MANIFEST
from tests.unit.shared.test_shared_security import _state_dict, refused, secured

FORGED = P.PolicyPublished(version=2**40, weights_endpoint="tcp://evil:1", manifest=MANIFEST)


def hello(role: str, peer_id: str) -> P.Hello:
    return P.Hello(role=role, peer_id=peer_id, protocol_version=P.PROTOCOL_VERSION)


def forbidden_count() -> float:
    return REGISTRY.get_sample_value("headrace_rejected_frames_total", {"reason": "forbidden"}) or 0


@pytest.fixture()
def sec(tmp_path: Path) -> SecurityConfig:
    generate_keys(tmp_path / "keys", clients=["learner", "cli", "actor-0", "actor-1"])
    return SecurityConfig(curve=True, keys_dir=str(tmp_path / "keys"))


def as_role(sec: SecurityConfig, key: str) -> SecurityConfig:
    """The config of a peer holding `key` (e.g. actor-1's own secret)."""
    return msgspec.structs.replace(sec, secret_key=str(Path(sec.keys_dir) / f"{key}.key_secret"))


async def expect_error(c: Client, msg: P.Base, reason: str) -> str:
    with pytest.raises(P.ProtocolError) as e:
        await c.request(msg, (P.Welcome, P.Batch, P.NotReady, P.TaskGrant), timeout=5, retries=0)
    assert e.value.reason == reason, e.value
    return e.value.detail


def test_keys_generate_one_key_per_actor(tmp_path: Path) -> None:
    out = tmp_path / "keys"
    with pytest.raises(SystemExit) as exit_:
        cli_main(["keys", "generate", str(out), "--actors", "3"])
    assert exit_.value.code == 0
    allowed = sorted(p.name for p in (out / "clients").iterdir())
    assert allowed == ["actor-0.key", "actor-1.key", "actor-2.key", "cli.key", "learner.key"]
    roles = client_roles(out / "clients")
    assert sorted(roles.values()) == ["actor", "actor", "actor", "cli", "learner"]


async def test_each_key_may_send_only_what_its_role_sends(sec: SecurityConfig) -> None:
    before = forbidden_count()

    async with running(secured(sec)) as (broker, _):
        assert broker.server is not None
        ep = broker.server.endpoint
        actor = Client(ep, "actor-1", curve=client_keys(as_role(sec, "actor-1"), "actor", "broker"))
        learner = Client(ep, "learner", curve=client_keys(sec, "learner", "broker"))
        cli = Client(ep, "cli-1", curve=client_keys(sec, "cli", "broker"))
        for c in (actor, learner, cli):
            c.start()
        try:
            # an actor key: its own messages, never the learner's
            await actor.request(hello("actor", "actor-1"), P.Welcome, timeout=5)
            assert "actor may not send PolicyPublished" in await expect_error(
                actor, FORGED, "forbidden"
            )
            await expect_error(actor, P.SampleRequest(batch_size=2), "forbidden")
            await expect_error(actor, hello("learner", "actor-1"), "forbidden")
            assert broker.relay.policy is None and broker.table.size == 0
            # the learner key samples and publishes; it takes no leases
            await learner.request(hello("learner", "l"), P.Welcome, timeout=5)
            await learner.request(P.SampleRequest(batch_size=2), P.NotReady, timeout=5)
            await expect_error(learner, P.TaskRequest(n=1), "forbidden")
            # cli: status only
            assert (await cli.request(P.Status(), P.StatusReply, timeout=5)).info
            await expect_error(cli, P.TaskRequest(n=1), "forbidden")
            # a routing id stays bound to the key that first used it
            keys = client_keys(sec, "cli", "broker")
            thief = Client(ep, "learner", curve=keys, routing_id=learner.routing_id)
            thief.start()
            try:
                await expect_error(thief, P.Status(), "forbidden")
            finally:
                thief.close()
        finally:
            for c in (actor, learner, cli):
                c.close()
    assert forbidden_count() >= before + 6


async def test_status_names_each_peer_by_its_key_and_the_one_active_learner(
    tmp_path: Path,
) -> None:
    """A peer id is whatever a peer says (a Hello's, a Heartbeat's): a second learner key
    heartbeating as "actor-0" shows in Status under its key's name, and not as active."""
    generate_keys(tmp_path / "keys", clients=["learner", "learner-rival", "cli"])
    sec = SecurityConfig(curve=True, keys_dir=str(tmp_path / "keys"))
    async with running(secured(sec)) as (broker, _):
        assert broker.server is not None
        ep = broker.server.endpoint
        learner = Client(ep, "learner", curve=client_keys(sec, "learner", "broker"))
        rival_keys = client_keys(as_role(sec, "learner-rival"), "learner", "broker")
        rival = Client(ep, "rival", curve=rival_keys)
        for c in (learner, rival):
            c.start()
        try:
            await learner.request(hello("learner", "learner"), P.Welcome, timeout=5)
            await expect_error(rival, hello("learner", "actor-0"), "forbidden")
            await rival.send(P.Heartbeat(peer_id="actor-0"))
            info = (await rival.request(P.Status(), P.StatusReply, timeout=5)).info
        finally:
            for c in (learner, rival):
                c.close()
    shown = {(x["id"], x["key"], x["active"]) for x in info["learners"]}
    assert shown == {("learner", "learner", True), ("actor-0", "learner-rival", False)}


async def test_weight_endpoint_serves_actor_keys_only(sec: SecurityConfig) -> None:
    pub = WeightPublisher(
        "tcp://127.0.0.1:0", chunk_bytes=512, curve=server_keys(sec, "learner", ("actor",))
    )
    pub.start()
    manifest = pub.publish(1, _state_dict())
    actor_keys = client_keys(as_role(sec, "actor-0"), "actor", "learner")
    actor = Client(pub.endpoint, "actor-0", curve=actor_keys)
    cli = None
    try:
        assert await fetch_blob(actor, manifest, timeout=5)
        cli = Client(pub.endpoint, "cli-1", curve=client_keys(sec, "cli", "learner"))
        await refused(cli, P.WeightRequest(version=1, chunk=0), P.WeightChunk, "learner")
    finally:
        actor.close()
        if cli is not None:
            cli.close()
        await pub.aclose()


async def test_forged_versions_neither_lock_out_the_learner_nor_evict_replay(
    tmp_path: Path,
) -> None:
    cfg = Config()
    broker_cfg = msgspec.structs.replace(
        cfg.broker, durability="none", group_size=2, max_staleness=4
    )
    cfg = msgspec.structs.replace(cfg, broker=broker_cfg)

    async with running(cfg) as (broker, client):
        actor, learner = client("a"), client("l")
        await actor.request(P.TrajectoryBatch(items=[make_traj("g", i) for i in range(2)]), P.Ack)
        await learner.request(hello("learner", "l"), P.Welcome)
        detail = await expect_error(learner, FORGED, "invalid")
        assert "implausible" in detail and broker.policy_version == 0
        real = P.PolicyPublished(version=1, weights_endpoint="tcp://h:1", manifest=MANIFEST)
        await learner.send(real)
        await learner.request(P.Status(), P.StatusReply)
        assert broker.policy_version == 1  # the real learner goes on
        # a huge version in a SampleRequest evicts nothing: the group is handed out
        batch = await learner.request(P.SampleRequest(batch_size=2, policy_version=2**62), P.Batch)
        assert len(batch.items) == 2 and "stale" not in broker.books.retirement.counts


async def test_one_learner_per_run_a_second_is_refused_and_a_replaced_one_fenced(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    cfg = Config()
    cfg = msgspec.structs.replace(
        cfg, broker=msgspec.structs.replace(cfg.broker, durability="none", group_size=2)
    )
    timeout = cfg.broker.heartbeat_timeout_s

    async with running(cfg, clock=clock) as (broker, client):
        first, second = client("learner-a"), client("learner-b")
        await first.request(hello("learner", "a"), P.Welcome)
        detail = await expect_error(second, hello("learner", "b"), "forbidden")
        assert "learner a is active" in detail
        await expect_error(second, P.SampleRequest(batch_size=2), "forbidden")
        with pytest.raises(P.ProtocolError):
            await second.request(FORGED, P.Welcome, timeout=5, retries=0)
        assert broker.relay.policy is None
        # the first learner heartbeats while it trains: still the active one
        clock.t += timeout - 1
        await first.send(P.Heartbeat(peer_id="a"))
        await first.request(P.SampleRequest(batch_size=2), P.NotReady)
        clock.t += timeout - 1
        await expect_error(second, hello("learner", "b"), "forbidden")
        # silent for longer than the heartbeat timeout: the second takes over ...
        clock.t += timeout + 1
        await second.request(hello("learner", "b"), P.Welcome)
        assert broker.fence.epoch == 2
        await second.request(P.SampleRequest(batch_size=2), P.NotReady)
        # ... and the first, back from a long stall, is fenced off
        assert "fenced" in await expect_error(first, P.SampleRequest(batch_size=2), "forbidden")

"""Routing ids: a Client's is `<peer_id>/<nonce>`, so no other peer can take it over (the
broker's ROUTER hands an id to whoever connects with it last) and have the broker's replies
to it diverted; the broker never shows it; a restarted process (a new id) retires its old ids
at its Hello (leases requeued at once, no ghost in Status, the learner's fence passed on).
Real sockets on loopback; under curve, real keys."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import msgspec
import pytest
import zmq
import zmq.asyncio

from shared import protocol as P
from shared.config import Config, SecurityConfig
from shared.security import CurveClient, client_keys, generate_keys, secure_client
from shared.transport import Client, peer_name
from tests.broker_helpers import running
from tests.unit.broker.test_broker_server import FakeClock, config, leased, status
from tests.unit.shared.test_shared_protocol import MANIFEST
from tests.unit.shared.test_shared_security import secured


def hello(role: str, peer_id: str) -> P.Hello:
    return P.Hello(role=role, peer_id=peer_id, protocol_version=P.PROTOCOL_VERSION)


@pytest.fixture()
def sec(tmp_path: Path) -> SecurityConfig:
    generate_keys(tmp_path / "keys", clients=["learner", "learner-2", "cli", "actor-0", "actor-1"])
    return SecurityConfig(curve=True, keys_dir=str(tmp_path / "keys"))


def keys_of(sec: SecurityConfig, key: str, role: str) -> CurveClient | None:
    """The keys of a peer holding `key` (e.g. actor-1's own secret) as `role`."""
    mine = msgspec.structs.replace(sec, secret_key=str(Path(sec.keys_dir) / f"{key}.key_secret"))
    return client_keys(mine, role, "broker")


async def nothing_for(sock: zmq.asyncio.Socket, seconds: float) -> list[P.Base]:
    """What `sock` received within `seconds` (the test wants none of it)."""
    got: list[P.Base] = []
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while (left := end - loop.time()) > 0:
        if await sock.poll(int(left * 1000)):
            got.append(P.decode(await sock.recv()))
    return got


def test_a_clients_routing_id_is_its_peer_id_and_a_nonce_new_for_every_client() -> None:
    a, b = Client("tcp://127.0.0.1:9", "actor-1"), Client("tcp://127.0.0.1:9", "actor-1")
    try:
        assert a.routing_id != b.routing_id and b"actor-1" not in (a.routing_id, b.routing_id)
        name, _, nonce = a.routing_id.decode().rpartition("/")
        assert name == "actor-1" and len(nonce) == 16  # 64 random bits
        assert a.sock.getsockopt(zmq.ROUTING_ID) == a.routing_id  # fixed for its life
        assert peer_name(a.routing_id) == "actor-1" and peer_name(b"raw-dealer") == "raw-dealer"
        assert peer_name(Client("tcp://127.0.0.1:9", "a/b").routing_id) == "a/b"
    finally:
        a.close()
        b.close()


async def test_status_shows_peer_ids_never_routing_ids(tmp_path: Path) -> None:
    async with running(config(tmp_path)) as (broker, client):
        actor, quiet, learner = client("actor-1"), client("quiet"), client("learner")
        await actor.request(hello("actor", "actor-1"), P.Welcome)
        await learner.request(hello("learner", "learner"), P.Welcome)
        await quiet.request(P.TaskRequest(n=1), P.TaskGrant)  # never says Hello
        info = await status(learner)
        assert sorted(a["id"] for a in info["actors"]) == ["actor-1", "quiet"]
        assert [x["id"] for x in info["learners"]] == ["learner"]
        text = json.dumps(info)
        for c in (actor, quiet, learner):
            nonce = c.routing_id.decode().rpartition("/")[2]
            assert nonce not in text


async def test_under_curve_a_taker_of_an_actors_peer_id_gets_none_of_its_replies(
    sec: SecurityConfig,
) -> None:
    """A peer holding another admitted key connects with the routing id an actor's peer id
    would give (what the broker's ROUTER would hand over to it): the actor's relayed policy,
    grant and ack still reach the actor, and the taker gets none of them."""
    async with running(secured(sec)) as (broker, _):
        assert broker.server is not None
        ep = broker.server.endpoint
        actor = Client(ep, "actor-1", curve=keys_of(sec, "actor-1", "actor"))
        learner = Client(ep, "learner", curve=keys_of(sec, "learner", "learner"))
        taker = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        taker.setsockopt(zmq.LINGER, 0)
        taker.setsockopt(zmq.ROUTING_ID, b"actor-1")
        taker_keys = keys_of(sec, "cli", "cli")  # any admitted key
        assert taker_keys is not None
        watch = secure_client(taker, taker_keys, ep)
        for c in (actor, learner):
            c.start()
        try:
            await actor.request(hello("actor", "actor-1"), P.Welcome, timeout=5)
            await learner.request(hello("learner", "learner"), P.Welcome, timeout=5)
            taker.connect(ep)
            # connected once the broker answers it (a cli key may ask for Status)
            await taker.send(P.encode(P.Status()))
            assert await taker.poll(5000), "the taker was never answered"
            answer = P.decode(await taker.recv())
            if isinstance(answer, P.StatusReply):  # it shows no routing id to name
                assert actor.routing_id.decode().rpartition("/")[2] not in json.dumps(answer.info)
            # a policy relayed to the actors, a grant, an ack: all the actor's
            pub = P.PolicyPublished(version=1, weights_endpoint="tcp://h:1", manifest=MANIFEST)
            await learner.send(pub)
            assert (await actor.recv(P.PolicyPublished, timeout=5)).version == 1
            grant = await actor.request(P.TaskRequest(n=1), P.TaskGrant, timeout=2, retries=0)
            (lease,) = grant.leases
            ack = await actor.request(leased(lease), P.Ack, timeout=2, retries=0)
            assert len(ack.traj_ids) == 2 and not ack.rejected
            assert await nothing_for(taker, 0.5) == []
        finally:
            watch.stop()
            taker.close()
            actor.close()
            learner.close()


async def test_a_restarted_actor_gets_its_old_leases_requeued_at_its_hello(
    tmp_path: Path,
) -> None:
    async with running(config(tmp_path)) as (broker, client):
        first = client("actor-1")
        await first.request(hello("actor", "actor-1"), P.Welcome)
        lease = (await first.request(P.TaskRequest(n=1), P.TaskGrant)).leases[0]
        assert broker.leases.get(lease.lease_id).peer == first.routing_id
        first.close()  # the process dies; its successor has the same peer id, a new routing id
        second = client("actor-1")
        await second.request(hello("actor", "actor-1"), P.Welcome)
        assert len(broker.leases) == 0 and list(broker.leases.requeued) == [lease.task]
        info = await status(second)
        assert [a["id"] for a in info["actors"]] == ["actor-1"]  # no ghost of the first
        again = (await second.request(P.TaskRequest(n=1), P.TaskGrant)).leases[0]
        assert again.task == lease.task
        assert broker.leases.get(again.lease_id).peer == second.routing_id
        # another peer id's Hello leaves them alone
        await client("actor-2").request(hello("actor", "actor-2"), P.Welcome)
        assert again.lease_id in broker.leases


async def test_across_a_broker_restart_a_process_keeps_its_leases_and_its_successor_not(
    tmp_path: Path,
) -> None:
    """Leases are persisted by routing id: the same process reconnecting (same id) keeps
    its lease and delivers its group; a new process of the same peer id, heard first by the
    restarted broker, has the old process's leases requeued at its Hello."""
    async with running(config(tmp_path)) as (broker, client):
        actor = client("actor-1")
        await actor.request(hello("actor", "actor-1"), P.Welcome)
        kept, lost = (await actor.request(P.TaskRequest(n=2), P.TaskGrant)).leases
        ident = actor.routing_id
        await status(actor)  # the lease rows are written in the background: let them land
    async with running(config(tmp_path)) as (broker, client):
        assert len(broker.leases) == 2
        back = Client(broker.server.endpoint, "actor-1", routing_id=ident)  # type: ignore[union-attr]
        back.start()
        try:
            await back.send(P.Heartbeat(peer_id="actor-1"))
            ack = await back.request(leased(kept), P.Ack)
            assert len(ack.traj_ids) == 2 and not ack.rejected
            assert broker.leases.get(lost.lease_id).peer == ident  # still its
        finally:
            back.close()
        successor = client("actor-1")
        await successor.request(hello("actor", "actor-1"), P.Welcome)
        assert len(broker.leases) == 0 and list(broker.leases.requeued) == [lost.task]


async def test_under_curve_only_the_same_key_retires_an_actors_old_routing_ids(
    sec: SecurityConfig,
) -> None:
    async with running(secured(sec)) as (broker, _):
        assert broker.server is not None
        ep = broker.server.endpoint
        clients: list[Client] = []

        def connect(peer_id: str, key: str, role: str = "actor") -> Client:
            c = Client(ep, peer_id, curve=keys_of(sec, key, role))
            c.start()
            clients.append(c)
            return c

        try:
            actor = connect("actor-1", "actor-1")
            await actor.request(hello("actor", "actor-1"), P.Welcome, timeout=5)
            lease = (await actor.request(P.TaskRequest(n=1), P.TaskGrant, timeout=5)).leases[0]
            # another actor key claiming the same peer id: a new peer, the lease stays
            impostor = connect("actor-1", "actor-0")
            await impostor.request(hello("actor", "actor-1"), P.Welcome, timeout=5)
            assert lease.lease_id in broker.leases and actor.routing_id in broker.peers
            # the same key under the same peer id: a restart
            actor.close()
            restarted = connect("actor-1", "actor-1")
            await restarted.request(hello("actor", "actor-1"), P.Welcome, timeout=5)
            assert lease.lease_id not in broker.leases and actor.routing_id not in broker.peers
            assert broker.server.key_of(actor.routing_id) is None  # its binding forgotten
            assert impostor.routing_id in broker.peers
            # the learner, restarted, takes its fence over at once; another learner key
            # under the same peer id does not
            learner = connect("learner", "learner", "learner")
            await learner.request(hello("learner", "learner"), P.Welcome, timeout=5)
            learner.close()
            other = connect("learner", "learner-2", "learner")
            with pytest.raises(P.ProtocolError, match="active"):
                await other.request(hello("learner", "learner"), P.Welcome, timeout=5, retries=0)
            again = connect("learner", "learner", "learner")
            await again.request(hello("learner", "learner"), P.Welcome, timeout=5)
            assert broker.fence.ident == again.routing_id
            await again.request(P.SampleRequest(batch_size=2), P.NotReady, timeout=5)
        finally:
            for c in clients:
                c.close()


async def test_a_restarted_learner_takes_the_fence_over_at_once(tmp_path: Path) -> None:
    clock = FakeClock()
    cfg = Config()
    cfg = msgspec.structs.replace(
        cfg, broker=msgspec.structs.replace(cfg.broker, durability="none", group_size=2)
    )
    async with running(cfg, clock=clock) as (broker, client):
        first = client("learner")
        await first.request(hello("learner", "learner"), P.Welcome)
        await first.request(P.SampleRequest(batch_size=2), P.NotReady)
        first.close()  # killed; restarted well within the heartbeat timeout
        second = client("learner")
        await second.request(hello("learner", "learner"), P.Welcome)
        await second.request(P.SampleRequest(batch_size=2), P.NotReady)
        assert broker.fence.ident == second.routing_id
        info = await status(second)
        assert [x["id"] for x in info["learners"]] == ["learner"]


async def test_forgotten_peers_leave_the_servers_key_bindings(sec: SecurityConfig) -> None:
    clock = FakeClock()
    async with running(secured(sec), clock=clock) as (broker, _):
        assert broker.server is not None
        cli = Client(broker.server.endpoint, "cli-1", curve=keys_of(sec, "cli", "cli"))
        cli.start()
        try:
            await cli.request(P.Status(), P.StatusReply, timeout=5)
            assert broker.server.key_of(cli.routing_id) is not None
            clock.t += 2 * 3600
            broker.reap()
            assert cli.routing_id not in broker.peers
            assert broker.server.key_of(cli.routing_id) is None
        finally:
            cli.close()

"""CurveZMQ on the broker and the weight endpoint, key generation, and the actor's digest check.

Real sockets on loopback: a listed client key is served; an unlisted key, a plaintext client
and a client trusting the wrong server key get nothing (their request times out) and each
refusal is counted in `headrace_auth_failures_total`.
"""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

import msgspec
import pytest
import torch
import zmq

from actor.weights import WEIGHTS_REJECTED, WeightBuffer, WeightDigestMismatch, fetch_weights
from learner.publish import WeightPublisher, serialize_state_dict
from shared import protocol as P
from shared.cli import main as cli_main
from shared.config import Config, SecurityConfig, load_config
from shared.security import (
    AUTH_FAILURES,
    CurveClient,
    SecurityError,
    client_keys,
    generate_keys,
    server_keys,
)
from shared.transport import Client, PeerUnreachable
from shared.weights import digest_of_chunks, fetch_blob
from tests.broker_helpers import running

HELLO = P.Hello(role="actor", peer_id="actor-1", protocol_version=P.PROTOCOL_VERSION)


def failures(server: str) -> float:
    return sum(
        s.value
        for m in AUTH_FAILURES.collect()
        for s in m.samples
        if s.name.endswith("_total") and s.labels["server"] == server
    )


def rejected(reason: str) -> float:
    return WEIGHTS_REJECTED.labels(reason=reason)._value.get()


@pytest.fixture()
def sec(tmp_path: Path) -> SecurityConfig:
    generate_keys(tmp_path / "keys")
    return SecurityConfig(curve=True, keys_dir=str(tmp_path / "keys"))


def secured(sec: SecurityConfig) -> Config:
    cfg = Config()
    return msgspec.structs.replace(
        cfg, security=sec, broker=msgspec.structs.replace(cfg.broker, durability="none")
    )


def strangers(sec: SecurityConfig, server: str) -> dict[str, CurveClient | None]:
    """Clients the server must refuse, by the reason it should count."""
    listed = client_keys(sec, "actor", server)
    assert listed is not None
    public, secret = zmq.curve_keypair()
    return {
        "unlisted_key": CurveClient(public, secret, listed.server_public),
        "mechanism_mismatch": None,  # plaintext
        "cryptographic": CurveClient(listed.public, listed.secret, public),  # wrong server key
    }


async def refused(client: Client, msg: P.Base, reply: type, server: str) -> None:
    before = failures(server)
    client.start()
    with pytest.raises(PeerUnreachable):
        await client.request(msg, reply, timeout=0.5, retries=0)
    for _ in range(40):  # the monitor thread counts asynchronously
        if failures(server) > before:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"no auth failure counted on {server}")


def test_keys_generate_cli_writes_pairs_and_allow_list(tmp_path: Path) -> None:
    out = tmp_path / "keys"
    with pytest.raises(SystemExit) as exit_:
        cli_main(["keys", "generate", str(out)])
    assert exit_.value.code == 0
    for role in ("broker", "learner", "actor", "cli"):
        secret = out / f"{role}.key_secret"
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        public, key = zmq.auth.load_certificate(secret)
        assert key is not None and len(key) == 40
        assert zmq.auth.load_certificate(out / f"{role}.key") == (public, None)
    assert sorted(p.name for p in (out / "clients").iterdir()) == [
        "actor.key",
        "cli.key",
        "learner.key",
    ]
    with pytest.raises(SystemExit) as exit_:  # never overwrites keys silently
        cli_main(["keys", "generate", str(out)])
    assert exit_.value.code == 1
    generate_keys(out, force=True)
    assert stat.S_IMODE((out / "actor.key_secret").stat().st_mode) == 0o600


def test_security_config(tmp_path: Path) -> None:
    assert Config().security.curve is False
    assert server_keys(Config().security, "broker") is None
    assert client_keys(Config().security, "actor", "broker") is None
    path = tmp_path / "c.toml"
    path.write_text('[security]\ncurve = true\nkeys_dir = "nowhere"\n')
    cfg = load_config(path)
    with pytest.raises(SecurityError, match="nowhere"):
        server_keys(cfg.security, "broker")


async def test_broker_admits_only_listed_clients(sec: SecurityConfig) -> None:
    async with running(secured(sec)) as (broker, _):
        assert broker.server is not None
        endpoint = broker.server.endpoint
        listed = Client(endpoint, "actor-1", curve=client_keys(sec, "actor", "broker"))
        listed.start()
        welcome = await listed.request(HELLO, P.Welcome, timeout=5, retries=0)
        assert welcome.run_id == broker.run_id
        peers = [listed]
        for name, keys in strangers(sec, "broker").items():
            c = Client(endpoint, f"stranger-{name}", curve=keys)
            peers.append(c)
            await refused(c, HELLO, P.Welcome, "broker")
            assert AUTH_FAILURES.labels(server="broker", reason=name)._value.get() >= 1
        assert not [ident for ident in broker.peers if ident.startswith(b"stranger")]
        # The listed client is unaffected by the refusals around it.
        assert (await listed.request(P.Status(), P.StatusReply, timeout=5)).info
        for c in peers:
            c.close()


def _state_dict() -> dict[str, torch.Tensor]:
    return {"w": torch.arange(600, dtype=torch.float32).reshape(20, 30), "b": torch.ones(7)}


async def test_weight_endpoint_admits_only_listed_clients(sec: SecurityConfig) -> None:
    pub = WeightPublisher("tcp://127.0.0.1:0", chunk_bytes=512, curve=server_keys(sec, "learner"))
    pub.start()
    manifest = pub.publish(1, _state_dict())
    listed = Client(pub.endpoint, "actor-1", curve=client_keys(sec, "actor", "learner"))
    others = []
    try:
        blob = await fetch_blob(listed, manifest, timeout=5)
        assert blob == serialize_state_dict(_state_dict())
        for name, keys in strangers(sec, "learner").items():
            c = Client(pub.endpoint, f"stranger-{name}", curve=keys)
            others.append(c)
            await refused(c, P.WeightRequest(version=1, chunk=0), P.WeightChunk, "learner")
    finally:
        for c in (listed, *others):
            c.close()
        await pub.aclose()


async def test_actor_rejects_weights_not_matching_the_brokers_manifest(
    sec: SecurityConfig, tmp_path: Path
) -> None:
    """The endpoint serves v1's bytes; the manifest the broker relayed says otherwise."""

    pub = WeightPublisher("tcp://127.0.0.1:0", chunk_bytes=512, curve=server_keys(sec, "learner"))
    pub.start()
    keys = client_keys(sec, "actor", "learner")
    try:
        manifest = pub.publish(1, _state_dict())
        with WeightBuffer(str(tmp_path)) as buf:
            path = await fetch_weights(pub.endpoint, manifest, "a", curve=keys, buffer=buf)
            assert Path(path).read_bytes() == serialize_state_dict(_state_dict())
            digests = ["0" * 32, *manifest.chunk_digests[1:]]
            forged = [  # a chunk the manifest (consistent in itself) says otherwise about
                msgspec.structs.replace(
                    manifest, chunk_digests=digests, digest=digest_of_chunks(digests)
                ),
                msgspec.structs.replace(manifest, digest="0" * 32),
                msgspec.structs.replace(manifest, digest_alg="blake2b-128"),
            ]
            for bad, says in zip(forged, ["chunk 0 of v1", "whole-blob", "algorithm"], strict=True):
                before = rejected("digest")
                with pytest.raises(WeightDigestMismatch, match=says):
                    await fetch_weights(pub.endpoint, bad, "a", curve=keys, buffer=buf)
                assert rejected("digest") == before + 1
    finally:
        await pub.aclose()

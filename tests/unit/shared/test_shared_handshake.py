"""The Welcome's digest: roles whose configs disagree on the run are refused at the handshake,
in one line; what only one role reads may differ. The group size is the broker's."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from shared import protocol as P
from shared.config import Config
from shared.handshake import ConfigMismatch, check_welcome, group_size, run_digest
from tests.broker_helpers import running
from tests.unit.broker.test_broker_server import config


def welcome(cfg: Config, **kw: object) -> P.Welcome:
    fields: dict = {"config_digest": run_digest(cfg), **kw}
    return P.Welcome(run_id="r", policy_version=0, weights_endpoint="", **fields)


def changed(cfg: Config, section: str, **values: object) -> Config:
    new = msgspec.structs.replace(getattr(cfg, section), **values)
    return msgspec.structs.replace(cfg, **{section: new})


def test_what_makes_the_run_differ_is_refused_in_one_line() -> None:
    cfg = Config()
    theirs = welcome(cfg)
    for other in (changed(cfg, "env", seed=7), changed(cfg, "actor", max_model_len=4096)):
        with pytest.raises(ConfigMismatch) as e:
            check_welcome(other, theirs, "actor", "tcp://b:1")
        line = str(e.value)
        assert "\n" not in line and "[env]" in line and run_digest(other) in line


def test_what_one_role_alone_reads_may_differ() -> None:
    cfg = Config()
    theirs = welcome(cfg)
    for other in (
        changed(cfg, "learner", lr=1e-3),
        changed(cfg, "broker", port=7000, group_size=3),  # the group size travels instead
        changed(cfg, "model", path="/elsewhere/on/this/host"),
        changed(cfg, "actor", temperature=0.5, broker="tcp://x:1"),
    ):
        check_welcome(other, theirs, "learner", "tcp://b:1")
    check_welcome(changed(cfg, "env", seed=7), welcome(cfg, config_digest=""), "actor", "b")


def test_the_group_size_is_the_brokers() -> None:
    ours = changed(Config(), "broker", group_size=3)
    assert group_size(ours, welcome(ours, group_size=8)) == 8
    assert group_size(ours, welcome(ours)) == 3  # a broker that does not say


async def test_an_actor_with_another_env_is_refused_at_welcome(tmp_path: Path) -> None:
    from actor.runner import Actor

    cfg = config(tmp_path)
    async with running(cfg) as (broker, _):
        assert broker.server is not None
        ours = changed(cfg, "env", seed=cfg.env.seed + 1)
        ours.actor.broker, ours.actor.connect_timeout_s = broker.server.endpoint, 5.0
        actor = Actor(ours, "a")
        actor.client.start()
        try:
            with pytest.raises(ConfigMismatch, match="differs from broker"):
                await actor._hello()
            same = Actor(msgspec.structs.replace(ours, env=cfg.env), "b")
            same.client.start()
            try:
                await same._hello()
                assert same.group_size == cfg.broker.group_size
            finally:
                same.client.close()
        finally:
            actor.client.close()

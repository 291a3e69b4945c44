"""The curriculum inside the broker: grants carry the curator's probability and version, groups
teach it, zero-variance groups are counted (and optionally kept out of replay), and its state
survives a restart."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import pytest
from prometheus_client import REGISTRY

from shared import protocol as P
from shared.config import Config, CuratorConfig
from shared.transport import Client
from tests.broker_helpers import make_traj, running

GROUP = 2


def config(data_dir: Path, **broker: object) -> Config:
    cfg = Config()
    env = msgspec.structs.replace(
        cfg.env, symbols=msgspec.structs.replace(cfg.env.symbols, levels=[1, 2], tasks_per_level=8)
    )
    b = msgspec.structs.replace(
        cfg.broker,
        data_dir=str(data_dir),
        group_size=GROUP,
        curriculum=CuratorConfig(mode="curator", pool_size=64, seed=3),
        **broker,
    )
    return msgspec.structs.replace(cfg, env=env, broker=b)


def finished_group(lease: P.Lease, rewards: list[float]) -> P.TrajectoryBatch:
    items = []
    for i, r in enumerate(rewards):
        t = make_traj(lease.lease_id, i)
        items.append(
            msgspec.structs.replace(
                t,
                task_id=lease.task.task_id,
                outcome_reward=r,
                success=r > 0,
                sample_prob=lease.sample_prob,
                curator_version=lease.curator_version,
            )
        )
    return P.TrajectoryBatch(items=items)


async def status(c: Client) -> dict:
    return (await c.request(P.Status(), P.StatusReply)).info


def zero_var(family: str) -> float:
    name = "headrace_broker_curriculum_zero_variance_groups_total"
    return REGISTRY.get_sample_value(name, {"family": family}) or 0.0


async def play(actor: Client, n_groups: int, reward_of) -> list[P.Lease]:
    leases = []
    for _ in range(n_groups):
        (lease,) = (await actor.request(P.TaskRequest(n=1), P.TaskGrant)).leases
        leases.append(lease)
        await actor.request(finished_group(lease, reward_of(lease)), P.Ack)
    return leases


async def test_grants_carry_probability_and_version_and_groups_teach_the_curator(
    tmp_path: Path,
) -> None:
    async with running(config(tmp_path, durability="none")) as (broker, client):
        actor = client("a")
        before = zero_var("L2")
        # L1 tasks are learnable (mixed outcomes), L2 tasks always fail (zero variance)
        leases = await play(
            actor, 12, lambda lease: [0.0, 1.0] if lease.task.family == "L1" else [0.0, 0.0]
        )
        assert all(0 < lease.sample_prob <= 1 for lease in leases)
        versions = [lease.curator_version for lease in leases]
        assert versions == sorted(versions) and versions[-1] >= 10  # one update a group
        info = (await status(actor))["curriculum"]
        assert info["mode"] == "curator" and info["version"] == broker.curriculum.version
        assert set(info["families"]) <= {"L1", "L2"} and info["groups"] == 12
        n_l2 = sum(lease.task.family == "L2" for lease in leases)
        assert zero_var("L2") - before == n_l2
        assert info["zero_variance_fraction"] == n_l2 / 12
        # every group still entered replay: exclusion is off by default
        assert broker.table.size == 12 * GROUP


async def test_zero_variance_groups_can_be_kept_out_of_replay(tmp_path: Path) -> None:
    cfg = config(tmp_path, durability="none", exclude_zero_variance=True)
    async with running(cfg) as (broker, client):
        actor = client("a")
        evicted = (
            REGISTRY.get_sample_value("headrace_broker_evicted_total", {"reason": "zero_variance"})
            or 0.0
        )
        await play(actor, 4, lambda lease: [1.0, 1.0])  # solved: no signal
        await play(actor, 3, lambda lease: [0.0, 1.0])
        assert broker.table.size == 3 * GROUP
        after = REGISTRY.get_sample_value(
            "headrace_broker_evicted_total", {"reason": "zero_variance"}
        )
        assert after == evicted + 4
        assert (await status(actor))["evicted"]["zero_variance"] == 4


async def test_curriculum_state_survives_a_restart(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    async with running(cfg) as (broker, client):
        await play(client("a"), 10, lambda lease: [0.0, 1.0])
        version = broker.curriculum.version
        summary = broker.curriculum.summary()
    async with running(cfg) as (broker, client):
        assert broker.curriculum.version == version
        assert broker.curriculum.summary() == summary
        (lease,) = (await client("a").request(P.TaskRequest(n=1), P.TaskGrant)).leases
        assert lease.curator_version == version


async def test_status_command_shows_the_curriculum(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`headrace status` (rich table) lists the curriculum's families with shares and rates."""
    import argparse

    import shared.cli as cli

    async with running(config(tmp_path, durability="none")) as (broker, client):
        await play(client("a"), 6, lambda lease: [0.0, 1.0])
        info = broker.status()

    async def fake_status(endpoint: str, timeout: float, curve: object = None) -> dict:
        return msgspec.json.decode(msgspec.json.encode(info))  # as it crosses the wire

    monkeypatch.setattr(cli, "_status", fake_status)
    args = argparse.Namespace(broker="tcp://127.0.0.1:1", timeout=1.0, json=False)
    # the command runs its own event loop: off this test's
    assert await asyncio.to_thread(cli.cmd_status, args) == 0
    out = capsys.readouterr().out
    assert "curriculum (curator, v6" in out
    assert "pick share" in out and "L1" in out

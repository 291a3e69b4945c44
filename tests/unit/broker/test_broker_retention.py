"""Retention: closed trajectories go first, unconsumed ones only while a limit is exceeded (whole
groups, out of replay first), deletes in bounded batches, and the file actually shrinks."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import msgspec
import pytest
from prometheus_client import REGISTRY

from broker.retention import Retention
from broker.server import Broker
from broker.store import DB_NAME, Store
from shared import protocol as P
from shared.config import Config, RetentionConfig, load_config
from shared.transport import Client
from tests.broker_helpers import make_traj, take


def deleted_metric(reason: str) -> float:
    return (
        REGISTRY.get_sample_value("headrace_broker_retention_deleted_total", {"reason": reason})
        or 0.0
    )


async def fill(store: Store, groups: list[str], size: int = 2, n_tokens: int = 8) -> dict:
    """Store `size` trajectories per group; returns group_id -> seqs."""
    res = await store.put([make_traj(g, i, n_tokens=n_tokens) for g in groups for i in range(size)])
    out: dict[str, list[int]] = {}
    for m in res.new:
        out.setdefault(m.group_id, []).append(m.seq)
    return out


async def remaining(store: Store) -> list[str]:
    rows = await store._call(
        lambda: store._db.conn.execute("SELECT traj_id FROM trajectories ORDER BY seq").fetchall()
    )
    return [r[0] for r in rows]


def test_config_section_parses(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text("[broker.retention]\nmax_age_s = 3600\nmax_bytes = 1000000\ninterval_s = 5\n")
    r = load_config(p).broker.retention
    assert (r.max_age_s, r.max_trajectories, r.max_bytes, r.interval_s) == (3600, 0, 1e6, 5)
    assert Config().broker.retention == RetentionConfig()  # defaults: unlimited


async def test_new_database_uses_incremental_auto_vacuum(tmp_path: Path) -> None:
    store = Store(tmp_path)
    await store.open()
    await store.close()
    with sqlite3.connect(tmp_path / DB_NAME) as conn:
        assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2


async def test_no_limits_delete_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path, commit_interval_s=0)
    await store.open()
    seqs = await fill(store, ["a", "b"])
    await store.claim(seqs["a"])
    r = Retention(store, RetentionConfig(), max_times_sampled=1)
    assert not r.enabled
    assert not await r.sweep()
    assert store.stored == 4
    await store.close()


async def test_count_limit_closed_first_then_oldest_unconsumed_groups(tmp_path: Path) -> None:
    store = Store(tmp_path, commit_interval_s=0)
    await store.open()
    seqs = await fill(store, ["g0", "g1", "g2", "g3", "g4"])
    await store.claim(seqs["g3"])  # consumed (max_times_sampled=1), not the oldest
    await store.retire(seqs["g1"], "stale")
    evicted: list[set[str]] = []
    before = {r: deleted_metric(r) for r in ("consumed", "evicted", "unconsumed")}
    # batch_rows=1: every delete is its own transaction, the sweep loops until done
    r = Retention(
        store,
        RetentionConfig(max_trajectories=6),
        max_times_sampled=1,
        on_evict=evicted.append,
        batch_rows=1,
    )
    assert dict(await r.sweep()) == {"consumed": 2, "evicted": 2}
    assert evicted == []  # the limit was met with closed trajectories alone
    assert await remaining(store) == ["g0-0", "g0-1", "g2-0", "g2-1", "g4-0", "g4-1"]
    assert store.stored == 6

    r.cfg = RetentionConfig(max_trajectories=3)
    assert dict(await r.sweep()) == {"unconsumed": 4}
    assert evicted == [{"g0"}, {"g2"}]  # oldest first, whole groups
    assert await remaining(store) == ["g4-0", "g4-1"]
    assert store.stored == 2
    assert deleted_metric("consumed") == before["consumed"] + 2
    assert deleted_metric("evicted") == before["evicted"] + 2
    assert deleted_metric("unconsumed") == before["unconsumed"] + 4
    await store.close()

    store = Store(tmp_path)  # the deletes are durable
    await store.open()
    assert store.stored == 2
    await store.close()


async def test_unconsumed_group_leaves_whole_even_when_interleaved(tmp_path: Path) -> None:
    store = Store(tmp_path, commit_interval_s=0)
    await store.open()
    await store.put([make_traj("a", 0), make_traj("b", 0), make_traj("a", 1)])
    evicted: list[set[str]] = []
    r = Retention(store, RetentionConfig(max_trajectories=2), 1, on_evict=evicted.append)
    assert dict(await r.sweep()) == {"unconsumed": 2}  # one over the limit: group a goes
    assert evicted == [{"a"}]
    assert await remaining(store) == ["b-0"]
    await store.close()


async def test_tombstones_name_every_deleted_trajectory(tmp_path: Path) -> None:
    """Each delete (closed and open rows) records its traj_ids in `tombstones`, committed with
    it: what an operator (and the chaos test) reads to tell a deleted row from a lost one."""
    store = Store(tmp_path, commit_interval_s=0)
    await store.open()
    seqs = await fill(store, ["g0", "g1", "g2"])
    await store.claim(seqs["g1"])
    r = Retention(store, RetentionConfig(max_trajectories=2), 1, on_evict=lambda g: None)
    assert dict(await r.sweep()) == {"consumed": 2, "unconsumed": 2}
    assert await remaining(store) == ["g2-0", "g2-1"]
    await store.close()
    with sqlite3.connect(tmp_path / DB_NAME) as conn:
        named = {t for (t,) in conn.execute("SELECT traj_id FROM tombstones")}
    assert named == {"g0-0", "g0-1", "g1-0", "g1-1"}


async def test_age_limit(tmp_path: Path) -> None:
    store = Store(tmp_path, commit_interval_s=0)
    await store.open()
    seqs = await fill(store, ["old0", "old1"])
    await store.claim(seqs["old1"])
    now = time.time()
    evicted: list[set[str]] = []
    cfg = RetentionConfig(max_age_s=100)
    young = Retention(store, cfg, 1, on_evict=evicted.append, clock=lambda: now + 50)
    assert not await young.sweep()
    later = Retention(store, cfg, 1, on_evict=evicted.append, clock=lambda: now + 1000)
    await fill(store, ["new"])  # stored "now": 1000 s before `later`'s clock, too
    got = await later.sweep()
    assert dict(got) == {"consumed": 2, "unconsumed": 4}
    assert evicted == [{"old0", "new"}] or evicted == [{"old0"}, {"new"}]
    assert store.stored == 0
    await store.close()


async def test_byte_limit_shrinks_the_files(tmp_path: Path) -> None:
    wal = tmp_path / (DB_NAME + "-wal")

    def on_disk() -> int:
        return sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file())

    store = Store(tmp_path, commit_interval_s=0)
    await store.open()
    # 2,048-token trajectories: ~32 KiB each, 40 groups of 2 -> ~2.6 MB
    seqs = await fill(store, [f"g{i:02d}" for i in range(40)], n_tokens=2048)
    await store.claim([s for v in list(seqs.values())[:30] for s in v])  # 60 consumed
    await store.compact()  # start from a checkpointed file
    big = on_disk()
    assert big > 2_500_000
    r = Retention(store, RetentionConfig(max_bytes=1_000_000), 1, batch_rows=8)
    got = await r.sweep()
    usage = await store.usage()
    assert usage.used_bytes <= 1_000_000
    assert got["consumed"] >= 40 and not got["unconsumed"]  # closed ones sufficed
    assert on_disk() <= 1_100_000 < big  # space went back to the filesystem
    assert not wal.exists() or wal.stat().st_size == 0  # WAL truncated
    assert usage.file_bytes == on_disk()
    assert REGISTRY.get_sample_value("headrace_broker_store_bytes") == usage.file_bytes
    await store.close()


async def test_in_memory_store_retention(tmp_path: Path) -> None:
    store = Store(None)
    await store.open()
    seqs = await fill(store, ["a", "b", "c"], n_tokens=512)
    await store.claim(seqs["b"])
    r = Retention(store, RetentionConfig(max_trajectories=4), 1)
    assert dict(await r.sweep()) == {"consumed": 2}
    assert await remaining(store) == ["a-0", "a-1", "c-0", "c-1"]
    await store.close()


async def test_broker_drops_deleted_groups_from_replay(tmp_path: Path) -> None:
    """In the broker: unconsumed groups deleted by retention leave the replay table first, are
    counted as evicted ("retention"), and are never handed out."""
    cfg = Config()
    b = msgspec.structs.replace(
        cfg.broker,
        data_dir=str(tmp_path),
        group_size=2,
        commit_interval_s=0.005,
        retention=RetentionConfig(max_trajectories=4, interval_s=3600),
    )
    cfg = msgspec.structs.replace(cfg, broker=b)

    broker = Broker(cfg)
    endpoint = await broker.start("tcp://127.0.0.1:0")
    actor, learner = Client(endpoint, "a"), Client(endpoint, "l")
    actor.start()
    learner.start()
    try:
        for gid in ("g1", "g2", "g3", "g4"):
            items = [make_traj(gid, i) for i in range(2)]
            await actor.request(P.TrajectoryBatch(items=items), P.Ack)
        # a partial group too: the newest trajectory, it outlives the sweep
        await actor.request(P.TrajectoryBatch(items=[make_traj("p", 0)]), P.Ack)
        first = await take(learner, P.SampleRequest(batch_size=2), P.Batch)
        assert {t.group_id for t in first.items} == {"g1"}
        # a learner checkpoint covers g1's step: retention may delete it (broker/batches.py)
        await learner.send(P.Checkpointed(step=first.batch_id))
        await learner.request(P.Status(), P.StatusReply)  # handled in order: it is in
        got = await broker.retention.sweep()  # 9 stored, limit 4
        assert dict(got) == {"consumed": 2, "unconsumed": 4}  # g1; then g2 and g3
        info = (await learner.request(P.Status(), P.StatusReply)).info
        assert info["stored_trajectories"] == 3
        assert info["replay_size"] == 2 and info["pending_groups"] == 1
        assert info["evicted"] == {"retention": 2}
        batch = await take(learner, P.SampleRequest(batch_size=2), P.Batch)
        assert {t.group_id for t in batch.items} == {"g4"}
        reply = await take(learner, P.SampleRequest(batch_size=1), (P.Batch, P.NotReady))
        assert isinstance(reply, P.NotReady)
    finally:
        actor.close()
        learner.close()
        await broker.stop()


async def test_seqs_are_never_reused_after_retention_empties_the_store(tmp_path: Path) -> None:
    """Seqs are FIFO keys and the learner's cursor: deleting the newest rows must not make
    SQLite hand their seqs out again, in this process or after a restart."""

    store = Store(tmp_path, commit_interval_s=0)
    await store.open()
    first = await fill(store, ["a", "b"])
    r = Retention(store, RetentionConfig(max_age_s=1), 1, clock=lambda: time.time() + 60)
    assert dict(await r.sweep()) == {"unconsumed": 4}
    second = await fill(store, ["c"])
    assert min(second["c"]) > max(first["b"])
    await r.sweep()
    await store.close()

    store = Store(tmp_path)
    await store.open()
    assert store.stored == 0
    third = await fill(store, ["d"])
    assert min(third["d"]) > max(second["c"])
    await store.close()


async def test_a_resend_of_a_deleted_trajectory_is_a_duplicate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An actor resends a batch whose ack a crash lost; if retention deleted its rows
    meanwhile (trained, then old), the resend is acked as a duplicate, not stored and
    trained again. Tombstones survive a restart and are bounded (TOMBSTONES_KEPT)."""
    monkeypatch.setattr("broker.store.maintenance.TOMBSTONES_KEPT", 3)
    store = Store(tmp_path, commit_interval_s=0)
    await store.open()
    seqs = await fill(store, ["a", "b", "c"])
    for g in ("a", "b", "c"):
        await store.claim(seqs[g])  # trained
    r = Retention(store, RetentionConfig(max_trajectories=2), 1)
    assert dict(await r.sweep()) == {"consumed": 4}  # a and b
    res = await store.put([make_traj("b", 1)])
    assert res.duplicates == ["b-1"] and not res.new
    await store.close()

    store = Store(tmp_path)
    await store.open()
    res = await store.put([make_traj("b", 0), make_traj("b", 1), make_traj("d", 0)])
    assert sorted(res.duplicates) == ["b-0", "b-1"] and [m.traj_id for m in res.new] == ["d-0"]
    # Three tombstones are kept: a-0, the oldest, is forgotten (a resend that late is
    # stale by policy version anyway) and would be stored again.
    res = await store.put([make_traj("a", 0)])
    assert not res.duplicates and [m.traj_id for m in res.new] == ["a-0"]
    await store.close()


def test_min_policy_version_is_the_oldest_loss_token_version() -> None:
    """What staleness eviction orders by, read off the first loss token: the same as the
    minimum over every loss token for the (non-decreasing) versions an actor produces."""
    cases = [
        make_traj("g", 0, version=7),  # one version
        make_traj("g", 1, version=0, n_tokens=3, n_prompt=3),  # no loss token
    ]
    swapped = make_traj("g", 2, version=5, n_tokens=6)  # weights swapped mid-episode, twice
    swapped.policy_version = P.pack([3, 3, 4, 4, 6, 8], "policy_version")
    cases.append(swapped)
    masked = make_traj("g", 3, version=5, n_tokens=4)
    masked.policy_version = P.pack([1, 3, 3, 3], "policy_version")  # token 0 is a prompt
    cases.append(masked)
    views = [P.decode_view(P.encode(t)) for t in cases]  # what the broker computes it on
    for t, v in zip(cases, views, strict=True):
        loss = t.array("policy_version")[t.array("loss_mask") > 0]
        oldest = int(loss.min()) if loss.size else 0
        assert P.min_policy_version(t) == P.min_policy_version(v) == oldest
    assert [P.min_policy_version(t) for t in cases] == [7, 0, 4, 3]


async def test_new_database_page_size(tmp_path: Path) -> None:
    from broker.store.schema import PAGE_SIZE

    store = Store(tmp_path)
    await store.open()
    await store.close()
    with sqlite3.connect(tmp_path / DB_NAME) as conn:
        assert conn.execute("PRAGMA page_size").fetchone()[0] == PAGE_SIZE
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"

"""Damaged trajectory records are quarantined and never block sampling: a checksum per record
checked on every read, segment lengths checked against rows at open."""

from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from broker.store import DB_NAME, Store
from shared import protocol as P
from tests.broker_helpers import make_traj, running, take
from tests.unit.broker.test_broker_server import config, group, status


def location(data_dir: Path, traj_id: str) -> tuple[int, int, int, int]:
    """(seq, segment, offset, length) of a stored trajectory, read beside a running broker."""
    with sqlite3.connect(data_dir / DB_NAME) as conn:
        return conn.execute(
            "SELECT seq, seg_id, seg_offset, nbytes FROM trajectories WHERE traj_id = ?",
            (traj_id,),
        ).fetchone()


def segment(data_dir: Path, seg: int) -> Path:
    return data_dir / "segments" / f"seg-{seg:08d}.log"


def flip_byte(data_dir: Path, traj_id: str) -> int:
    seq, seg, off, n = location(data_dir, traj_id)
    with open(segment(data_dir, seg), "r+b") as f:
        f.seek(off + n // 2)
        b = f.read(1)
        f.seek(off + n // 2)
        f.write(bytes([b[0] ^ 0x10]))
    return seq


def evicted(data_dir: Path) -> dict[str, str | None]:
    with sqlite3.connect(data_dir / DB_NAME) as conn:
        return dict(conn.execute("SELECT traj_id, evicted FROM trajectories"))


def corrupt_count() -> float:
    return REGISTRY.get_sample_value("headrace_broker_evicted_total", {"reason": "corrupt"}) or 0


async def test_flipped_byte_and_truncated_segment_are_quarantined_and_sampling_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="broker.store.integrity")
    before = corrupt_count()

    async with running(config(tmp_path)) as (broker, client):
        actor, learner = client("a"), client("l")
        for gid in ("g1", "g2", "g3", "g4"):
            await actor.request(group(gid), P.Ack)
        flip_byte(tmp_path, "g2-0")
        # the last record loses its tail: the segment ends inside it
        _, seg, off, n = location(tmp_path, "g4-1")
        os.truncate(segment(tmp_path, seg), off + n - 5)

        handed: list[str] = []
        retries = []
        for _ in range(4):  # 4 groups, 2 damaged: each damaged one costs one NotReady
            reply = await take(learner, P.SampleRequest(batch_size=2), (P.Batch, P.NotReady))
            if isinstance(reply, P.Batch):
                handed += [t.group_id for t in reply.items]
            else:
                retries.append(reply.retry_after_s)
        assert handed == ["g1", "g1", "g3", "g3"]
        assert retries == [0.0, 0.0]  # nothing to wait for: ask again at once
        info = await status(learner)
        assert info["evicted"] == {"corrupt": 2} and info["replay_size"] == 0
        assert broker.table.size == 0
    rows = evicted(tmp_path)
    assert {k for k, v in rows.items() if v == "corrupt"} == {"g2-0", "g2-1", "g4-0", "g4-1"}
    # a restart resurrects none of them
    async with running(config(tmp_path)) as (broker, client):
        assert (await status(client("l")))["replay_size"] == 0
    assert corrupt_count() == before + 2
    lines = [r.getMessage() for r in caplog.records]
    bad_seq = location(tmp_path, "g2-0")[0]
    assert any(f"seq {bad_seq} " in m and "checksum mismatch" in m for m in lines), lines
    assert any("unreadable" in m for m in lines), lines


async def test_segment_shorter_than_its_rows_is_quarantined_at_open(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="broker.store.integrity")

    store = Store(tmp_path)
    await store.open()
    new = (await store.put([make_traj("g", i) for i in range(4)])).new
    await store.close()
    _, seg, off, _ = location(tmp_path, "g-2")
    os.truncate(segment(tmp_path, seg), off + 3)  # g-2 and g-3 are cut off
    store = Store(tmp_path)
    await store.open()
    assert [m.traj_id for m in await store.scan_open(1)] == ["g-0", "g-1"]
    claimed = await store.claim([m.seq for m in new[:2]])
    assert [c.decode().traj_id for c in claimed] == ["g-0", "g-1"]
    await store.close()
    assert evicted(tmp_path) == {"g-0": None, "g-1": None, "g-2": "corrupt", "g-3": "corrupt"}
    assert sum("quarantined" in r.getMessage() for r in caplog.records) == 2


async def test_store_of_the_previous_format_is_migrated_and_read_unverified(tmp_path: Path) -> None:
    store = Store(tmp_path)
    await store.open()
    new = (await store.put([make_traj("g", 0)])).new
    await store.close()
    with sqlite3.connect(tmp_path / DB_NAME) as conn:  # as format 2 wrote it
        conn.execute("ALTER TABLE trajectories DROP COLUMN checksum")
        conn.execute("PRAGMA user_version=2")
    store = Store(tmp_path)
    await store.open()
    assert [c.decode().traj_id for c in await store.claim([new[0].seq])] == ["g-0"]
    await store.put([make_traj("h", 0)])
    await store.close()
    with sqlite3.connect(tmp_path / DB_NAME) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 3
        rows = dict(conn.execute("SELECT traj_id, checksum FROM trajectories"))
    assert rows["g-0"] is None and isinstance(rows["h-0"], int)

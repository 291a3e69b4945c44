"""Trajectory bodies in segment files: crash-safe order, rollback, orphans, compaction, a real
full disk."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

import broker.store.trajectories as trajectories_module
from broker.store import Store, StoreCorruptError, StoreError, StoreFullError
from broker.store.segments import HEADER, SegmentLog, parse_header
from tests.broker_helpers import make_traj


def put(log: SegmentLog, *bodies: bytes, seq: int = 1) -> list[tuple[int, int, int]]:
    """Append `bodies` under seqs from `seq` on (checksum 0: these tests read bodies only)."""
    return log.append(list(bodies), list(range(seq, seq + len(bodies))), [0] * len(bodies))


def test_append_read_rollback_and_rotation(tmp_path: Path) -> None:
    log = SegmentLog(tmp_path, segment_bytes=100)
    log.open(set())
    h = HEADER.size  # each body follows its header; rows point at the body
    first = put(log, b"a" * 60, b"b" * 60)
    assert [(s, o, n) for s, o, n in first] == [(1, h, 60), (1, 2 * h + 60, 60)]
    log.sync()
    mark = log.mark()
    ((seg, off, n),) = put(log, b"c" * 10, seq=3)  # past segment_bytes: a new segment
    assert (seg, off, n) == (2, h, 10)
    log.rollback(mark)  # its commit failed: nothing of it stays
    assert log.path(2).stat().st_size == 0
    assert log.read(1, 2 * h + 60, 60) == b"b" * 60
    assert log.total_bytes == 2 * (h + 60)
    with open(log.path(1), "rb") as f:  # each header names its body's length and seq
        assert parse_header(f.read(h)) == (60, 1, 0)
    log.close()


def test_quota_is_enospc_and_leaves_no_bytes(tmp_path: Path) -> None:
    log = SegmentLog(tmp_path, quota_bytes=100 + 2 * HEADER.size)
    log.open(set())
    put(log, b"x" * 80)
    with pytest.raises(OSError) as e:
        put(log, b"y" * 40)
    assert e.value.errno == 28 and "seg-00000001.log" in str(e.value)
    assert log.path(1).stat().st_size == 80 + HEADER.size
    log.close()


def test_open_drops_unreferenced_segments_and_never_appends_to_old_ones(tmp_path: Path) -> None:
    log = SegmentLog(tmp_path)
    log.open(set())
    ((_, off, _),) = put(log, b"live")
    log.close()
    (tmp_path / "seg-00000002.log").write_bytes(b"torn tail of a crashed commit")
    log = SegmentLog(tmp_path)
    assert log.open({1}) == [2]
    assert log.current == 3 and log.existing() == [1, 3]
    assert log.read(1, off, 4) == b"live"
    log.close()


async def test_uncommitted_bodies_are_rolled_back_when_sqlite_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(tmp_path)
    await store.open()
    assert store.segments is not None
    await store.put([make_traj("a", i) for i in range(2)])
    size = store.segments.total_bytes
    # The INSERT fails after the bodies were appended and synced.
    monkeypatch.setattr(
        trajectories_module, "insert_rows", lambda n: "INSERT INTO nowhere VALUES (1)"
    )
    with pytest.raises(StoreError, match="nowhere"):
        await store.put([make_traj("b", 0)])
    monkeypatch.undo()
    assert store.segments.total_bytes == size == store.segments.path(1).stat().st_size
    assert store.stored == 2
    assert len((await store.put([make_traj("b", 0)])).new) == 1  # and it goes on
    await store.close()


async def test_compaction_moves_live_rows_and_unlinks_dead_segments(tmp_path: Path) -> None:
    store = Store(tmp_path, commit_interval_s=0)
    await store.open()
    res = await store.put([make_traj(f"g{i}", 0, n_tokens=512) for i in range(10)])
    seqs = [m.seq for m in res.new]
    await store.claim(seqs[:8])
    await store.delete(seqs[:8], max_times_sampled=1)  # 8 of 10 gone: sparse segment
    assert store.segments is not None
    before = store.segments.total_bytes
    await store.compact()
    assert store.segments.total_bytes < before / 3
    assert store.segments.existing() == [store.segments.current]
    got = await store.claim(seqs[8:])
    assert [c.decode().traj_id for c in got] == ["g8-0", "g9-0"]
    await store.close()
    store = Store(tmp_path)  # and the moved rows survive a reopen
    await store.open()
    assert [c.decode().traj_id for c in await store.claim(seqs[8:])] == ["g8-0", "g9-0"]
    await store.close()


async def test_missing_segment_is_named_corruption(tmp_path: Path) -> None:
    store = Store(tmp_path)
    await store.open()
    await store.put([make_traj("a", 0)])
    await store.close()
    (tmp_path / "segments" / "seg-00000001.log").unlink()
    store = Store(tmp_path)
    with pytest.raises(StoreCorruptError, match="seg-00000001.log"):
        await store.open()
    await store.close()


@pytest.fixture
def small_fs(tmp_path: Path):
    """A real 2 MiB filesystem (tmpfs), where the mount is permitted."""
    where = tmp_path / f"fs-{uuid.uuid4().hex[:8]}"
    where.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)], capture_output=True
    )
    if r.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {r.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


async def test_a_real_full_disk_is_store_full_and_loses_nothing_committed(small_fs: Path) -> None:
    store = Store(small_fs, commit_interval_s=0)
    await store.open()
    kept = []
    with pytest.raises(StoreFullError):
        for i in range(200):  # ~33 KiB each: the 2 MiB disk fills up
            res = await store.put([make_traj(f"g{i}", 0, n_tokens=2048)])
            kept += [m.seq for m in res.new]
    assert 10 < len(kept) < 200
    assert store.stored == len(kept)
    # space is freed: the same store goes on, and a restart finds everything acked
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_fs)], check=True)
    res = await store.put([make_traj("after", 0, n_tokens=2048)])
    kept += [m.seq for m in res.new]
    await store.close()
    store = Store(small_fs)
    await store.open()
    assert store.stored == len(kept)  # everything acked before the error is there
    got = await store.claim(kept)
    ids = [f"g{i}-0" for i in range(len(kept) - 1)] + ["after-0"]
    assert [c.decode().traj_id for c in got] == ids
    await store.close()

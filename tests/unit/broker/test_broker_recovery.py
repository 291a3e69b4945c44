"""Ingest commits its rows at synchronous=NORMAL (no WAL fsync); the synced segment records are
what an ack stands on. Rows an OS crash lost are rebuilt from them at open: byte-identical,
verified, once per traj_id, never past a torn tail, never one retention deleted."""

from __future__ import annotations

import sqlite3
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from broker.store import DB_NAME, Store, integrity
from broker.store.recovery import BOOT_KEY
from broker.store.segments import HEADER, header
from shared import protocol as P
from tests.broker_helpers import make_traj

COLS = (
    "seq, traj_id, group_id, task_id, lease_id, actor_id, min_version, n_tokens, reward,"
    " success, sample_prob, seconds, times_sampled, evicted, seg_id, seg_offset, nbytes, checksum"
)


def rows(data_dir: Path) -> list[tuple]:
    with sqlite3.connect(data_dir / DB_NAME) as conn:
        return conn.execute(f"SELECT {COLS} FROM trajectories ORDER BY seq").fetchall()


def lose_rows(data_dir: Path, group_ids: list[str]) -> None:
    """What an OS crash does to the last ingest commits: their rows are gone (the NORMAL
    commits never reached the disk), their synced segment records are not."""
    with sqlite3.connect(data_dir / DB_NAME) as conn:
        marks = ",".join("?" * len(group_ids))
        conn.execute(f"DELETE FROM trajectories WHERE group_id IN ({marks})", group_ids)


def reboot(data_dir: Path) -> None:
    """The machine booted since the store was last opened (the kernel's boot id changed)."""
    with sqlite3.connect(data_dir / DB_NAME) as conn:
        conn.execute("UPDATE kv SET value = ? WHERE key = ?", (b"an-earlier-boot", BOOT_KEY))
        assert conn.total_changes == 1


def segment(data_dir: Path, seg: int = 1) -> Path:
    return data_dir / "segments" / f"seg-{seg:08d}.log"


def recovered_count() -> float:
    return REGISTRY.get_sample_value("headrace_broker_store_recovered_total") or 0.0


async def stored(data_dir: Path, groups: dict[str, int]) -> None:
    """A store holding `groups` (group id -> size), one group commit per group, closed."""
    store = Store(data_dir)
    await store.open()
    for gid, size in groups.items():
        await store.put([make_traj(gid, i, n_tokens=64) for i in range(size)])
    await store.close()


async def test_rows_an_os_crash_lost_are_rebuilt_from_the_synced_records(tmp_path: Path) -> None:
    await stored(tmp_path, {"g1": 4, "g2": 4, "g3": 4})
    before = rows(tmp_path)
    lose_rows(tmp_path, ["g2", "g3"])
    reboot(tmp_path)
    n0 = recovered_count()

    store = Store(tmp_path)
    await store.open()
    assert store.stored == 12 and recovered_count() == n0 + 8
    # the same rows again (seqs, metadata, locations, checksums), all open, groups whole
    assert rows(tmp_path) == before
    metas = await store.scan_open(1)
    assert Counter(m.group_id for m in metas) == {"g1": 4, "g2": 4, "g3": 4}
    claimed = await store.claim([m.seq for m in metas])
    for c, row in zip(claimed, before, strict=True):
        gid, i = c.decode().traj_id.rsplit("-", 1)
        assert bytes(c.frame) == P.encode(make_traj(gid, int(i), n_tokens=64))
        assert integrity.checksum(bytes(c.frame)) == row[-1]
    await store.close()

    reboot(tmp_path)  # reopening again rebuilds nothing twice
    store = Store(tmp_path)
    await store.open()
    assert store.stored == 12 and recovered_count() == n0 + 8
    await store.close()


@pytest.mark.parametrize("damage", ["torn", "zeros", "flipped"])
async def test_a_damaged_tail_ends_the_scan_and_later_appends_work(
    tmp_path: Path, damage: str
) -> None:
    await stored(tmp_path, {"g1": 2, "g2": 4})
    last = rows(tmp_path)[-1]  # g2-3: the record the crash tore
    lose_rows(tmp_path, ["g2"])
    path, off, n = segment(tmp_path, last[14]), last[15], last[16]
    if damage == "torn":  # the last record only partly reached the disk
        with open(path, "r+b") as f:
            f.truncate(off + n // 2)
    elif damage == "zeros":  # a file extended over blocks that were never written
        with open(path, "ab") as f:
            f.write(b"\0" * 5000)
    else:  # a body that fails its checksum
        with open(path, "r+b") as f:
            f.seek(off + n // 2)
            b = f.read(1)
            f.seek(off + n // 2)
            f.write(bytes([b[0] ^ 0x10]))
    reboot(tmp_path)

    store = Store(tmp_path)
    await store.open()
    want = ["g1-0", "g1-1", "g2-0", "g2-1", "g2-2"] + (["g2-3"] if damage == "zeros" else [])
    assert [m.traj_id for m in await store.scan_open(1)] == want
    res = await store.put([make_traj("g2", 3, n_tokens=64), make_traj("g3", 0, n_tokens=64)])
    assert [m.traj_id for m in res.new] == ["g3-0"] if damage == "zeros" else ["g2-3", "g3-0"]
    await store.close()

    reboot(tmp_path)
    store = Store(tmp_path)
    await store.open()
    metas = await store.scan_open(1)
    assert [m.traj_id for m in metas] == [*want, *(["g2-3"] if damage != "zeros" else []), "g3-0"]
    got = await store.claim([m.seq for m in metas])
    assert [c.decode().traj_id for c in got] == [m.traj_id for m in metas]
    await store.close()


async def test_a_traj_id_stored_already_is_not_rebuilt_twice(tmp_path: Path) -> None:
    await stored(tmp_path, {"g1": 2, "g2": 2})
    lose_rows(tmp_path, ["g2"])
    # Compaction's copies of g1-0 and g2-0 past the lost rows, under seqs past the next seq
    with open(segment(tmp_path), "ab") as f:
        for k, t in enumerate([make_traj("g1", 0, n_tokens=64), make_traj("g2", 0, n_tokens=64)]):
            body = P.encode(t)
            f.write(header(100 + k, integrity.checksum(body), len(body)) + body)
    reboot(tmp_path)

    store = Store(tmp_path)
    await store.open()
    metas = await store.scan_open(1)
    assert [m.traj_id for m in metas] == ["g1-0", "g1-1", "g2-0", "g2-1"]
    assert [m.seq for m in metas] == [1, 2, 3, 4]
    await store.close()


async def test_rows_retention_deleted_are_not_revived(tmp_path: Path) -> None:
    store = Store(tmp_path)
    await store.open()
    await store.put([make_traj("g1", i, n_tokens=64) for i in range(2)])
    doomed = (await store.put([make_traj("g2", i, n_tokens=64) for i in range(2)])).new
    await store.delete([m.seq for m in doomed], max_times_sampled=1)  # the newest rows
    await store.close()
    reboot(tmp_path)

    store = Store(tmp_path)
    await store.open()
    assert [m.traj_id for m in await store.scan_open(1)] == ["g1-0", "g1-1"]
    await store.close()


async def test_without_a_reboot_records_past_the_last_row_were_never_acked(
    tmp_path: Path,
) -> None:
    """A process crash keeps every committed row: a record past them is from a commit that
    never finished. It is dropped (truncated), and its seqs are used again."""
    await stored(tmp_path, {"g1": 2, "g2": 2})
    end = rows(tmp_path)[1]
    lose_rows(tmp_path, ["g2"])

    store = Store(tmp_path)
    await store.open()
    assert [m.traj_id for m in await store.scan_open(1)] == ["g1-0", "g1-1"]
    assert segment(tmp_path).stat().st_size == end[15] + end[16]
    res = await store.put([make_traj("g3", 0, n_tokens=64)])
    assert [m.seq for m in res.new] == [3]
    await store.close()
    reboot(tmp_path)  # a later OS crash does not bring them back either
    store = Store(tmp_path)
    await store.open()
    assert [m.traj_id for m in await store.scan_open(1)] == ["g1-0", "g1-1", "g3-0"]
    await store.close()


async def test_ingest_commits_at_normal_and_every_other_commit_at_full(tmp_path: Path) -> None:
    store = Store(tmp_path)
    await store.open()
    seen: list[str] = []
    await store._call(lambda: store._db.conn.set_trace_callback(seen.append))

    async def commits_of(op) -> list[str]:
        """The synchronous level each COMMIT of `op` ran under."""
        seen.clear()
        await op
        level, out = "FULL", []
        for sql in seen:
            s = sql.strip().upper()
            if s.startswith("PRAGMA SYNCHRONOUS="):
                level = s.split("=", 1)[1]
            elif s == "COMMIT":
                out.append(level)
        assert level == "FULL"  # and the connection is left at FULL
        return out

    put = store.put([make_traj("g", i) for i in range(2)])
    assert await commits_of(put) == ["NORMAL"]
    seqs = [m.seq for m in await store.scan_open(1)]
    assert await commits_of(store.claim(seqs, [("batch/1", b"x")])) == ["FULL"]
    assert await commits_of(store.kv_write([("lease/g", b"y")])) == ["FULL"]
    assert await commits_of(store.retire(seqs[:1], "stale")) == ["FULL"]
    assert await commits_of(store.delete(seqs, max_times_sampled=1)) == ["FULL"]
    level = await store._call(lambda: store._db.conn.execute("PRAGMA synchronous").fetchone()[0])
    assert level == 2  # FULL
    await store.close()


def test_header_of_a_record_is_checked() -> None:
    from broker.store.segments import parse_header

    h = header(7, -5, 123)
    assert len(h) == HEADER.size and parse_header(h) == (123, 7, -5)
    assert parse_header(h[:-1]) is None
    assert parse_header(h[:10] + bytes([h[10] ^ 1]) + h[11:]) is None  # a flipped seq bit

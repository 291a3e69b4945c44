"""The broker's durable store: group commit, dedupe, reopen, in-memory mode, failure paths, and
its parts alone (index rows, the group commit)."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from broker.store import (
    DB_NAME,
    Incoming,
    PutResult,
    Store,
    StoreCorruptError,
    StoreError,
    StoreFullError,
    StoreLockedError,
    TrajMeta,
    integrity,
)
from broker.store.commit import GroupCommit
from broker.store.rows import new_rows
from broker.store.schema import META_COLS, SCHEMA, SEG_COLUMN, insert_rows
from shared import protocol as P
from tests.broker_helpers import make_traj
from tests.helpers import free_port


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_commit_dedupes_and_folds_concurrent_batches(tmp_path: Path) -> None:
    store = Store(tmp_path, commit_interval_s=0.05)
    await store.open()
    commits = metric("headrace_broker_commit_seconds_count")
    batches = [[make_traj(f"g{b}", i) for i in range(3)] for b in range(4)]
    results = await asyncio.gather(*(store.put(b) for b in batches))
    assert [len(r.new) for r in results] == [3, 3, 3, 3]
    # four callers within one commit window share one transaction
    assert metric("headrace_broker_commit_seconds_count") == commits + 1
    again = await store.put([make_traj("g0", 0), make_traj("g0", 1), make_traj("g9", 0)])
    assert again.duplicates == ["g0-0", "g0-1"]
    assert [m.traj_id for m in again.new] == ["g9-0"]
    # a duplicate within one batch is stored once too
    same = await store.put([make_traj("g8", 0), make_traj("g8", 0)])
    assert len(same.new) == 1 and same.duplicates == ["g8-0"]
    assert store.stored == 14
    seqs = [m.seq for r in results for m in r.new]
    assert seqs == sorted(seqs) and len(set(seqs)) == 12
    await store.close()


async def test_reopen_keeps_data_sampling_and_kv(tmp_path: Path) -> None:
    store = Store(tmp_path, commit_interval_s=0)
    await store.open()
    res = await store.put([make_traj("a", i, version=3) for i in range(4)])
    await store.kv_set("run_id", b"r1")
    await store.kv_write([("lease/x", b"1"), ("lease/y", b"2"), ("lease/x", None)])
    first = [m.seq for m in res.new]
    got = await store.claim(first[:2])
    assert [c.decode().traj_id for c in got] == ["a-0", "a-1"]
    assert got[0].min_version == P.min_policy_version(got[0].decode()) == 3
    await store.retire(first[3:], "stale")
    await store.close()

    store = Store(tmp_path)
    await store.open()
    assert store.stored == 4
    open_ = await store.scan_open(max_times_sampled=1)
    assert [m.traj_id for m in open_] == ["a-2"]  # sampled and evicted ones are not open
    assert open_[0].min_version == 3 and open_[0].n_tokens == 8
    assert [m.traj_id for m in await store.scan_open(max_times_sampled=2)] == [
        "a-0",
        "a-1",
        "a-2",
    ]
    assert await store.kv_get("run_id") == b"r1"
    assert await store.kv_scan("lease/") == [("lease/y", b"2")]
    await store.close()


async def test_durability_none_is_in_memory(tmp_path: Path) -> None:
    store = Store(None)
    await store.open()
    assert store.in_memory
    res = await store.put([make_traj("m", i) for i in range(2)])
    assert len(res.new) == 2
    assert (await store.put([make_traj("m", 0)])).duplicates == ["m-0"]
    assert [c.decode().traj_id for c in await store.claim([res.new[1].seq])] == ["m-1"]
    await store.close()
    assert list(tmp_path.iterdir()) == []


async def test_full_disk_raises_and_commits_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path, commit_interval_s=0, quota_bytes=640_000)
    await store.open()
    before = metric("headrace_broker_store_errors_total", kind="full")
    big = [make_traj("big", i, n_tokens=20_000) for i in range(8)]  # ~2.6 MB > the quota
    with pytest.raises(StoreFullError):
        await store.put(big)
    assert metric("headrace_broker_store_errors_total", kind="full") == before + 1
    assert store.stored == 0
    assert await store.scan_open(1) == []  # the failed transaction left nothing behind
    # the store keeps working for what fits
    assert len((await store.put([make_traj("small", 0)])).new) == 1
    await store.close()


async def test_corrupt_database_is_named(tmp_path: Path) -> None:
    (tmp_path / DB_NAME).write_bytes(b"this is not an sqlite database" * 200)

    store = Store(tmp_path)
    with pytest.raises(StoreCorruptError):
        await store.open()
    await store.close()


async def test_second_broker_on_same_data_dir_is_refused(tmp_path: Path) -> None:
    first = Store(tmp_path)
    await first.open()
    second = Store(tmp_path)
    with pytest.raises(StoreLockedError):
        await second.open()
    await second.close()
    await first.close()


async def test_full_disk_is_one_log_line_a_metric_and_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A full disk: no ack, one error line per failure streak, the failing gauge up; once
    space is freed (the quota raised) the next commit succeeds and the gauge drops."""

    store = Store(tmp_path, commit_interval_s=0, quota_bytes=640_000)
    await store.open()
    big = [make_traj("big", i, n_tokens=20_000) for i in range(4)]
    errors = metric("headrace_broker_store_errors_total", kind="full")
    with caplog.at_level("ERROR", logger="broker.store"):
        for _ in range(3):
            with pytest.raises(StoreFullError, match=r"seg-\d+\.log"):  # names the file
                await store.put(big)
    failures = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(failures) == 1, [r.getMessage() for r in failures]
    assert "store full" in failures[0].getMessage()
    assert "not acked" in failures[0].getMessage()
    assert metric("headrace_broker_store_errors_total", kind="full") == errors + 3
    assert metric("headrace_broker_store_failing") == 1
    assert store.stored == 0

    store.set_quota_bytes(None)  # space freed
    caplog.clear()
    with caplog.at_level("WARNING", logger="broker.store"):
        res = await store.put(big)
    assert len(res.new) == 4 and store.stored == 4
    assert metric("headrace_broker_store_failing") == 0
    assert any("succeed again after 3" in r.getMessage() for r in caplog.records)
    await store.close()

    store = Store(tmp_path)
    await store.open()
    assert [m.traj_id for m in await store.scan_open(1)] == [t.traj_id for t in big]
    await store.close()


async def test_corrupt_header_error_names_the_file(tmp_path: Path) -> None:
    store = Store(tmp_path, commit_interval_s=0)
    await store.open()
    await store.put([make_traj("g", i) for i in range(3)])
    await store.close()
    db = tmp_path / DB_NAME
    with db.open("r+b") as f:  # garbage over the 100-byte header
        f.write(b"\xde\xad\xbe\xef" * 25)
    store = Store(tmp_path)
    with pytest.raises(StoreCorruptError, match=str(db)):
        await store.open()
    await store.close()


def test_broker_exits_nonzero_with_one_line_on_a_corrupt_store(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    db = data / DB_NAME
    db.write_bytes(b"\x00garbage, not a database\xff" * 4096)
    repo = Path(__file__).resolve().parents[3]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    r = subprocess.run(
        [sys.executable, "-m", "broker", "--data-dir", str(data), "--metrics-port", "0"]
        + ["--port", str(free_port())],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        timeout=60,
    )
    lines = r.stderr.decode().strip().splitlines()
    assert r.returncode == 1, r.stderr
    assert len(lines) == 1, lines
    assert str(db) in lines[0] and "corrupt" in lines[0]


async def test_claim_writes_its_kv_with_the_count_or_not_at_all(tmp_path: Path) -> None:
    """The learner side records a batch in the claim that hands it out: both or neither."""
    store = Store(tmp_path)
    await store.open()
    seqs = [m.seq for m in (await store.put([make_traj("a", i) for i in range(2)])).new]
    with pytest.raises(StoreError, match="missing"):
        await store.claim([seqs[0], 999], [("batch/1", b"x")])
    assert await store.kv_get("batch/1") is None
    assert len(await store.scan_open(1)) == 2  # nothing counted
    await store.claim(seqs, [("batch/1", b"x")])
    assert await store.kv_get("batch/1") == b"x"
    assert await store.scan_open(1) == []
    await store.close()


async def test_a_store_of_an_unknown_format_is_refused_by_name(tmp_path: Path) -> None:
    store = Store(tmp_path)
    await store.open()
    await store.close()
    with sqlite3.connect(tmp_path / DB_NAME) as conn:  # as a newer broker might leave it
        conn.execute("PRAGMA user_version=99")
    store = Store(tmp_path)
    with pytest.raises(StoreError, match="format 99.* new --data-dir"):
        await store.open()
    await store.close()


def test_new_rows_set_duplicates_aside_and_number_the_rest() -> None:
    a, b, c = make_traj("a", 0, version=4, n_tokens=10), make_traj("b", 0), make_traj("c", 1)
    batches = [[Incoming.of(a), Incoming.of(b)], [Incoming.of(a), Incoming.of(c)]]
    seen = {"b-0"}  # stored before
    new = new_rows(batches, seen, first_seq=7, now=0.0, in_memory=False)
    assert [r.duplicates for r in new.results] == [["b-0"], ["a-0"]]  # a-0: earlier in it
    assert [[(m.seq, m.traj_id) for m in r.new] for r in new.results] == [
        [(7, "a-0")],
        [(8, "c-1")],
    ]
    assert new.next_seq == 9 and seen == {"a-0", "b-0", "c-1"}
    meta = new.results[0].new[0]
    assert (meta.group_id, meta.lease_id, meta.min_version, meta.n_tokens) == ("a", "a", 4, 10)
    assert new.frames == [batches[0][0].frame, batches[1][1].frame]  # the bodies, in row order
    assert new.bodies == {}


def test_new_rows_fill_every_column_of_the_schema() -> None:
    conn = sqlite3.connect(":memory:")
    conn.executescript(SCHEMA)
    items = [Incoming.of(make_traj("g", i, version=2)) for i in range(3)]
    new = new_rows([items], set(), first_seq=1, now=50.0, in_memory=False)
    for i, row in enumerate(new.rows):  # where the segment log put them
        row[SEG_COLUMN], row[SEG_COLUMN + 1] = 1, 100 * i
    conn.execute(insert_rows(len(new.rows)), [v for row in new.rows for v in row])
    metas = [TrajMeta(*r) for r in conn.execute(f"SELECT {META_COLS} FROM trajectories")]
    assert metas == new.results[0].new
    got = conn.execute("SELECT created, seg_id, seg_offset, nbytes, checksum FROM trajectories")
    frames = [item.frame for item in items]
    want = [(50.0, 1, 100 * i, len(f), integrity.checksum(f)) for i, f in enumerate(frames)]
    assert got.fetchall() == want


def test_new_rows_in_memory_keep_the_received_frames() -> None:
    item = Incoming.of(make_traj("m", 0, version=3))
    new = new_rows([[item]], set(), first_seq=1, now=0.0, in_memory=True)
    assert new.frames == [] and new.rows[0][-1] is None  # no checksum: nothing at rest
    body = new.bodies[1]
    assert (body.seq, body.min_version, bytes(body.frame)) == (1, 3, item.frame)
    assert body.decode() == make_traj("m", 0, version=3)


async def test_group_commit_answers_each_caller_once_committed_or_with_the_shared_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    failing = [True]
    commits: list[int] = []
    stored: list[int] = []

    def meta(i: int) -> TrajMeta:
        return TrajMeta(i, f"t{i}", "g", "task", "lease", "actor", 0, 1, 0.0, False, 1.0, 0.0)

    async def commit(batches: list[list[Incoming]]) -> list[PutResult]:
        commits.append(len(batches))
        if failing[0]:
            raise StoreFullError("disk full")
        return [PutResult([meta(i) for i in range(len(b))], []) for b in batches]

    def items(n: int) -> list[Incoming]:
        return [Incoming.of(make_traj("g", i)) for i in range(n)]

    group = GroupCommit(commit, interval_s=0.0, on_stored=stored.append)
    group.start()
    with caplog.at_level("ERROR", logger="broker.store"):
        for _ in range(2):
            got = await asyncio.gather(
                group.put(items(2)), group.put(items(1)), return_exceptions=True
            )
            assert [type(r) for r in got] == [StoreFullError, StoreFullError]
    assert len([r for r in caplog.records if r.levelname == "ERROR"]) == 1  # one per streak
    assert stored == []

    failing[0] = False
    two, one = await asyncio.gather(group.put(items(2)), group.put(items(1)))
    assert (len(two.new), len(one.new)) == (2, 1)
    assert commits == [2, 2, 2]  # both callers of each round shared one commit
    assert stored == [3]
    await group.close()
    with pytest.raises(StoreError, match="closing"):
        await group.put(items(1))

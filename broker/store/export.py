"""`python -m broker export`: a stored run's complete GRPO groups as a file of wire frames.

Reads a broker's data dir read-only (no lock, no new segment, nothing written there; a broker
may even be running on it: SQLite gives the export one consistent snapshot) and writes one
`Batch` frame per complete group (`shared.framefile`), groups in the order their first
trajectory was stored, each group's trajectories in stored order. A frame's items are the
trajectories' stored encodings, unchanged (the exact bytes the actors sent), its `sample_ids`
their store seqs and its `cursor` the newest of them. A group counts as complete with
`[broker] group_size` trajectories, as the broker's group assembly counts it; extras beyond
that are left out, as the broker leaves them out. `python -m learner replay` trains on it.

Exit codes: 0 done, 2 no store there / nothing to export / bad config, 1 unreadable store.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import msgspec

from broker.store import integrity
from broker.store.records import StoreCorruptError, StoreError
from broker.store.schema import DB_NAME, MIGRATIONS, SCHEMA_VERSION
from broker.store.segments import SegmentLog
from shared import framefile
from shared import protocol as P
from shared.config import ConfigError, load_config
from shared.overrides import add_set_argument

PROG = "headrace-broker export"


class NothingToExport(StoreError):
    """No store at the path, or no complete group in it."""


@dataclass
class ExportStats:
    groups: int = 0
    trajectories: int = 0
    incomplete_groups: int = 0  # skipped: fewer than group_size trajectories stored
    incomplete_trajectories: int = 0
    extra_trajectories: int = 0  # beyond group_size in a complete group (never trained on)
    corrupt_groups: int = 0  # skipped: a trajectory failed its integrity check

    def line(self) -> str:
        s = f"exported {self.groups} groups ({self.trajectories} trajectories)"
        if self.incomplete_groups:
            s += (
                f"; skipped {self.incomplete_groups} incomplete groups"
                f" ({self.incomplete_trajectories} trajectories)"
            )
        if self.corrupt_groups:
            s += f"; skipped {self.corrupt_groups} groups with a corrupt trajectory"
        if self.extra_trajectories:
            s += f"; left out {self.extra_trajectories} trajectories beyond group_size"
        return s


def find_db(data_dir: str | Path) -> Path:
    """The store's database in `data_dir`, or in `data_dir/broker` (a `headrace run` dir)."""
    d = Path(data_dir)
    for p in (d / DB_NAME, d / "broker" / DB_NAME):
        if p.is_file():
            return p
    if not d.is_dir():
        raise NothingToExport(f"{d}: no such directory")
    raise NothingToExport(f"{d}: no broker store ({DB_NAME}) in it")


def open_readonly(db: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(db.resolve().as_uri() + "?mode=ro", uri=True)
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.Error as e:
        conn.close()
        raise StoreCorruptError(f"{db}: {e}") from None
    if version != SCHEMA_VERSION and version not in MIGRATIONS:  # older ones read as they are
        conn.close()
        raise StoreError(f"{db}: store format {version}, this broker reads {SCHEMA_VERSION}")
    return conn


def complete_groups(
    conn: sqlite3.Connection, group_size: int, sampled_only: bool, stats: ExportStats
) -> list[str]:
    """Group ids with at least `group_size` stored trajectories, by their first seq."""
    where = "seg_id IS NOT NULL" + (" AND times_sampled > 0" if sampled_only else "")
    rows = conn.execute(
        f"SELECT group_id, COUNT(*) FROM trajectories WHERE {where}"
        " GROUP BY group_id ORDER BY MIN(seq)"
    ).fetchall()
    out = []
    for gid, n in rows:
        if n < group_size:
            stats.incomplete_groups += 1
            stats.incomplete_trajectories += n
        else:
            stats.extra_trajectories += n - group_size
            out.append(gid)
    return out


def group_frame(
    conn: sqlite3.Connection, segments: SegmentLog, group_id: str, group_size: int
) -> bytes:
    """One group as an encoded `Batch`: its first `group_size` stored trajectories.
    Raises CorruptRecords when one fails its integrity check, as a claim does."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    checksum = "checksum" if version >= 3 else "NULL"
    rows = conn.execute(
        f"SELECT seq, seg_id, seg_offset, nbytes, {checksum} FROM trajectories"
        " WHERE group_id = ? AND seg_id IS NOT NULL ORDER BY seq LIMIT ?",
        (group_id, group_size),
    ).fetchall()
    items = []
    for seq, seg, off, n, expected in rows:
        try:
            body = segments.read(seg, off, n)
        except OSError as e:
            raise integrity.CorruptRecords({seq: f"unreadable: {e}"}) from None
        why = integrity.problem(body, expected)
        if why is not None:
            raise integrity.CorruptRecords({seq: why})
        items.append(msgspec.Raw(body))
    seqs = [r[0] for r in rows]
    return P.encode(P.BatchFrames(items, sample_ids=seqs, is_weights=[], cursor=max(seqs)))


def export(
    data_dir: str | Path, out: BinaryIO, group_size: int, *, sampled_only: bool = False
) -> ExportStats:
    """Write the complete groups stored in `data_dir` to `out`; raises NothingToExport."""
    db = find_db(data_dir)
    conn = open_readonly(db)
    segments = SegmentLog(db.parent / "segments")  # only read: never opened for appends
    stats = ExportStats()
    try:
        gids = complete_groups(conn, group_size, sampled_only, stats)
        if not gids:
            what = "sampled " if sampled_only else ""
            raise NothingToExport(
                f"{db.parent}: no complete {what}group of {group_size} trajectories stored"
                f" ({stats.incomplete_groups} incomplete groups)"
            )
        framefile.write_header(out)
        for gid in gids:
            try:
                frame = group_frame(conn, segments, gid, group_size)
            except integrity.CorruptRecords as e:
                print(f"{PROG}: group {gid} skipped: {e}", file=sys.stderr)
                stats.corrupt_groups += 1
                continue
            framefile.write_frame(out, frame)
            stats.groups += 1
            stats.trajectories += group_size
    except (sqlite3.Error, OSError) as e:
        raise StoreError(f"{db}: {e}") from None
    finally:
        conn.close()
        segments.close()
    return stats


def export_to_path(
    data_dir: str | Path, out: str, group_size: int, *, sampled_only: bool = False
) -> ExportStats:
    """`export` into the file `out` (written beside it, renamed into place) or stdout ("-")."""
    if out == "-":
        stats = export(data_dir, sys.stdout.buffer, group_size, sampled_only=sampled_only)
        sys.stdout.buffer.flush()
        return stats
    dest = Path(out)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", dir=dest.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would keep the file from other users
        with os.fdopen(fd, "wb") as f:
            stats = export(data_dir, f, group_size, sampled_only=sampled_only)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True, help="the broker's store (or a run dir)")
    ap.add_argument("--config", help="TOML file; [broker] group_size says what is complete")
    ap.add_argument("--out", required=True, help="frame file to write, - for stdout")
    ap.add_argument(
        "--sampled-only",
        action="store_true",
        help="only groups the run's learner was handed (not those evicted unsampled)",
    )
    add_set_argument(ap)
    args = ap.parse_args(argv)
    try:
        group_size = load_config(args.config, args.overrides).broker.group_size
        if group_size < 1:
            raise ConfigError("[broker] group_size must be >= 1")
        stats = export_to_path(args.data_dir, args.out, group_size, sampled_only=args.sampled_only)
    except (ConfigError, NothingToExport) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    except StoreError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    print(f"{PROG}: {stats.line()}", file=sys.stderr)
    return 0

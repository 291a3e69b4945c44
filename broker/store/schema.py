"""The SQLite schema of the broker's store and the SQL its hot path runs."""

from __future__ import annotations

import functools

DB_NAME = "broker.db"
SCHEMA_VERSION = 3  # 2: bodies in segment files (segments.py), not blobs; 3: checksums
MIGRATIONS = {
    # 2 -> 3: rows stored before checksums keep NULL (read unverified)
    2: "ALTER TABLE trajectories ADD COLUMN checksum INTEGER",
}
SCHEMA = """
CREATE TABLE IF NOT EXISTS trajectories (
    seq INTEGER PRIMARY KEY,            -- insert order: FIFO order and the learner's cursor
    traj_id TEXT NOT NULL UNIQUE,       -- dedupe key (outboxes resend until acked)
    group_id TEXT NOT NULL,
    task_id TEXT NOT NULL,
    lease_id TEXT NOT NULL,
    actor_id TEXT NOT NULL,
    min_version INTEGER NOT NULL,       -- oldest policy version of any loss token
    n_tokens INTEGER NOT NULL,
    reward REAL NOT NULL,               -- outcome reward, success and the grant's pick
    success INTEGER NOT NULL,           -- probability: what the curriculum learns from
    sample_prob REAL NOT NULL,
    seconds REAL NOT NULL,              -- the episode's wall time (cost-aware curriculum)
    times_sampled INTEGER NOT NULL DEFAULT 0,
    evicted TEXT,                       -- reason, once removed from replay unsampled
    created REAL NOT NULL,
    seg_id INTEGER,                     -- where its encoding is: segment file (NULL: in memory),
    seg_offset INTEGER,                 -- byte offset in it
    nbytes INTEGER NOT NULL,            -- and length
    checksum INTEGER                    -- xxh3-64 of the encoding (signed); NULL: in memory
);
CREATE INDEX IF NOT EXISTS trajectories_segment ON trajectories(seg_id);
CREATE INDEX IF NOT EXISTS trajectories_open ON trajectories(times_sampled)
    WHERE evicted IS NULL;
CREATE INDEX IF NOT EXISTS trajectories_group ON trajectories(group_id);
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB NOT NULL);
-- traj_ids retention deleted, the newest TOMBSTONES_KEPT: a resend of one (its ack was lost
-- to a crash) is a duplicate, not a new trajectory to train on again
CREATE TABLE IF NOT EXISTS tombstones (n INTEGER PRIMARY KEY, traj_id TEXT NOT NULL UNIQUE);
"""
TOMBSTONES_KEPT = 1 << 16
INSERT = (
    "INSERT INTO trajectories (seq, traj_id, group_id, task_id, lease_id, actor_id,"
    " min_version, n_tokens, reward, success, sample_prob, seconds, created,"
    " seg_id, seg_offset, nbytes, checksum) VALUES "
)
INSERT_ROWS = 64  # rows per INSERT statement (17 parameters each)
SEG_COLUMN = 13  # index of seg_id in an insert row (seg_offset, nbytes, checksum follow)
CHECK_COLUMN = SEG_COLUMN + 3  # index of checksum in an insert row


@functools.cache
def insert_rows(n: int) -> str:
    return INSERT + ", ".join(["(" + ", ".join(["?"] * 17) + ")"] * n)


PAGE_SIZE = 16384
COMPACT_LIVE_FRACTION = 0.5  # `compact` rewrites segments with less than this still live
MAX_SQL_PARAMS = 30000  # below SQLite's 32766 host parameters per statement
META_COLS = (
    "seq, traj_id, group_id, task_id, lease_id, actor_id, min_version, n_tokens,"
    " reward, success, sample_prob, seconds"
)

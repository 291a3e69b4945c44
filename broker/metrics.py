"""Prometheus metrics of the broker (default registry, served by `shared.metrics`)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from shared.metrics import REJECTED_FRAMES
from shared.validation import REASONS

TRAJ_RECEIVED = Counter(
    "headrace_broker_trajectories_received_total", "Trajectories received from actors"
)
TRAJ_ACKED = Counter(
    "headrace_broker_trajectories_acked_total", "Trajectories acked after their store commit"
)
TRAJ_REJECTED = Counter(
    "headrace_broker_trajectories_rejected_total",
    "Trajectories (and task feedback) refused for good, never stored, by reason",
    ["reason"],
)
INGEST_SHED = Counter(
    "headrace_broker_ingest_shed_total",
    "Trajectories not taken because max_ingest_bytes were waiting for the store (resent later)",
)
INGEST_BYTES = Gauge(
    "headrace_broker_ingest_bytes", "Trajectory bytes received and waiting for their commit"
)
DUPLICATES = Counter(
    "headrace_broker_duplicates_total", "Trajectories received again (acked, not stored twice)"
)
TRAJ_SAMPLED = Counter(
    "headrace_broker_trajectories_sampled_total", "Trajectories handed out to the learner"
)
REPLAY_SIZE = Gauge(
    "headrace_broker_replay_size", "Trajectories in complete groups available to sample"
)
REPLAY_GROUPS = Gauge("headrace_broker_replay_groups", "Complete groups available to sample")
PENDING_GROUPS = Gauge(
    "headrace_broker_pending_groups", "Groups with some but not all trajectories stored"
)
STORED = Gauge("headrace_broker_stored_trajectories", "Trajectories in the durable store")
LEASES_ACTIVE = Gauge("headrace_broker_leases_active", "Leases granted and not yet done")
LEASES_GRANTED = Counter("headrace_broker_leases_granted_total", "Leases granted")
LEASES_EXPIRED = Counter(
    "headrace_broker_leases_expired_total", "Leases expired (peer silent or past deadline)"
)
BACKPRESSURE = Counter(
    "headrace_broker_backpressure_total", "Task requests answered with fewer leases than asked"
)
BATCHES_KEPT = Gauge(
    "headrace_broker_learner_batches_kept",
    "Batches handed to the learner and kept until a learner checkpoint covers their step",
)
BATCHES_HANDED_AGAIN = Counter(
    "headrace_broker_learner_batches_handed_again_total",
    "Batches handed to the learner again: unacknowledged, or trained after the step a"
    " restarted learner resumed from",
)
NOT_READY = Counter("headrace_broker_not_ready_total", "Sample requests answered NotReady")
EVICTED = Counter(
    "headrace_broker_evicted_total", "Groups removed from replay without being sampled", ["reason"]
)
COMMIT_SECONDS = Histogram(
    "headrace_broker_commit_seconds",
    "Seconds per store group commit (one SQLite transaction)",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.3, 1, 3),
)
COMMIT_BATCHES = Histogram(
    "headrace_broker_commit_batches",
    "TrajectoryBatch messages folded into one group commit",
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
STORE_ERRORS = Counter("headrace_broker_store_errors_total", "Store failures", ["kind"])
STORE_FAILING = Gauge(
    "headrace_broker_store_failing",
    "1 while store commits fail (disk full, corrupt database): nothing is acked; else 0",
)
STORE_RECOVERED = Counter(
    "headrace_broker_store_recovered_total",
    "Trajectory rows rebuilt at open from their synced segment records after an OS crash lost"
    " them (ingest commits its rows without a WAL fsync; broker/store/recovery.py)",
)
STORE_BYTES = Gauge(
    "headrace_broker_store_bytes", "Bytes the durable store takes on disk (database + WAL)"
)
RETENTION_DELETED = Counter(
    "headrace_broker_retention_deleted_total",
    "Trajectories deleted from the store by the retention policy, by what they were: consumed"
    " (sampled max_times_sampled times), evicted, or unconsumed (deleted to stay within a limit)",
    ["reason"],
)
RATE_LIMITER_BLOCKED = Counter(
    "headrace_broker_rate_limiter_blocked_total",
    "Requests the replay rate limiter held back: sample (learner ahead, answered NotReady) or"
    " insert (actors ahead, fewer leases granted)",
    ["side"],
)
RATE_LIMITER_INSERTS = Gauge(
    "headrace_broker_rate_limiter_inserts",
    "Trajectories inserted into replay, as the rate limiter counts them (since broker start)",
)
RATE_LIMITER_SAMPLES = Gauge(
    "headrace_broker_rate_limiter_samples",
    "Trajectories sampled from replay, as the rate limiter counts them (since broker start)",
)
PRIORITY_UPDATES = Counter(
    "headrace_broker_priority_updates_total",
    "Trajectory priorities from the learner applied to groups still in replay",
)
POLICY_VERSION = Gauge("headrace_broker_policy_version", "Latest policy version published")
ACTORS_CONNECTED = Gauge(
    "headrace_broker_actors_connected", "Actors heard from within heartbeat_timeout_s"
)


CURRICULUM_VERSION = Gauge("headrace_broker_curriculum_version", "Curator version (updates)")
CURRICULUM_ENTROPY = Gauge(
    "headrace_broker_curriculum_sampling_entropy",
    "Entropy (nats) of the curator's pick distribution over its last candidate pool",
)
CURRICULUM_ZERO_VARIANCE_FRACTION = Gauge(
    "headrace_broker_curriculum_zero_variance_fraction",
    "Fraction of finished groups whose rewards were all equal (no GRPO signal)",
)
CURRICULUM_GROUPS = Counter(
    "headrace_broker_curriculum_groups_total", "Finished groups, by task family", ["family"]
)
CURRICULUM_ZERO_VARIANCE = Counter(
    "headrace_broker_curriculum_zero_variance_groups_total",
    "Finished groups whose rewards were all equal, by task family",
    ["family"],
)
CURRICULUM_PASS_RATE = Gauge(
    "headrace_broker_curriculum_pass_rate", "Running pass rate by task family", ["family"]
)
CURRICULUM_SHARE = Gauge(
    "headrace_broker_curriculum_pick_share", "Running share of picks by task family", ["family"]
)
DATASET_BAD_ROWS = Counter(
    "headrace_broker_dataset_bad_rows_total",
    "Dataset rows skipped when the task bank was built ([env] name = dataset), by reason",
    ["reason"],
)


def init_label_values() -> None:
    """Export every known label value at 0 from the start, so dashboards and `rate()` see the
    series before the first event (a labelled counter is otherwise absent until then)."""
    for reason in (
        "malformed",
        "oversize",
        "invalid",
        "unknown_tag",
        "version_mismatch",
        "multipart",
        "unexpected",
        "invalid_trajectory",
        "oversize_stats",
        "forbidden",
        "implausible_version",
    ):
        REJECTED_FRAMES.labels(reason=reason)
    for reason in REASONS:
        TRAJ_REJECTED.labels(reason=reason)
    for reason in ("stale", "capacity", "incomplete", "retention", "zero_variance", "corrupt"):
        EVICTED.labels(reason=reason)
    for reason in ("consumed", "evicted", "unconsumed"):
        RETENTION_DELETED.labels(reason=reason)
    for kind in ("full", "corrupt", "locked", "error"):
        STORE_ERRORS.labels(kind=kind)
    for side in ("sample", "insert"):
        RATE_LIMITER_BLOCKED.labels(side=side)


# Evaluation rounds (broker/evaluation.py): held-out tasks, scored, never stored
EVAL_ROUNDS = Counter(
    "headrace_eval_rounds_total", "Evaluation rounds by state (started, done)", ["state"]
)
EVAL_LEASES = Counter("headrace_eval_leases_total", "Eval leases handed to actors")
EVAL_EPISODES = Counter("headrace_eval_episodes_total", "Evaluation episodes scored")
EVAL_POLICY_VERSION = Gauge(
    "headrace_eval_policy_version", "Policy version of the last finished evaluation round"
)
EVAL_PASS_AT_1 = Gauge(
    "headrace_eval_pass_at_1", "Held-out pass@1 of the last round (family=all: overall)", ["family"]
)
EVAL_PASS_AT_K = Gauge(
    "headrace_eval_pass_at_k",
    "Held-out pass@k (k = samples per task) of the last round (family=all: overall)",
    ["family"],
)
EVAL_MEAN_REWARD = Gauge(
    "headrace_eval_mean_reward", "Held-out mean episode reward of the last round", ["family"]
)
EVAL_REFUSED = Counter(
    "headrace_eval_outcomes_refused_total", "Eval outcomes not recorded (unknown or foreign lease)"
)

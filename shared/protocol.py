"""The headrace wire protocol: every message any role sends, in one module.

Messages are msgspec Structs tagged by class name and encoded as msgpack. A frame is decoded
with one `Decoder` over the union of all messages; an unknown tag, a wrong field type, an
oversize frame or a protocol-version mismatch raises `ProtocolError` with a short `reason`
(used as the label of `headrace_rejected_frames_total`). Nothing here ever unpickles.

Per-token arrays travel as packed little-endian bytes (one value per token of the whole
episode) so a 2k-token trajectory costs a handful of memcpys, not 2k msgpack ints.
"""

from __future__ import annotations

import functools
import operator
import typing
from enum import IntEnum

import msgspec
import numpy as np

PROTOCOL_VERSION = 2  # 2: batches carry an id, the learner acknowledges them
DEFAULT_MAX_FRAME_BYTES = 64 * 1024 * 1024


class Role(IntEnum):
    """Per-token role (uint8 on the wire)."""

    PROMPT = 0
    OBSERVATION = 1
    REASONING = 2
    ACTION = 3
    TEMPLATE = 4


class Termination:
    DONE = "done"
    MAX_TURNS = "max_turns"
    MAX_TOKENS = "max_tokens"
    ENV_ERROR = "env_error"


# dtype of each per-token array field of `Trajectory`.
TOKEN_ARRAYS: dict[str, np.dtype] = {
    "token_ids": np.dtype("<i4"),
    "role": np.dtype("u1"),
    "loss_mask": np.dtype("u1"),
    "behav_logprob": np.dtype("<f4"),
    "policy_version": np.dtype("<i4"),
    "turn_idx": np.dtype("<i2"),
}


class Base(msgspec.Struct, tag=True, forbid_unknown_fields=True, omit_defaults=True):
    pass


# ---------------------------------------------------------------- handshake / control


class Hello(Base):
    role: str  # "actor" | "learner" | "cli"
    peer_id: str
    protocol_version: int
    capabilities: dict[str, str] = {}


class Welcome(Base):
    run_id: str
    policy_version: int
    weights_endpoint: str  # "" until a learner has published
    # shared.handshake.run_digest of the broker's config: a peer whose own differs is refused
    config_digest: str
    manifest: WeightManifest | None = None
    # The run's GRPO group size ([broker] group_size, the broker's alone: every Lease carries
    # it too). 0: a broker that does not say; its peers then use their own config's.
    group_size: int = 0


class Error(Base):
    reason: str  # machine-readable, also the metric label
    detail: str = ""


class Heartbeat(Base):
    peer_id: str
    stats: dict[str, float] = {}


# ---------------------------------------------------------------- tasks


class TaskSpec(Base):
    task_id: str
    env: str
    family: str = ""
    difficulty: float = 0.0
    payload: dict[str, str | int | float] = {}


class Lease(Base):
    lease_id: str
    task: TaskSpec
    group_size: int  # episodes of `task` to play: the broker's group size (eval: samples)
    deadline_s: float  # seconds from grant; renewed by heartbeats
    sample_prob: float = 1.0
    curator_version: int = 0
    timeout_s: float = 0.0  # seconds from grant, never renewed: episodes still running stop
    # "eval": a held-out task of an evaluation round; its episodes are scored and reported
    # (EvalOutcome), never sent as trajectories, so they cannot enter replay
    purpose: str = "train"


class TaskRequest(Base):
    n: int


class TaskGrant(Base):
    leases: list[Lease]
    retry_after_s: float = 0.0  # >0: broker is applying backpressure


# ---------------------------------------------------------------- trajectories


class TurnInfo(Base):
    reward: float
    done: bool
    truncated: bool
    action_valid: bool
    state_key: str = ""
    action: str = ""


class Trajectory(Base):
    traj_id: str
    group_id: str
    task_id: str
    env: str
    actor_id: str
    lease_id: str
    # per token, packed little-endian (see TOKEN_ARRAYS)
    token_ids: bytes
    role: bytes
    loss_mask: bytes
    behav_logprob: bytes
    policy_version: bytes
    turn_idx: bytes
    # per turn
    turns: list[TurnInfo]
    # per episode
    outcome_reward: float
    success: bool
    termination: str
    n_turns: int
    sampling: dict[str, float] = {}
    timings: dict[str, float] = {}
    sample_prob: float = 1.0
    curator_version: int = 0

    def array(self, name: str) -> np.ndarray:
        return np.frombuffer(getattr(self, name), dtype=TOKEN_ARRAYS[name])

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids) // TOKEN_ARRAYS["token_ids"].itemsize


_VERSION_BYTES = TOKEN_ARRAYS["policy_version"].itemsize  # signed little-endian


def min_policy_version(t: Trajectory | TrajectoryView) -> int:
    """The oldest policy version of any loss token of `t` (0 without one), read off the
    first loss token: a few bytes, not the whole array.

    An actor only ever moves to newer weights (it ignores older publications), so versions
    never decrease along an episode (`shared.validation` refuses a trajectory where they do,
    before the broker stores it) and the first loss token's version is the oldest.
    """
    mask = bytes(t.loss_mask)  # one byte per token: byte index == token index
    first = len(mask) - len(mask.lstrip(b"\0"))
    if first == len(mask):
        return 0  # no loss token
    at = _VERSION_BYTES * first
    return int.from_bytes(t.policy_version[at : at + _VERSION_BYTES], "little", signed=True)


class TrajectoryBatch(Base):
    items: list[Trajectory]


# Zero-copy twins of Trajectory / TrajectoryBatch / Batch for the broker, which stores and
# forwards trajectories without needing them as Python objects: same tags, so the bytes on the
# wire are identical. `TrajectoryBatchFrames.items` are `msgspec.Raw` slices of the received
# frame (each one trajectory's complete msgpack encoding, stored as is); `TrajectoryView` has
# the same fields as Trajectory but per-token arrays as memoryviews into that frame, so
# validating a trajectory copies none of its 16 bytes per token.
def _view_field(f: msgspec.structs.FieldInfo) -> tuple:
    kind = memoryview if f.name in TOKEN_ARRAYS else f.type
    if f.required:
        return (f.name, kind)
    if f.default_factory is not msgspec.NODEFAULT:
        return (f.name, kind, msgspec.field(default_factory=f.default_factory))
    return (f.name, kind, f.default)


if typing.TYPE_CHECKING:
    # To a type checker a view is a Trajectory: the same fields, read the same way (its
    # per-token arrays are memoryviews instead of bytes, and every reader takes them as buffers).
    TrajectoryView = Trajectory
else:
    TrajectoryView = msgspec.defstruct(
        "TrajectoryView",
        [_view_field(f) for f in msgspec.structs.fields(Trajectory)],
        bases=(Base,),
        tag="Trajectory",
        module=__name__,
    )


class TrajectoryBatchFrames(Base, tag="TrajectoryBatch"):
    items: list[msgspec.Raw]


class Rejected(Base):
    """A trajectory the broker will never store (`shared.validation` names the reasons)."""

    traj_id: str
    reason: str
    detail: str = ""


class Ack(Base):
    traj_ids: list[str]  # stored (or already stored: `duplicates` of them)
    duplicates: int = 0
    # Refused for good: the sender drops them instead of resending. The good trajectories of
    # the same batch are acked all the same.
    rejected: list[Rejected] = []


# ---------------------------------------------------------------- learner <-> broker


class SampleRequest(Base):
    batch_size: int  # in trajectories; whole groups are returned
    # The learner's current version, for the staleness cap. The cap itself is the broker's
    # ([broker] max_staleness): a client never chooses what gets evicted.
    policy_version: int = 0


class Batch(Base):
    items: list[Trajectory]
    sample_ids: list[int]
    is_weights: list[float]
    cursor: int = 0  # the broker's insert sequence number of the newest item handed out
    # Until the learner acknowledges it (BatchTrained) the broker offers the same batch, same
    # id, again on each SampleRequest, and again after a learner restart if the step that
    # trained it was not checkpointed: a lost or late reply loses nothing, a duplicate is
    # recognised by its id.
    batch_id: int = 0


class BatchFrames(Base, tag="Batch"):
    """`Batch` as the broker sends it: stored trajectory encodings spliced in unchanged."""

    items: list[msgspec.Raw]
    sample_ids: list[int]
    is_weights: list[float]
    cursor: int = 0
    batch_id: int = 0


class BatchTrained(Base):
    """Learner -> broker after the step that trained `batch_id` (its `step`, 1-based)."""

    batch_id: int
    step: int


class Checkpointed(Base):
    """Learner -> broker: a checkpoint holds every step up to `step`; batches trained by
    those steps will never be needed again (a restart resumes after them)."""

    step: int


class NotReady(Base):
    """Answer to a SampleRequest the rate limiter cannot serve yet."""

    replay_size: int
    retry_after_s: float


class PriorityUpdate(Base):
    sample_ids: list[int]
    priorities: list[float]


class TaskFeedback(Base):
    task_id: str
    mean_abs_advantage: float = 0.0
    pass_rate: float = 0.0
    policy_version: int = 0


# ---------------------------------------------------------------- weights


class TensorInfo(Base):
    name: str
    dtype: str
    shape: list[int]


class WeightManifest(Base):
    version: int
    total_bytes: int
    chunk_bytes: int
    chunk_digests: list[str]  # `digest_alg` hex of each chunk of the safetensors blob
    tensors: list[TensorInfo]
    digest: str  # under "xxh3-128": `digest_alg` of the chunk digests joined in order
    # "full": every weight, HF names; "lora": only a PEFT adapter (adapter_model.safetensors
    # names), loaded by vLLM's LoRA support. Defaults are omitted on the wire, so peers that
    # predate LoRA still decode full-weight manifests.
    kind: str = "full"
    adapter_config: dict[str, typing.Any] | None = None  # "lora": adapter_config.json
    # The hash of the digests: "xxh3-128" (shared/weights.py, no pass over the blob for
    # `digest`). The default names what publishers without this field sent (blake2b-128 per
    # chunk and of the whole blob), which current actors refuse rather than misread.
    digest_alg: str = "blake2b-128"


class PolicyPublished(Base):
    version: int
    weights_endpoint: str
    manifest: WeightManifest


class WeightRequest(Base):
    version: int
    chunk: int


class WeightChunk(Base):
    version: int
    chunk: int
    data: memoryview  # decoded as a view into the received frame: no copy of the chunk


# ---------------------------------------------------------------- evaluation


class EvalRequest(Base):
    """Learner -> broker: evaluate policy `version` on `tasks` held-out tasks per family,
    `samples` episodes each. Idempotent: sent again to ask how the round stands (and to
    start it again on a broker that restarted and forgot it). Answered by EvalReport."""

    version: int
    tasks: int
    samples: int


class EvalReport(Base):
    version: int
    state: str  # "running" | "done"
    done_tasks: int = 0
    total_tasks: int = 0
    seconds: float = 0.0
    # when done: shared.passk.as_dict of the round, plus the policy versions that played it
    scores: dict[str, typing.Any] = {}


class EvalOutcome(Base):
    """Actor -> broker: every episode of an eval lease, scored (no trajectory is sent)."""

    lease_id: str
    task_id: str
    rewards: list[float]
    successes: list[bool]
    policy_versions: list[int]  # the policy that started each episode


class Status(Base):
    """`headrace status` asks the broker for this; the broker answers with StatusReply."""

    pass


class StatusReply(Base):
    info: dict[str, object]


Message = (
    Hello
    | Welcome
    | Error
    | Heartbeat
    | TaskRequest
    | TaskGrant
    | TrajectoryBatch
    | Ack
    | SampleRequest
    | Batch
    | NotReady
    | BatchTrained
    | Checkpointed
    | PriorityUpdate
    | TaskFeedback
    | PolicyPublished
    | WeightRequest
    | WeightChunk
    | EvalRequest
    | EvalReport
    | EvalOutcome
    | Status
    | StatusReply
)


class ProtocolError(Exception):
    """A frame that cannot be accepted; `reason` is a short metric label."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# What the broker decodes: every message, with trajectories left as frames (see above).
BrokerInbound = TrajectoryBatchFrames | functools.reduce(
    operator.or_, [m for m in typing.get_args(Message) if m is not TrajectoryBatch]
)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)
_view_decoder = msgspec.msgpack.Decoder(TrajectoryView)


def decoder_for(kind: object) -> msgspec.msgpack.Decoder:
    """A decoder for `kind` (e.g. `BrokerInbound`) to pass to `decode`."""
    return msgspec.msgpack.Decoder(kind)


def encode(msg: Base) -> bytes:
    return _encoder.encode(msg)


def decode(
    frame: bytes | memoryview | msgspec.Raw,
    max_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    decoder: msgspec.msgpack.Decoder = _decoder,
) -> Message:
    if len(frame) > max_bytes:
        raise ProtocolError("oversize", f"{len(frame)} bytes > cap {max_bytes}")
    try:
        msg = decoder.decode(frame)
    except msgspec.ValidationError as e:
        text = str(e)
        reason = "unknown_tag" if "Invalid value" in text and "`$.type`" in text else "invalid"
        raise ProtocolError(reason, text) from None
    except msgspec.DecodeError as e:
        raise ProtocolError("malformed", str(e)) from None
    # msgspec lets two errors through that are not DecodeErrors: RecursionError on ~1,000
    # levels of nested maps (a 3 KiB frame) and UnicodeDecodeError on a field name that is
    # not UTF-8. Both are the peer's fault, and must never end a receive loop.
    except RecursionError:
        raise ProtocolError("too_deep", "nesting exceeds the decoder's recursion limit") from None
    except UnicodeDecodeError as e:
        raise ProtocolError("malformed", f"invalid UTF-8: {e}") from None
    except Exception as e:  # anything else msgspec might raise is still the peer's fault
        raise ProtocolError("malformed", f"{type(e).__name__}: {e}") from None
    if isinstance(msg, Hello) and msg.protocol_version != PROTOCOL_VERSION:
        raise ProtocolError(
            "version_mismatch",
            f"peer speaks protocol {msg.protocol_version}, this build speaks {PROTOCOL_VERSION}",
        )
    return msg


def decode_view(frame: msgspec.Raw | bytes | memoryview) -> TrajectoryView:
    """Validate one trajectory's encoding (as strictly as `decode`) without copying arrays."""
    return decode(frame, decoder=_view_decoder)  # type: ignore[return-value]


class _TrajIdOnly(msgspec.Struct, tag="Trajectory"):
    traj_id: str = ""


def peek_traj_id(frame: msgspec.Raw | bytes | memoryview) -> str:
    """The traj_id of a trajectory encoding that fails `decode_view`, when it can still be
    read (so the sender can be told which one to drop); "" when it cannot."""
    try:
        return msgspec.msgpack.decode(frame, type=_TrajIdOnly).traj_id
    except Exception:  # whatever the bytes are, "unknown" is the answer
        return ""


def pack(array: np.ndarray | list, name: str) -> bytes:
    """Pack a per-token array for a `Trajectory` field."""
    return np.asarray(array, dtype=TOKEN_ARRAYS[name]).tobytes()

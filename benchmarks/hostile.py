"""Well-formed hostile messages: every message type, extreme values, ids the run really uses.

The meaning fuzzer's generator (benchmarks/fuzz_meaning.py). Every message it makes decodes
(it is well-formed msgpack of a real message type, so it reaches the broker's handlers, not
its frame checks); what is hostile is the values. Half are built field by field from the
message's schema, every field drawn from a pool of extremes of its type; the other half start
from a valid message of the sending peer's role (a group for one of its leases, feedback for
a real task, a policy one version ahead) with one or two fields replaced by such extremes,
so they pass the early checks and reach the deep ones.

The adversary knows every id the run has used (`Knowledge`): other actors' lease and task
ids, the learner's batch and sample ids, peer ids. Only secrets (keys, routing-id nonces)
are out of its reach.
"""

from __future__ import annotations

import math
import random
import types
import typing
from dataclasses import dataclass, field

import msgspec
import numpy as np

from shared import protocol as P
from shared import synthetic

VOCAB = synthetic.TINY_VOCAB_SIZE
BIG = 2**62
NAN, INF = math.nan, math.inf
INTS = [0, 1, -1, 2, 3, 7, 255, 256, 2**31 - 1, 2**31, -(2**31), BIG, -BIG, 2**63 - 1, -(2**63)]
FLOATS = [0.0, -0.0, 0.5, 1.0, -1.0, 2.0, 1e-300, 1e300, -1e300, NAN, INF, -INF]
STRS = ["", "x", "learner", "actor-0", "tcp://evil:1", "\x00", "é∂ß\u202e", "k" * 4000]
# Per-token values that break each array's meaning, within its wire dtype.
ARRAY_VALUES: dict[str, list[float]] = {
    "token_ids": [0, 5, VOCAB - 1, VOCAB, -1, 2**31 - 1, -(2**31)],
    "role": [0, 1, 2, 3, 4, 5, 255],
    "loss_mask": [0, 1, 2, 255],
    "behav_logprob": [-0.5, 0.0, 0.5, NAN, INF, -INF, -1e30],
    "policy_version": [0, 1, 2, -1, 2**31 - 1, -(2**31)],
    "turn_idx": [0, 1, -1, 100, 2**15 - 1],
}
# Peers send the broker these; the rest (the broker's own replies, the weight endpoint's) are
# sent too: a peer may send any type, the broker must refuse what is not a request.
REQUESTS: list[type[P.Base]] = [
    P.Hello, P.Heartbeat, P.TaskRequest, P.TrajectoryBatch, P.SampleRequest, P.BatchTrained,
    P.Checkpointed, P.PriorityUpdate, P.TaskFeedback, P.PolicyPublished, P.EvalRequest,
    P.EvalOutcome, P.Status,
]  # fmt: skip
OTHERS: list[type[P.Base]] = [
    P.Welcome, P.Error, P.TaskGrant, P.Ack, P.Batch, P.NotReady, P.WeightRequest,
    P.WeightChunk, P.EvalReport, P.StatusReply,
]  # fmt: skip


@dataclass
class Knowledge:
    """Every id the run has shown anyone: the adversary's dictionary."""

    lease_ids: list[str] = field(default_factory=lambda: ["l"])
    task_ids: list[str] = field(default_factory=lambda: ["symbols-L1-0"])
    batch_ids: list[int] = field(default_factory=lambda: [1])
    sample_ids: list[int] = field(default_factory=lambda: [1])
    policy_version: int = 0

    def learn(self, ids: list, new: object, cap: int = 256) -> None:
        if new not in ids:
            ids.append(new)
            del ids[:-cap]


class Hostile:
    """Seeded source of hostile messages for a peer of a given role."""

    def __init__(self, seed: int, known: Knowledge) -> None:
        self.rng = random.Random(seed)
        self.known = known

    # ------------------------------------------------------------ values by type

    def value(self, tp: object, name: str = "") -> object:  # noqa: PLR0911 (one per kind)
        rng = self.rng
        if name in P.TOKEN_ARRAYS and tp is bytes:  # a per-token array
            return self.array(name, rng.choice([0, 1, 3, 8, 700]))
        origin = typing.get_origin(tp)
        if origin in (types.UnionType, typing.Union):
            return self.value(rng.choice(typing.get_args(tp)), name)
        if tp is int:
            return rng.choice(INTS + self.known.batch_ids[-4:] + [self.known.policy_version + 1])
        if tp is float:
            return rng.choice(FLOATS)
        if tp is bool:
            return rng.random() < 0.5
        if tp is str:
            return rng.choice(STRS + self.known.lease_ids[-8:] + self.known.task_ids[-8:])
        if tp in (bytes, memoryview):
            return rng.randbytes(rng.choice([0, 4, 64]))
        if tp is type(None):
            return None
        if origin is list:
            (item,) = typing.get_args(tp)
            n = rng.choice([0, 1, 2, 3, 50 if item in (int, float, str, bool) else 2])
            return [self.value(item) for _ in range(n)]
        if origin is dict:
            _, item = typing.get_args(tp)
            n = rng.choice([0, 1, 3, 100])
            return {rng.choice(STRS[:7]) + str(i): self.value(item) for i in range(n)}
        if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
            return self.struct(tp)
        return rng.choice([1, "x", [1, 2], {"k": 1.5}, None])  # typing.Any

    def array(self, name: str, n: int) -> bytes:
        """`n` values of per-token array `name`, mostly sane, some extreme."""
        pool = ARRAY_VALUES[name]
        if self.rng.random() < 0.5:  # one extreme among sane values
            values = [pool[0]] * n
            if n:
                values[self.rng.randrange(n)] = self.rng.choice(pool)
        else:
            values = [self.rng.choice(pool) for _ in range(n)]
        return np.array(values, dtype=P.TOKEN_ARRAYS[name]).tobytes()

    def struct(self, cls: type[msgspec.Struct]) -> msgspec.Struct:
        """An instance of `cls` with every field drawn from the extremes of its type."""
        fields = msgspec.structs.fields(cls)
        return cls(**{f.name: self.value(f.type, f.name) for f in fields})

    # ------------------------------------------------------------ messages

    def message(self, role: str, peer_id: str, own_leases: list[P.Lease]) -> P.Base:
        """One hostile message from a peer of `role` holding `own_leases`."""
        rng = self.rng
        cls = rng.choice(REQUESTS) if rng.random() < 0.85 else rng.choice(OTHERS)
        if cls in OTHERS or rng.random() < 0.5:
            return self.struct(cls)  # type: ignore[return-value]
        msg = self.valid(cls, role, peer_id, own_leases)
        if isinstance(msg, P.TrajectoryBatch) and msg.items:  # edit inside one trajectory
            i = rng.randrange(len(msg.items))
            msg.items[i] = self.edit(msg.items[i])
            return msg
        return self.edit(msg) if msgspec.structs.fields(msg) else msg

    def learner_message(self) -> P.Base:
        """What the run's own learner might send if it went wrong: its message types with
        implausible versions, steps, sizes and non-finite statistics (never a plausible next
        version: the learner may publish that)."""
        rng, k = self.rng, self.known
        versions = [BIG, -1, -BIG, 2**31, 2**63 - 1]
        floats = [NAN, INF, -INF, -1.0, 1e300]
        ids = [BIG, -1, *k.sample_ids[-4:]]
        makers: list[typing.Callable[[], P.Base]] = [
            lambda: P.SampleRequest(batch_size=rng.choice([BIG, -1, 0, 1]),
                                    policy_version=rng.choice(versions)),
            lambda: P.PolicyPublished(version=(v := rng.choice(versions)),
                                      weights_endpoint=rng.choice(STRS), manifest=manifest(v)),
            lambda: P.PriorityUpdate(sample_ids=[rng.choice(ids) for _ in range(3)],
                                     priorities=[rng.choice(floats) for _ in range(3)]),
            lambda: P.TaskFeedback(task_id=rng.choice(k.task_ids + STRS),
                                   mean_abs_advantage=rng.choice(floats),
                                   pass_rate=rng.choice(floats),
                                   policy_version=rng.choice(versions)),
            lambda: P.BatchTrained(batch_id=rng.choice([BIG, -1, *k.batch_ids[-4:]]),
                                   step=rng.choice(INTS)),
            lambda: P.EvalRequest(version=rng.choice(versions), tasks=rng.choice([BIG, -1, 0]),
                                  samples=rng.choice([BIG, -1, 0])),
            lambda: P.Heartbeat(peer_id=rng.choice(STRS), stats={"x": rng.choice(floats)}),
        ]  # fmt: skip
        return rng.choice(makers)()

    def edit(self, msg: msgspec.Struct) -> typing.Any:
        """`msg` with one or two of its fields replaced by extremes of their types."""
        fields = msgspec.structs.fields(msg)
        picked = self.rng.sample(fields, min(len(fields), self.rng.choice([1, 2])))
        return msgspec.structs.replace(msg, **{f.name: self.value(f.type, f.name) for f in picked})

    def valid(self, cls: type, role: str, peer_id: str, own: list[P.Lease]) -> P.Base:
        """A message of type `cls` as a correct peer of `role` would send it now."""
        k, rng = self.known, self.rng
        v = k.policy_version
        task = rng.choice(k.task_ids)
        builders: dict[type, typing.Callable[[], P.Base]] = {
            P.Hello: lambda: P.Hello(
                role=role, peer_id=peer_id, protocol_version=P.PROTOCOL_VERSION
            ),
            P.Heartbeat: lambda: P.Heartbeat(peer_id=peer_id, stats={"policy_version": float(v)}),
            P.TaskRequest: lambda: P.TaskRequest(n=rng.choice([1, 4])),
            P.TrajectoryBatch: lambda: P.TrajectoryBatch(items=self.group(own, peer_id)),
            P.SampleRequest: lambda: P.SampleRequest(batch_size=8, policy_version=v),
            P.BatchTrained: lambda: P.BatchTrained(batch_id=rng.choice(k.batch_ids), step=1),
            P.Checkpointed: lambda: P.Checkpointed(step=rng.randint(1, 100)),
            P.PriorityUpdate: lambda: P.PriorityUpdate(
                sample_ids=k.sample_ids[-2:], priorities=[1.0] * len(k.sample_ids[-2:])
            ),
            P.TaskFeedback: lambda: P.TaskFeedback(task_id=task, pass_rate=0.5, policy_version=v),
            P.PolicyPublished: lambda: P.PolicyPublished(
                version=v + 1, weights_endpoint="tcp://127.0.0.1:1", manifest=manifest(v + 1)
            ),
            P.EvalRequest: lambda: P.EvalRequest(version=v, tasks=1, samples=1),
            P.EvalOutcome: lambda: P.EvalOutcome(
                lease_id=rng.choice(k.lease_ids),
                task_id=task,
                rewards=[1.0],
                successes=[True],
                policy_versions=[v],
            ),  # fmt: skip
            P.Status: P.Status,
        }
        return builders[cls]()

    def group(self, own: list[P.Lease], actor_id: str) -> list[P.Trajectory]:
        """A whole, valid group for one of `own` leases (or, without one, for a lease id the
        adversary knows of: another actor's)."""
        if own:
            lease = self.rng.choice(own)
            lid, task, size = lease.lease_id, lease.task.task_id, lease.group_size
        else:
            lid, task, size = self.rng.choice(self.known.lease_ids), "symbols-L1-0", 2
        return valid_group(lid, task, size, self.known.policy_version, actor_id, self.rng)


def valid_group(
    lease_id: str, task_id: str, size: int, version: int, actor_id: str, rng: random.Random
) -> list[P.Trajectory]:
    """The `size` episodes of a lease as a correct actor sends them (rewards 0 or 1)."""
    tag = rng.getrandbits(32)
    return [
        synthetic.trajectory(
            f"{lease_id}-{tag:08x}-{i}",
            lease_id,
            n_tokens=8,
            n_prompt=2,
            lease_id=lease_id,
            task_id=task_id,
            env="symbols",
            actor_id=actor_id,
            policy_version=version,
            behav_logprob=-0.5,
            reward=float((i + tag) % 2),
            rng=rng.getrandbits(32),
        )  # fmt: skip
        for i in range(size)
    ]


def manifest(version: int) -> P.WeightManifest:
    return P.WeightManifest(
        version=version, total_bytes=8, chunk_bytes=4, chunk_digests=["0" * 32, "1" * 32],
        tensors=[P.TensorInfo(name="w", dtype="float32", shape=[2])], digest="2" * 32,
        digest_alg="xxh3-128",
    )  # fmt: skip

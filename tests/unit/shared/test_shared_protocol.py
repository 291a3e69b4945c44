"""Every wire message round-trips; bad frames raise ProtocolError with a metric-ready reason."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest

from shared import protocol as P


def make_traj(n: int = 6, traj_id: str = "t1") -> P.Trajectory:
    return P.Trajectory(
        traj_id=traj_id,
        group_id="g",
        task_id="task",
        env="symbols",
        actor_id="a",
        lease_id="g",
        token_ids=P.pack(np.arange(n), "token_ids"),
        role=P.pack([P.Role.PROMPT] * 2 + [P.Role.REASONING] * (n - 3) + [P.Role.ACTION], "role"),
        loss_mask=P.pack([0, 0] + [1] * (n - 2), "loss_mask"),
        behav_logprob=P.pack(np.linspace(-1, -0.1, n), "behav_logprob"),
        policy_version=P.pack([3] * (n - 1) + [4], "policy_version"),
        turn_idx=P.pack([0] * n, "turn_idx"),
        turns=[P.TurnInfo(reward=1.0, done=True, truncated=False, action_valid=True)],
        outcome_reward=1.0,
        success=True,
        termination=P.Termination.DONE,
        n_turns=1,
    )


MANIFEST = P.WeightManifest(
    version=2,
    total_bytes=10,
    chunk_bytes=8,
    chunk_digests=["a", "b"],
    tensors=[P.TensorInfo(name="w", dtype="F32", shape=[2, 1])],
    digest="c",
)
TASK = P.TaskSpec(task_id="x", env="symbols", family="L1", difficulty=1.0, payload={"level": 1})

EXAMPLES: list[P.Base] = [
    P.Hello(
        role="actor", peer_id="a", protocol_version=P.PROTOCOL_VERSION, capabilities={"k": "v"}
    ),
    P.Welcome(
        run_id="r",
        policy_version=2,
        weights_endpoint="tcp://h:1",
        config_digest="d",
        manifest=MANIFEST,
        group_size=8,
    ),
    P.Error(reason="oversize", detail="too big"),
    P.Heartbeat(peer_id="a", stats={"episodes": 3.0}),
    P.TaskRequest(n=2),
    P.TaskGrant(leases=[P.Lease(lease_id="l", task=TASK, group_size=8, deadline_s=30.0)]),
    P.TrajectoryBatch(items=[make_traj()]),
    P.Ack(traj_ids=["t1"], duplicates=1),
    P.SampleRequest(batch_size=32, policy_version=5),
    P.Batch(items=[make_traj()], sample_ids=[7], is_weights=[1.0], cursor=9, batch_id=3),
    P.BatchTrained(batch_id=3, step=12),
    P.Checkpointed(step=12),
    P.NotReady(replay_size=3, retry_after_s=0.5),
    P.PriorityUpdate(sample_ids=[1, 2], priorities=[0.5, 0.25]),
    P.TaskFeedback(task_id="x", mean_abs_advantage=0.3, pass_rate=0.5, policy_version=4),
    P.PolicyPublished(version=2, weights_endpoint="tcp://h:1", manifest=MANIFEST),
    P.WeightRequest(version=2, chunk=1),
    P.WeightChunk(version=2, chunk=1, data=b"\x00\x01"),
    P.EvalRequest(version=4, tasks=16, samples=4),
    P.EvalReport(version=4, state="done", done_tasks=2, total_tasks=2, scores={"pass_at_1": 0.5}),
    P.EvalOutcome(
        lease_id="l",
        task_id="t",
        rewards=[1.0, 0.0],
        successes=[True, False],
        policy_versions=[3, 4],
    ),
    P.Status(),
    P.StatusReply(info={"replay_size": 3, "actors": [{"id": "a"}]}),
]


def test_every_message_type_has_an_example():
    covered = {type(m) for m in EXAMPLES}
    assert covered == set(P.Message.__args__)


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    assert P.decode(P.encode(msg)) == msg


def test_trajectory_arrays_keep_dtype_and_values():
    t = P.decode(P.encode(P.TrajectoryBatch(items=[make_traj(8)]))).items[0]
    assert t.array("token_ids").tolist() == list(range(8))
    assert t.array("behav_logprob").dtype == np.float32
    assert t.array("policy_version").tolist() == [3] * 7 + [4]
    assert P.min_policy_version(t) == 3
    assert t.n_tokens == 8


def test_garbage_is_malformed():
    with pytest.raises(P.ProtocolError) as e:
        P.decode(b"\xc1\xff\x00garbage")
    assert e.value.reason == "malformed"


def test_unknown_tag_is_rejected():
    frame = msgspec.msgpack.encode({"type": "Pickle", "payload": "x"})
    with pytest.raises(P.ProtocolError) as e:
        P.decode(frame)
    assert e.value.reason in {"unknown_tag", "invalid"}


def test_wrong_field_type_is_invalid():
    frame = msgspec.msgpack.encode({"type": "TaskRequest", "n": "many"})
    with pytest.raises(P.ProtocolError) as e:
        P.decode(frame)
    assert e.value.reason == "invalid"


def test_oversize_frame_is_rejected_before_decoding():
    frame = P.encode(P.WeightChunk(version=1, chunk=0, data=b"x" * 2000))
    with pytest.raises(P.ProtocolError) as e:
        P.decode(frame, max_bytes=1000)
    assert e.value.reason == "oversize"


def test_wrong_protocol_version_is_rejected():
    frame = P.encode(P.Hello(role="actor", peer_id="a", protocol_version=P.PROTOCOL_VERSION + 1))
    with pytest.raises(P.ProtocolError) as e:
        P.decode(frame)
    assert e.value.reason == "version_mismatch"


def test_trajectory_view_mirrors_trajectory_without_copying_arrays():
    fields = [(f.name, f.required) for f in msgspec.structs.fields(P.Trajectory)]
    assert [(f.name, f.required) for f in msgspec.structs.fields(P.TrajectoryView)] == fields
    t = make_traj()
    frame = P.encode(t)
    v = P.decode_view(frame)
    assert isinstance(v.token_ids, memoryview) and v.token_ids.obj is not None
    for name in P.TOKEN_ARRAYS:
        assert bytes(getattr(v, name)) == getattr(t, name)
    assert (v.traj_id, v.turns, v.sampling) == (t.traj_id, t.turns, t.sampling)


def test_broker_frames_are_byte_identical_to_the_full_messages():
    trajs = [make_traj(traj_id=f"t{i}") for i in range(3)]
    batch = P.encode(P.TrajectoryBatch(items=trajs))
    frames = P.decode(batch, decoder=P.decoder_for(P.BrokerInbound))
    assert isinstance(frames, P.TrajectoryBatchFrames)
    assert [bytes(r) for r in frames.items] == [P.encode(t) for t in trajs]
    out = P.BatchFrames(frames.items, sample_ids=[1, 2, 3], is_weights=[1.0, 0.5, 1.0], cursor=3)
    full = P.Batch(trajs, sample_ids=[1, 2, 3], is_weights=[1.0, 0.5, 1.0], cursor=3)
    assert P.encode(out) == P.encode(full)
    assert P.decode(P.encode(out)) == full


def test_view_validates_as_strictly_as_a_full_decode():
    bad = msgspec.msgpack.encode({"type": "Trajectory", "traj_id": 1})
    with pytest.raises(P.ProtocolError) as e:
        P.decode_view(bad)
    assert e.value.reason == "invalid"
    t = make_traj()
    extra = msgspec.to_builtins(t) | {"type": "Trajectory", "surprise": 1}
    with pytest.raises(P.ProtocolError):
        P.decode_view(msgspec.msgpack.encode(extra))


def test_a_weight_chunk_decodes_as_a_view_into_its_frame():
    # The actor checks a chunk's digest and writes it into its buffer straight from the
    # received frame: decoding it copies nothing.
    frame = bytearray(P.encode(P.WeightChunk(version=1, chunk=0, data=b"w" * 4096)))
    msg = P.decode(memoryview(frame))
    assert isinstance(msg, P.WeightChunk) and msg.data == b"w" * 4096
    frame[-1:] = b"x"  # the frame's last byte is the chunk's last byte
    assert bytes(msg.data[-1:]) == b"x"

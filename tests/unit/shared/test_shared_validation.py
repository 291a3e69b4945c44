"""Semantic validation of trajectories at the broker: each defect that would crash, stall or
mislead the learner is refused by name, alone; the good trajectories sent with it are stored."""

from __future__ import annotations

import json
import math
from pathlib import Path

import msgspec
import numpy as np
import pytest
from prometheus_client import REGISTRY

from shared import protocol as P
from shared.synthetic import TINY_VOCAB_SIZE
from shared.validation import Limits, check_feedback, check_trajectory
from tests.broker_helpers import make_traj, running
from tests.unit.broker.test_broker_server import config, status

VOCAB = TINY_VOCAB_SIZE  # make_traj's ids are the tiny model's
LIMITS = Limits(vocab_size=VOCAB, max_tokens=64, policy_version=5)


def with_array(t: P.Trajectory, name: str, values: list) -> P.Trajectory:
    return msgspec.structs.replace(t, **{name: P.pack(values, name)})


def defects() -> dict[str, P.Trajectory]:
    t = make_traj("g", 1, version=2, n_tokens=8)
    n = t.n_tokens
    lp = [-0.5] * n
    return {
        "too_long": make_traj("g", 1, n_tokens=65),
        "token_id": with_array(t, "token_ids", [0] * (n - 1) + [VOCAB]),
        "token_id (negative)": with_array(t, "token_ids", [-1] + [0] * (n - 1)),
        "role": with_array(t, "role", [0] * (n - 1) + [9]),
        "loss_mask": with_array(t, "loss_mask", [0] * (n - 1) + [2]),
        "logprob": with_array(t, "behav_logprob", lp[:-1] + [math.nan]),
        "logprob (positive)": with_array(t, "behav_logprob", lp[:-1] + [0.5]),
        "policy_version": with_array(t, "policy_version", [2] * (n - 1) + [6]),
        "policy_version (decreasing)": with_array(t, "policy_version", [3] * (n - 1) + [2]),
        "reward": msgspec.structs.replace(t, outcome_reward=math.inf),
        "sample_prob": msgspec.structs.replace(t, sample_prob=0.0),
        "ids": msgspec.structs.replace(t, traj_id=""),
    }


@pytest.mark.parametrize("case", list(defects()))
def test_each_defect_is_named(case: str) -> None:
    bad = check_trajectory(defects()[case], LIMITS)
    assert bad is not None and bad.reason == case.split(" ")[0], bad


def test_a_valid_trajectory_passes_and_bounds_of_zero_are_off() -> None:
    t = make_traj("g", 1, version=5, n_tokens=64)
    assert check_trajectory(t, LIMITS) is None
    big = with_array(make_traj("g", 1, n_tokens=100), "token_ids", list(range(100, 200)))
    assert check_trajectory(big, Limits()) is None
    view = P.decode_view(P.encode(t))  # the broker's zero-copy view checks the same
    assert check_trajectory(view, LIMITS) is None


async def test_bad_trajectories_are_refused_alone_and_counted(tmp_path: Path) -> None:
    """vocab from the model's config.json, [actor] max_model_len, the relayed policy: a batch
    of good and bad trajectories gets one Ack naming each refusal; the good ones are stored."""
    model = tmp_path / "no-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"vocab_size": VOCAB}))

    def refused(reason: str) -> float:
        labels = {"reason": reason}
        value = REGISTRY.get_sample_value("headrace_broker_trajectories_rejected_total", labels)
        return value or 0.0

    async with running(config(tmp_path, durability="none", max_model_len=64)) as (_, client):
        actor, learner = client("a"), client("l")
        manifest = P.WeightManifest(
            version=5,
            total_bytes=8,
            chunk_bytes=8,
            chunk_digests=["ab"],
            tensors=[],
            digest="ab",
        )
        pub = P.PolicyPublished(version=5, weights_endpoint="tcp://w:1", manifest=manifest)
        await learner.send(pub)
        assert (await status(learner))["policy_version"] == 5
        before = {r: refused(r) for r in ("token_id", "policy_version", "too_long")}
        good = [make_traj("g", 0, version=6), make_traj("g", 1, version=4)]
        bad = [
            with_array(make_traj("b", 0), "token_ids", [7] * 7 + [VOCAB]),
            make_traj("b", 1, version=7),  # 5 relayed, + 1 that may not be saved yet
            make_traj("b", 2, n_tokens=65),
        ]
        ack = await actor.request(P.TrajectoryBatch(items=[bad[0], *good, *bad[1:]]), P.Ack)
        assert ack.traj_ids == ["g-0", "g-1"]
        got = {r.traj_id: r.reason for r in ack.rejected}
        assert got == {"b-0": "token_id", "b-1": "policy_version", "b-2": "too_long"}
        assert all(r.detail.startswith(r.traj_id) for r in ack.rejected)
        assert {r: refused(r) - before[r] for r in before} == dict.fromkeys(before, 1.0)
        info = await status(actor)
        assert info["stored_trajectories"] == 2 and info["replay_size"] == 2
        # all refused: an Ack with no traj_ids, nothing stored
        ack = await actor.request(P.TrajectoryBatch(items=bad[:1]), P.Ack)
        assert ack.traj_ids == [] and [r.traj_id for r in ack.rejected] == ["b-0"]


def test_the_outbox_drops_refused_trajectories_and_keeps_the_rest() -> None:
    from actor.outbox import Outbox

    class NoClient:
        def on(self, kind: type, fn: object) -> None:
            self.handler = fn

    client = NoClient()
    box = Outbox(client)  # type: ignore[arg-type]
    for i in range(3):
        box.put(make_traj("g", i))
    before = REGISTRY.get_sample_value(
        "headrace_actor_trajectories_rejected_total", {"reason": "token_id"}
    )
    client.handler(P.Ack(traj_ids=["g-0"], rejected=[P.Rejected("g-1", "token_id", "x")]))
    assert len(box) == 1  # g-2 still waits for its ack
    after = REGISTRY.get_sample_value(
        "headrace_actor_trajectories_rejected_total", {"reason": "token_id"}
    )
    assert (after or 0) - (before or 0) == 1
    assert np.isfinite(after)


async def test_feedback_that_would_poison_the_curator_is_refused(tmp_path: Path) -> None:
    assert check_feedback(P.TaskFeedback("t", mean_abs_advantage=0.3, pass_rate=0.5)) is None
    for fb in (
        P.TaskFeedback("t", mean_abs_advantage=math.nan),
        P.TaskFeedback("t", mean_abs_advantage=-1.0),
        P.TaskFeedback("t", pass_rate=math.inf),
        P.TaskFeedback("t", pass_rate=math.nan),
    ):
        bad = check_feedback(fb)
        assert bad is not None and bad.reason == "feedback", fb

    async with running(config(tmp_path, durability="none")) as (broker, client):
        learner = client("l")
        with pytest.raises(P.ProtocolError, match="invalid"):
            await learner.request(P.TaskFeedback("t", pass_rate=math.nan), P.Ack)
        # the curator still picks tasks: every arm's score is finite
        grant = await client("a").request(P.TaskRequest(n=2), P.TaskGrant)
        assert len(grant.leases) == 2


async def test_feedback_for_unknown_tasks_and_oversized_heartbeat_stats_are_not_kept(
    tmp_path: Path,
) -> None:
    async with running(config(tmp_path, durability="none")) as (broker, client):
        learner, actor = client("l"), client("a")
        with pytest.raises(P.ProtocolError, match="no such task"):
            await learner.request(P.TaskFeedback("no-such-task-1", pass_rate=0.5), P.Ack)
        known = broker.bank.task_id_at(0)
        await learner.send(P.TaskFeedback(known, pass_rate=0.5))
        hello = P.Hello(role="actor", peer_id="a", protocol_version=P.PROTOCOL_VERSION)
        await actor.request(hello, P.Welcome)
        await actor.send(P.Heartbeat("a", stats={"episodes_running": 3.0}))
        info = await status(actor)
        assert [a["stats"] for a in info["actors"]] == [{"episodes_running": 3.0}]
        await actor.send(P.Heartbeat("a", stats={f"k{i}": 1.0 for i in range(1000)}))
        info = await status(actor)
        assert [a["stats"] for a in info["actors"]] == [{}]
        assert list(broker.bank.feedback_by_task) == [known]


def test_screen_sorts_a_batch_without_sockets() -> None:
    """Good frames go on; a frame that fails to decode is named when its traj_id can still be
    read, and reported as an Error when not."""
    from broker.intake import screen

    good = msgspec.Raw(P.encode(make_traj("g", 0)))
    undecodable_named = msgspec.Raw(
        msgspec.msgpack.encode({"type": "Trajectory", "traj_id": "x-1", "junk": 1})
    )
    garbage = msgspec.Raw(b"\xc1")
    got = screen([good, undecodable_named, garbage], LIMITS, "a")
    assert [i.view.traj_id for i in got.items] == ["g-0"]
    assert [r.traj_id for r in got.rejected] == ["x-1"]
    assert len(got.errors) == 1 and got.errors[0].reason == "malformed"


def test_a_batch_is_judged_as_each_of_its_trajectories_alone() -> None:
    """check_batch checks the per-token arrays of a whole batch at once; whatever the mix of
    good and bad (and empty) trajectories, each gets the answer check_trajectory gives it."""
    from shared.validation import check_batch

    good = [make_traj("g", i, version=i % 3, n_tokens=8 + i) for i in range(4)]
    empty = msgspec.structs.replace(
        good[0], **{name: b"" for name in P.TOKEN_ARRAYS}, traj_id="empty"
    )
    # a step down from one trajectory to the next is no defect: each is checked on its own
    rising = with_array(make_traj("g", 7, n_tokens=8), "policy_version", [5] * 8)
    falling = with_array(make_traj("g", 8, n_tokens=8), "policy_version", [0] * 8)
    views = [P.decode_view(P.encode(t)) for t in [*good, empty, rising, falling]]
    assert check_batch(views, LIMITS) == [None] * len(views)
    assert check_batch([], LIMITS) == []
    for case, bad in defects().items():
        for at in range(len(good) + 1):
            batch = [*good[:at], bad, *good[at:]]
            got = check_batch(batch, LIMITS)
            assert got == [check_trajectory(t, LIMITS) for t in batch], case
            assert got[at] is not None and got[at].reason == case.split(" ")[0]

"""The learner process loop against an in-process fake broker (no actors, no real broker)."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import msgspec
import pytest
import torch
from safetensors.torch import load as st_load

from learner.__main__ import main
from learner.checkpoint import latest
from learner.loop import Learner, LearnerExit, Options, run_learner
from learner.trained_log import TrainedLog
from learner.trained_log import read as read_trained_log
from shared import protocol as P
from shared.config import Config
from shared.synthetic import synthetic_batch
from shared.transport import Client, Server
from shared.weights import fetch_blob as fetch_weights


class FakeBroker:
    """Answers Hello and SampleRequest (NotReady first, then synthetic batches); records."""

    def __init__(
        self, group_size: int, repeat_first: bool = False, fence_after: int | None = None
    ) -> None:
        self.server = Server("tcp://127.0.0.1:0")
        self.group_size = group_size
        self.received: list[P.Message] = []
        self.n_batches = 0
        self.repeat_first = repeat_first  # hand batch 1 again on the next request
        self.fence_after = fence_after  # refuse as "forbidden" after this many batches
        self.refuse_hellos = 0  # answer this many Hellos "another learner is active"
        self.offer_first: P.Batch | None = None  # sent for the first SampleRequest
        self.first: P.Batch | None = None
        self.run_id = "r"  # Welcome's and Status's

    async def serve(self) -> None:
        while True:
            ident, msg = await self.server.recv()
            self.received.append(msg)
            if isinstance(msg, P.Status):  # a learner with a checkpoint asks for the run id
                await self.server.send(ident, P.StatusReply(info={"run_id": self.run_id}))
            elif isinstance(msg, P.Hello) and self.refuse_hellos > 0:
                self.refuse_hellos -= 1
                detail = "learner x is active (heard 1s ago): one learner per run"
                await self.server.send(ident, P.Error(reason="forbidden", detail=detail))
            elif isinstance(msg, P.Hello):
                await self.server.send(
                    ident,
                    P.Welcome(
                        run_id=self.run_id, policy_version=0, weights_endpoint="", config_digest=""
                    ),
                )
            elif isinstance(msg, P.SampleRequest) and self.n_batches == self.fence_after:
                await self.server.send(ident, P.Error(reason="forbidden", detail="fenced"))
            elif isinstance(msg, P.SampleRequest):
                if self.n_batches == 0 and not any(
                    isinstance(m, P.NotReady) for m in self.received
                ):
                    self.received.append(P.NotReady(replay_size=0, retry_after_s=0.05))
                    await self.server.send(ident, P.NotReady(replay_size=0, retry_after_s=0.05))
                    continue
                if self.offer_first is not None:  # e.g. a batch a crash kept unacknowledged
                    batch, self.offer_first = self.offer_first, None
                    await self.server.send(ident, batch)
                    continue
                if self.repeat_first and self.n_batches == 1 and self.first is not None:
                    self.repeat_first = False
                    await self.server.send(ident, self.first)
                    continue
                n_groups = msg.batch_size // self.group_size
                items = synthetic_batch(
                    n_groups, self.group_size, 16, seed=self.n_batches, prefix=f"b{self.n_batches}"
                )
                base = 100 * self.n_batches
                self.n_batches += 1
                batch = P.Batch(
                    items=items,
                    sample_ids=[base + i for i in range(len(items))],
                    is_weights=[1.0] * len(items),
                    cursor=base + len(items),
                    batch_id=self.n_batches,
                )
                self.first = self.first or batch
                await self.server.send(ident, batch)

    def of(self, kind: type) -> list:
        return [m for m in self.received if isinstance(m, kind)]


def _config(tmp: Path) -> Config:
    cfg = Config()
    cfg.model.path = str(tmp / "model")
    cfg.model.build_tiny_if_missing = True
    cfg.broker.group_size = 2
    cfg.learner.batch_groups = 2
    cfg.learner.checkpoint_every = 2
    cfg.learner.connect_timeout_s = 5.0
    return cfg


async def _run(cfg: Config, opts: Options, broker: FakeBroker) -> tuple[int, list[P.Message]]:
    serve = asyncio.create_task(broker.serve())
    try:
        code = await asyncio.wait_for(run_learner(cfg, opts), 60)
    finally:
        serve.cancel()
    return code, broker.received


async def test_train_publish_checkpoint_resume(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    broker = FakeBroker(group_size=2)
    opts = Options(
        broker=broker.server.endpoint,
        steps=3,
        checkpoint_dir=tmp_path / "ckpt",
        weights_port=0,
        summary_json=tmp_path / "summary.json",
        progress=False,
    )
    code, _ = await _run(cfg, opts, broker)
    assert code == 0
    steps = json.loads(opts.summary_json.read_text())["steps"]
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert [s["policy_version"] for s in steps] == [1, 2, 3]
    assert all(
        {"reward_mean", "loss", "ess", "clip_fraction", "kl_behaviour"} <= set(s) for s in steps
    )
    assert [m.version for m in broker.of(P.PolicyPublished)] == [0, 1, 2, 3]
    assert broker.of(P.Hello)[0].role == "learner"
    assert len(broker.of(P.TaskFeedback)) == 3 * 2  # one per task (group) per step
    assert broker.of(P.PriorityUpdate)[0].sample_ids == [0, 1, 2, 3]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "step_000002",
        "step_000003",
        "tb",  # the tracking directory ([logging] dir, learner/tracking/)
        "trained.jsonl",
    ]
    assert (tmp_path / "model" / "config.json").is_file()  # built because it was missing
    # each batch acknowledged by the step that trained it; each checkpoint announced
    assert [(m.batch_id, m.step) for m in broker.of(P.BatchTrained)] == [(1, 1), (2, 2), (3, 3)]
    assert [m.step for m in broker.of(P.Checkpointed)] == [2, 3]
    log = list(read_trained_log(tmp_path / "ckpt" / "trained.jsonl"))
    assert [(e["step"], e["batch_id"]) for e in log] == [(1, 1), (2, 2), (3, 3)]
    assert log[0]["traj_ids"] == [t.traj_id for t in broker.first.items]  # type: ignore[union-attr]

    # Resume: continues at step 3 / v3 and trains one more step. The new broker first offers
    # batch 3 again (a broker crash took its acknowledgement): the checkpoint holds it, so it
    # is acknowledged with the step that trained it, not trained a second time.
    broker2 = FakeBroker(group_size=2)
    broker2.n_batches = 3  # its next new batch is id 4
    broker2.offer_first = broker.first and msgspec.structs.replace(broker.first, batch_id=3)
    opts.broker = broker2.server.endpoint
    opts.steps = 4
    code, _ = await _run(cfg, opts, broker2)
    assert code == 0
    assert broker2.of(P.Hello)[0].capabilities["policy_version"] == "3"
    assert broker2.of(P.Hello)[0].capabilities["step"] == "3"  # what the broker re-offers after
    assert [m.version for m in broker2.of(P.PolicyPublished)] == [3, 4]
    steps = json.loads(opts.summary_json.read_text())["steps"]
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    assert latest(tmp_path / "ckpt").name == "step_000004"
    assert [(m.batch_id, m.step) for m in broker2.of(P.BatchTrained)] == [(3, 3), (4, 4)]
    log = list(read_trained_log(tmp_path / "ckpt" / "trained.jsonl"))
    assert [(e["step"], e["batch_id"]) for e in log] == [(1, 1), (2, 2), (3, 3), (4, 4)]


async def test_a_batch_handed_again_is_acknowledged_again_not_retrained(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    broker = FakeBroker(group_size=2, repeat_first=True)
    opts = Options(
        broker=broker.server.endpoint, steps=2, checkpoint_dir=tmp_path / "c", weights_port=0
    )
    code, _ = await _run(cfg, opts, broker)
    assert code == 0
    acks = [(m.batch_id, m.step) for m in broker.of(P.BatchTrained)]
    assert acks == [(1, 1), (1, 1), (2, 2)]
    log = list(read_trained_log(tmp_path / "c" / "trained.jsonl"))
    assert [(e["step"], e["batch_id"]) for e in log] == [(1, 1), (2, 2)]


async def test_a_fenced_learner_exits_without_checkpointing(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    cfg.broker.heartbeat_timeout_s = 0.4  # heartbeats every 0.5 s
    cfg.learner.checkpoint_every = 100
    broker = FakeBroker(group_size=2, fence_after=2)
    opts = Options(
        broker=broker.server.endpoint, steps=10, checkpoint_dir=tmp_path / "c", weights_port=0
    )
    with pytest.raises(LearnerExit) as e:
        await _run(cfg, opts, broker)
    assert e.value.code == 5 and "refused this learner" in str(e.value)
    assert latest(tmp_path / "c") is None  # another learner owns the run now
    assert broker.of(P.Heartbeat) and broker.of(P.Heartbeat)[0].peer_id.startswith("learner")


def test_trained_log_is_cut_back_to_the_step_a_learner_resumes_from(tmp_path: Path) -> None:
    log = TrainedLog(tmp_path, resume_step=0)
    for step in range(1, 6):
        log.append(step, step + 10, [f"t{step}"])
    log.close()
    with open(tmp_path / "trained.jsonl", "a") as f:
        f.write('{"step": 6, "batch')  # torn by a crash
    log = TrainedLog(tmp_path, resume_step=3)  # the checkpoint it resumed from
    log.append(4, 20, ["t4b"])
    log.close()
    got = [(e["step"], e["batch_id"]) for e in read_trained_log(tmp_path / "trained.jsonl")]
    assert got == [(1, 11), (2, 12), (3, 13), (4, 20)]


async def _fetch_during_run(tmp_path: Path) -> None:
    """An actor-like client fetches the published weights while the learner is live."""
    cfg = _config(tmp_path)
    cfg.learner.checkpoint_every = 100
    broker = FakeBroker(group_size=2)
    opts = Options(
        broker=broker.server.endpoint, steps=1, checkpoint_dir=tmp_path / "c", weights_port=0
    )
    serve = asyncio.create_task(broker.serve())
    learner = asyncio.create_task(run_learner(cfg, opts))
    while not broker.of(P.PolicyPublished):
        await asyncio.sleep(0.05)
    pub = broker.of(P.PolicyPublished)[0]
    client = Client(pub.weights_endpoint, peer_id="fake-actor")
    blob = await fetch_weights(client, pub.manifest)
    client.close()
    sd = st_load(blob)
    assert sd["lm_head.weight"].shape == (256, 64) and sd["lm_head.weight"].dtype == torch.float32
    assert await asyncio.wait_for(learner, 60) == 0
    serve.cancel()


async def test_weights_fetchable_while_running(tmp_path: Path) -> None:
    await _fetch_during_run(tmp_path)


async def test_no_broker_exits_with_reason(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    cfg.learner.connect_timeout_s = 1.0
    opts = Options(
        broker="tcp://127.0.0.1:1", steps=1, checkpoint_dir=tmp_path / "c", weights_port=0
    )
    with pytest.raises(LearnerExit) as e:
        await run_learner(cfg, opts)
    assert e.value.code == 3 and "did not answer Hello" in str(e.value)


async def _stop_mid_run(tmp_path: Path) -> tuple[int, Learner]:
    cfg = _config(tmp_path)
    cfg.learner.checkpoint_every = 100
    broker = FakeBroker(group_size=2)
    opts = Options(
        broker=broker.server.endpoint, steps=1000, checkpoint_dir=tmp_path / "c", weights_port=0
    )
    serve = asyncio.create_task(broker.serve())
    learner = Learner(cfg, opts)
    run = asyncio.create_task(learner.run())
    while learner.step < 2:
        await asyncio.sleep(0.01)
    learner.stop.set()  # what the SIGTERM/SIGINT handler does
    code = await asyncio.wait_for(run, 30)
    serve.cancel()
    return code, learner


async def test_stop_request_checkpoints_and_exits_zero(tmp_path: Path) -> None:
    code, learner = await _stop_mid_run(tmp_path)
    assert code == 0 and 2 <= learner.step < 1000
    assert latest(tmp_path / "c").name == f"step_{learner.step:06d}"


def test_cli_no_broker_one_line_reason(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(
        f'[model]\npath = "{tmp_path / "m"}"\nbuild_tiny_if_missing = true\n'
        "[learner]\nconnect_timeout_s = 0.5\n"
    )
    argv = ["--config", str(cfg), "--broker", "tcp://127.0.0.1:1", "--metrics-port", "0"]
    argv += ["--weights-port", "0", "--checkpoint-dir", str(tmp_path / "c")]
    assert main(argv) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("headrace-learner: broker tcp://127.0.0.1:1 did not answer")
    assert main(["--config", str(tmp_path / "missing.toml")]) == 2


async def test_warmup_entropy_and_monitor_across_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The lr warm-up continues where the checkpoint left it; the per-role entropy and the
    ActFocus monitor reach the summary, the metrics and the per-step log line."""
    from prometheus_client import REGISTRY

    cfg = _config(tmp_path)
    cfg.learner.warmup_steps = 8
    opts = Options(
        broker="",
        steps=3,
        checkpoint_dir=tmp_path / "ckpt",
        weights_port=0,
        summary_json=tmp_path / "summary.json",
        progress=False,
    )
    caplog.set_level(logging.INFO, logger="learner")
    for steps in (3, 5):  # the second run resumes from step 3's checkpoint
        broker = FakeBroker(group_size=2)
        opts.broker, opts.steps = broker.server.endpoint, steps
        assert (await _run(cfg, opts, broker))[0] == 0
    steps = json.loads(opts.summary_json.read_text())["steps"]
    lr = cfg.learner.lr
    assert [s["lr"] for s in steps] == pytest.approx([k * lr / 8 for k in range(1, 6)])
    for s in steps:
        assert s["entropy_action"] > 0 and s["monitor_groups"] == 2
        assert -1 <= s["monitor_corr_action"] <= 1 and s["entropy_bonus"] == 0
    assert REGISTRY.get_sample_value("headrace_learner_lr") == pytest.approx(5 * lr / 8)
    h = REGISTRY.get_sample_value("headrace_learner_entropy", {"role": "action"})
    assert h == pytest.approx(steps[-1]["entropy_action"])
    assert any(" H act " in r.getMessage() for r in caplog.records)


async def test_a_restarted_learner_waits_for_its_dead_predecessor_to_go_silent(
    tmp_path: Path,
) -> None:
    cfg = _config(tmp_path)
    broker = FakeBroker(group_size=2)
    broker.refuse_hellos = 2  # the broker still hears the dead learner for 2 s
    opts = Options(
        broker=broker.server.endpoint, steps=1, checkpoint_dir=tmp_path / "c", weights_port=0
    )
    code, _ = await _run(cfg, opts, broker)
    assert code == 0 and len(broker.of(P.Hello)) == 3
    cfg.learner.connect_timeout_s = 1.0  # a live learner next to it: refused for good
    broker = FakeBroker(group_size=2)
    broker.refuse_hellos = 100
    opts.broker = broker.server.endpoint
    with pytest.raises(LearnerExit) as e:
        await _run(cfg, opts, broker)
    assert e.value.code == 3 and "is active" in str(e.value)

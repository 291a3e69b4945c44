"""Resume on purpose (learner/resume.py): a checkpoint of another run is never resumed silently."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from learner.checkpoint import latest
from learner.loop import LearnerExit, Options
from learner.resume import Refused, RunIdentity, choose, config_digest, decide, recorded
from shared import protocol as P
from shared.config import Config
from tests.unit.learner.test_learner_loop import FakeBroker, _config, _run

OURS = RunIdentity("20261130-120000-aaaaaa", "d1")


def _fake_checkpoint(root: Path, step: int, ident: RunIdentity | None) -> Path:
    """A checkpoint dir as far as the choice is concerned: its state.json."""
    d = root / f"step_{step:06d}"
    d.mkdir(parents=True)
    extra = ident.extra() if ident is not None else {}
    (d / "state.json").write_text(json.dumps({"step": step, "extra": extra}))
    return d


def test_the_same_run_resumes_its_newest_checkpoint(tmp_path: Path) -> None:
    _fake_checkpoint(tmp_path, 2, OURS)
    newest = _fake_checkpoint(tmp_path, 4, OURS)
    assert recorded(newest) == OURS
    assert decide(tmp_path, None, OURS) == newest


@pytest.mark.parametrize(
    ("theirs", "why"),
    [
        (RunIdentity("20261129-090000-bbbbbb", "d1"), "broker run 20261129-090000-bbbbbb"),
        (RunIdentity(OURS.run_id, "d0"), "config digest d0"),
        (None, "records no run identity"),
    ],
)
def test_another_runs_checkpoint_is_refused_in_one_line(
    tmp_path: Path, theirs: RunIdentity | None, why: str
) -> None:
    ckpt = _fake_checkpoint(tmp_path, 30, theirs)
    with pytest.raises(Refused) as e:
        decide(tmp_path, None, OURS)
    msg = str(e.value)
    assert e.value.code == 2 and "\n" not in msg
    assert str(ckpt) in msg and why in msg and "--resume" in msg and "--fresh" in msg
    assert latest(tmp_path) == ckpt  # nothing moved or deleted


def test_resume_takes_another_runs_checkpoint_anyway(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ckpt = _fake_checkpoint(tmp_path, 30, RunIdentity("old", "d0"))
    with caplog.at_level(logging.WARNING, logger="learner"):
        assert decide(tmp_path, "resume", None) == ckpt
    assert "run old" in caplog.text


def test_fresh_moves_the_checkpoint_dir_aside_and_says_where(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "learner"
    _fake_checkpoint(root, 30, RunIdentity("old", "d0"))
    (root / "trained.jsonl").write_text('{"step": 1}\n')
    with caplog.at_level(logging.INFO, logger="learner"):
        assert decide(root, "fresh", OURS) is None
    assert list(root.iterdir()) == []
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("learner.aside-")]
    assert sorted(p.name for p in aside.iterdir()) == ["step_000030", "trained.jsonl"]
    assert str(aside) in caplog.text


async def test_nothing_to_resume_needs_no_broker(tmp_path: Path) -> None:
    """No checkpoint: the broker is not asked (this endpoint has nobody behind it)."""
    cfg = Config()
    cfg.learner.connect_timeout_s = 0.2
    choice = await choose(cfg, tmp_path / "none", None, "tcp://127.0.0.1:9", "x")
    assert choice.checkpoint is None
    _fake_checkpoint(tmp_path / "c", 1, OURS)
    with pytest.raises(Refused) as e:  # a checkpoint: the run id is needed
        await choose(cfg, tmp_path / "c", None, "tcp://127.0.0.1:9", "x")
    assert e.value.code == 3


def test_the_digest_covers_what_is_trained_not_how_the_run_is_operated() -> None:
    base = config_digest(Config())
    cfg = Config()
    cfg.learner.steps, cfg.learner.checkpoint_dir, cfg.learner.metrics_port = 999, "/x", 1
    cfg.learner.keep_checkpoints, cfg.model.build_tiny_if_missing = 1, True
    cfg.broker.port = 7000
    assert config_digest(cfg) == base
    for change in (
        lambda c: setattr(c.learner, "lr", 0.5),
        lambda c: setattr(c.env.symbols, "levels", [7]),
        lambda c: setattr(c.model, "path", "/other"),
        lambda c: setattr(c.learner.lora, "rank", 4),
    ):
        cfg = Config()
        change(cfg)
        assert config_digest(cfg) != base


def test_headrace_run_resume_and_fresh_are_exclusive(capsys: pytest.CaptureFixture) -> None:
    from shared.cli import main

    with pytest.raises(SystemExit) as e:
        main(["run", "--resume", "--fresh"])
    assert e.value.code == 2 and "not allowed with" in capsys.readouterr().err


async def test_a_learner_keeps_its_checkpoints_and_judges_them_by_run(tmp_path: Path) -> None:
    """keep_checkpoints prunes; a new broker's run refuses the old checkpoint (exit 2, before
    any Hello); --fresh starts over; a restart in that run resumes; --resume takes any."""
    cfg = _config(tmp_path)
    cfg.learner.checkpoint_every, cfg.learner.keep_checkpoints = 1, 1
    root = tmp_path / "ckpt"
    opts = Options(broker="", steps=2, checkpoint_dir=root, weights_port=0, progress=False)

    async def run(run_id: str, steps: int, mode: str | None = None) -> FakeBroker:
        broker = FakeBroker(group_size=2)
        broker.run_id = run_id
        opts.broker, opts.steps, opts.resume = broker.server.endpoint, steps, mode
        assert (await _run(cfg, opts, broker))[0] == 0
        return broker

    first = await run("run-a", 2)
    assert [p.name for p in root.iterdir() if p.name.startswith("step_")] == ["step_000002"]
    assert recorded(root / "step_000002") == RunIdentity("run-a", config_digest(cfg))
    assert not first.of(P.Status)  # nothing to resume: the broker was not asked

    broker = FakeBroker(group_size=2)
    broker.run_id = "run-b"
    opts.broker, opts.steps = broker.server.endpoint, 3
    with pytest.raises(LearnerExit) as e:
        await _run(cfg, opts, broker)
    assert e.value.code == 2 and "run-a" in str(e.value) and "--fresh" in str(e.value)
    assert broker.of(P.Status) and not broker.of(P.Hello)

    fresh = await run("run-b", 1, "fresh")
    assert fresh.of(P.Hello)[0].capabilities["step"] == "0"
    (aside,) = tmp_path.glob("ckpt.aside-*")
    assert (aside / "step_000002").is_dir()
    assert recorded(latest(root)) == RunIdentity("run-b", config_digest(cfg))

    again = await run("run-b", 2)  # a restart of the same run: resumed without a flag
    assert again.of(P.Hello)[0].capabilities["step"] == "1"
    assert [p.name for p in root.iterdir() if p.name.startswith("step_")] == ["step_000002"]

    cfg.learner.lr *= 2  # another config: refused, unless --resume
    with pytest.raises(LearnerExit, match="config digest"):
        await run("run-b", 3)
    anyway = await run("run-b", 3, "resume")
    assert anyway.of(P.Hello)[0].capabilities["step"] == "2"
    assert recorded(latest(root)) == RunIdentity("run-b", config_digest(cfg))


def _agree_on_rank(rank: int, init: str, choices: list[str | None], out: str) -> None:
    import torch.distributed as dist

    from learner.resume import agree

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        got = [agree(Path(c) if rank == 0 and c is not None else None) for c in choices]
        Path(f"{out}.{rank}").write_text(json.dumps([None if g is None else str(g) for g in got]))
    finally:
        dist.destroy_process_group()


def test_followers_load_what_rank_0_chose(tmp_path: Path) -> None:
    """Under torchrun rank 0 decides; the other ranks must load the same checkpoint (or none)."""
    import torch.multiprocessing as mp

    choices = ["/runs/learner/step_000004", None]
    init, out = f"file://{tmp_path / 'store'}", str(tmp_path / "got")
    mp.spawn(_agree_on_rank, args=(init, choices, out), nprocs=2, join=True)
    for rank in (0, 1):
        assert json.loads(Path(f"{out}.{rank}").read_text()) == choices

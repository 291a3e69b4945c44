"""Experiment tracking (learner/tracking/), `headrace plot` (learner/plot.py) and the closing
summary a run ends with (learner/console.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from learner.console import closing_summary, window
from learner.loop import Options
from learner.plot import main as plot_main
from learner.tracking import build_tracker, require_backends
from learner.tracking.base import Completion
from learner.tracking.completions import Decoder, sample_completions, task_family
from learner.tracking.step import StepTracker
from learner.tracking.tags import scalar_tags
from shared.config import ConfigError, load_config
from shared.logging_config import LoggingConfig
from shared.synthetic import synthetic_batch
from tests.unit.learner.test_learner_loop import FakeBroker, _config, _run

# A step entry as the learner's summary has it (learner/loop.py), the keys tags care about.
ENTRY = {
    "step": 3,
    "reward_mean": 0.5,
    "pass_rate": 0.25,
    "policy_version": 3,
    "loss": -0.01,
    "lr": 1e-3,
    "entropy_action": 1.2,
    "entropy_reasoning": 2.3,
    "entropy_mean": 2.0,
    "ess": 0.97,
    "kl_behaviour": 0.001,
    "staleness_mean": 0.5,
    "staleness_max": 1.0,
    "token_staleness_mean": 0.4,
    "token_staleness_max": 1.0,
    "n_tokens": 400.0,
    "n_trajectories": 8.0,
    "step_seconds": 1.5,
    "wait_seconds": 0.5,
    "monitor_corr_action": None,  # nan in the summary JSON
    "time": 1.7e9,
}
TB_TAGS = {
    "train/reward_mean",
    "train/pass_rate",
    "train/loss",
    "entropy/action",
    "entropy/reasoning",
    "entropy/all",
    "offpolicy/ess",
    "offpolicy/kl_behaviour",
    "staleness/trajectory_mean",
    "staleness/token_mean",
    "throughput/tokens_per_s",
    "throughput/trajectories_per_s",
    "throughput/step_seconds",
    "eval/pass_at_1",
}


def _completions(step: int) -> list[Completion]:
    return [
        Completion(step, "sym-L5-7", "L5", 1.0, True, "think a | b", "prompt"),
        Completion(step, "sym-L5-9", "L5", 0.0, False, "think c", "prompt"),
    ]


def test_scalar_tags_name_every_metric_of_a_step() -> None:
    tags = scalar_tags(ENTRY)
    assert TB_TAGS - {"eval/pass_at_1"} <= set(tags)
    assert tags["throughput/tokens_per_s"] == pytest.approx(400 / 2.0)
    assert tags["diag/monitor_corr_action"] != tags["diag/monitor_corr_action"]  # NaN
    assert "time" not in str(tags) and "step" not in tags


def test_fan_out_writes_tensorboard_events_and_jsonl(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tracker = build_tracker(LoggingConfig(), tmp_path / "tb")  # default: tensorboard + jsonl
    assert [type(b).__name__ for b in tracker.backends] == ["TensorBoardTracker", "JsonlTracker"]
    for step in (1, 2, 3):
        tracker.scalars(step, scalar_tags({**ENTRY, "step": step, "reward_mean": step / 10}))
        tracker.completions(step, _completions(step))
    tracker.scalars(3, {"eval/pass_at_1": 0.42})  # what the learner's evaluation adds
    tracker.close()

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert TB_TAGS <= set(acc.Tags()["scalars"])
    rewards = acc.Scalars("train/reward_mean")
    assert [(e.step, round(e.value, 6)) for e in rewards] == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert acc.Scalars("eval/pass_at_1")[0].value == pytest.approx(0.42)
    assert any(t.startswith("completions") for t in acc.Tags()["tensors"])

    lines = [json.loads(s) for s in (tmp_path / "tb" / "scalars.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 3]
    assert lines[0]["train/reward_mean"] == 0.1 and lines[0]["diag/monitor_corr_action"] is None
    assert lines[-1] == {"step": 3, "eval/pass_at_1": 0.42}
    comp = [json.loads(s) for s in (tmp_path / "tb" / "completions.jsonl").read_text().splitlines()]
    assert len(comp) == 6
    assert comp[0] == {
        "step": 1,
        "task_id": "sym-L5-7",
        "family": "L5",
        "reward": 1.0,
        "success": True,
        "text": "think a | b",
        "prompt": "prompt",
    }


def test_a_resumed_run_drops_what_was_recorded_after_its_checkpoint(tmp_path: Path) -> None:
    cfg = LoggingConfig(backends=["jsonl"])
    tracker = build_tracker(cfg, tmp_path)
    for step in (1, 2, 3, 4):
        tracker.scalars(step, {"train/reward_mean": float(step)})
        tracker.completions(step, _completions(step))
    tracker.close()
    tracker = build_tracker(cfg, tmp_path, resume_step=2)
    tracker.scalars(3, {"train/reward_mean": 30.0})
    tracker.close()
    lines = [json.loads(s) for s in (tmp_path / "scalars.jsonl").read_text().splitlines()]
    assert [(r["step"], r["train/reward_mean"]) for r in lines] == [(1, 1), (2, 2), (3, 30)]
    text = (tmp_path / "completions.jsonl").read_text()
    comp = [json.loads(s)["step"] for s in text.splitlines()]
    assert comp == [1, 1, 2, 2]


def test_unknown_backend_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text('[logging]\nbackends = ["tensorboard", "comet"]\n')
    with pytest.raises(ConfigError, match="backends must be one of .*not .comet."):
        load_config(tmp_path / "c.toml")
    with pytest.raises(ConfigError, match="unknown backend 'comet'"):
        require_backends(["comet"])


@pytest.mark.parametrize("backend", ["wandb", "mlflow", "trackio", "tensorboard"])
def test_a_backend_not_installed_names_its_pip_package(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, backend, None)  # importing it now fails, installed or not
    with pytest.raises(ConfigError, match=f"pip install {backend}"):
        build_tracker(LoggingConfig(backends=["jsonl", backend]), tmp_path / "t")
    assert not (tmp_path / "t" / "scalars.jsonl").exists()  # nothing opened before the check


def test_completions_decode_the_generated_tokens(tiny_model: Path) -> None:
    items = synthetic_batch(2, 4, 6, seed=0, prefix="b0")
    decode = Decoder(str(tiny_model))
    got = sample_completions(items, 3, step=7, decode=decode)
    assert len(got) == 3 and all(c.step == 7 for c in got)
    assert [c.reward for c in got] == sorted((c.reward for c in got), reverse=True)
    assert all(c.text and not c.text.replace(" ", "").isdigit() for c in got)  # words, not ids
    assert sample_completions(items, 3, step=7, decode=decode) == got  # the step seeds the draw
    assert Decoder(str(tiny_model / "missing"))([5, 6]) == "5 6"  # no tokenizer: the ids
    assert task_family("sym-L5-12", "symbols") == "L5"
    assert task_family("rg-chain_sum-easy-3", "reasoning_gym") == "chain_sum-easy"
    assert task_family("adhoc", "symbols") == "symbols"


def test_a_tracker_without_backends_records_nothing(tmp_path: Path) -> None:
    t = StepTracker()
    t.record_step(ENTRY, synthetic_batch(1, 2, 4, seed=0, prefix="x"))
    t.scalars(1, {"eval/pass_at_1": 1.0})
    assert t.viewers() == []
    t.close()


def _summary(n: int) -> dict:
    steps = [
        {
            **ENTRY,
            "step": i,
            "policy_version": i,
            "reward_mean": 0.25 + 0.7 * i / n,
            "pass_rate": 0.1 + 0.8 * i / n,
        }
        for i in range(1, n + 1)
    ]
    evals = [{"step": 10, "policy_version": 10, "pass_at_1": 0.3, "pass_at_k": 0.6, "k": 4}]
    return {"steps": steps, "evals": evals}


def _is_png(p: Path) -> bool:
    return p.stat().st_size > 1000 and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_writes_pngs_from_a_summary(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "summary.json"
    src.write_text(json.dumps(_summary(20)))
    assert plot_main([str(src), "--out", str(tmp_path / "png")]) == 0
    names = {"reward.png", "pass_rate.png", "entropy.png", "eval.png"}
    assert {p.name for p in (tmp_path / "png").iterdir()} == names
    assert all(_is_png(tmp_path / "png" / n) for n in names)
    assert "reward.png" in capsys.readouterr().out


def test_plot_reads_a_run_directory_and_names_what_is_missing(tmp_path: Path) -> None:
    tracker = build_tracker(LoggingConfig(backends=["jsonl"]), tmp_path / "run" / "learner" / "tb")
    for entry in _summary(6)["steps"]:
        tracker.scalars(entry["step"], scalar_tags(entry))
    tracker.close()
    assert plot_main([str(tmp_path / "run")]) == 0
    written = sorted(p.name for p in (tmp_path / "run" / "plots").iterdir())
    assert written == ["entropy.png", "pass_rate.png", "reward.png"]  # no eval in this run
    (tmp_path / "empty").mkdir()
    assert plot_main([str(tmp_path / "empty")]) == 2


def test_closing_summary_gives_first_and_last_windows_and_the_eval_command() -> None:
    steps = _summary(40)["steps"]
    text = closing_summary(
        steps,
        Path("runs/r/learner/step_000040"),
        ["--config", "ops/configs/demo.toml"],
        ["tensorboard --logdir runs/r/learner/tb"],
    )
    assert window(40) == 5 and window(120) == 12 and window(3) == 1 and window(1) == 1
    first = sum(s["reward_mean"] for s in steps[:5]) / 5
    last = sum(s["reward_mean"] for s in steps[-5:]) / 5
    lines = text.splitlines()
    assert "steps 1-5" in lines[1] and "steps 36-40" in lines[1]
    assert lines[2].split() == ["reward", f"{first:.3f}", f"{last:.3f}"]
    assert lines[3].split()[-2:] == [f"{0.1 + 0.8 * 3 / 40:.3f}", f"{0.1 + 0.8 * 38 / 40:.3f}"]
    cmd = "headrace eval --checkpoint runs/r/learner/step_000040 --config ops/configs/demo.toml"
    assert cmd in text
    assert "tensorboard --logdir runs/r/learner/tb" in text
    assert closing_summary([], None, ()) == "headrace: no step trained"
    evals = [
        {"step": 20, "pass_at_1": 0.4, "pass_at_k": 0.6, "k": 4, "mean_reward": 0.4, "n": 32},
        {"step": 40, "pass_at_1": 0.9, "pass_at_k": 1.0, "k": 4, "mean_reward": 0.9, "n": 32},
    ]
    text = closing_summary(steps, None, (), (), evals)
    assert "held-out pass@1   0.400 (step 20), 0.900 (step 40)" in text
    assert "pass@4 1.000, mean reward 0.900, 32 tasks" in text


async def test_the_learner_tracks_its_steps_and_ends_with_a_summary(
    tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    cfg = _config(tmp_path)
    cfg.logging.completions_per_step = 2
    broker = FakeBroker(group_size=2)
    opts = Options(
        broker=broker.server.endpoint,
        steps=3,
        checkpoint_dir=tmp_path / "ckpt",
        weights_port=0,
        progress=False,
        config_args=("--config", "my.toml", "--set", "learner.lr=0.01"),
    )
    code, _ = await _run(cfg, opts, broker)
    assert code == 0
    tb = tmp_path / "ckpt" / "tb"
    assert list(tb.glob("events.out.tfevents.*"))
    scalars = [json.loads(s) for s in (tb / "scalars.jsonl").read_text().splitlines()]
    assert [s["step"] for s in scalars] == [1, 2, 3]
    assert {"train/reward_mean", "train/pass_rate", "entropy/action"} <= set(scalars[0])
    comp = [json.loads(s) for s in (tb / "completions.jsonl").read_text().splitlines()]
    assert [c["step"] for c in comp] == [1, 1, 2, 2, 3, 3]
    assert all(c["text"] and c["task_id"] for c in comp)
    err = capfd.readouterr().err
    ckpt = tmp_path / "ckpt" / "step_000003"
    assert f"headrace eval --checkpoint {ckpt} --config my.toml --set learner.lr=0.01" in err
    assert "trained to step 3 (policy v3)" in err
    assert f"headrace plot {tb}" in err


def test_the_learner_refuses_a_backend_not_installed_before_loading_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from learner.__main__ import main as learner_main

    monkeypatch.setitem(sys.modules, "wandb", None)
    cfg = tmp_path / "c.toml"
    model = tmp_path / "model"
    cfg.write_text(
        f'[model]\npath = "{model}"\nbuild_tiny_if_missing = true\n'
        '[logging]\nbackends = ["tensorboard", "wandb"]\n'
    )
    assert learner_main(["--config", str(cfg), "--broker", "tcp://127.0.0.1:1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("headrace-learner: ") and "pip install wandb" in err
    assert len(err.splitlines()) == 1
    assert not model.exists()  # refused before anything was built or loaded

"""`--set SECTION.KEY=VALUE` (shared/overrides.py) and `headrace config show`."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from shared.config import Config, ConfigError, load_config


def test_values_are_typed_by_the_schema(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text('[learner]\nlr = 0.5\nsteps = 7\n[model]\npath = "/from/file"\n')
    cfg = load_config(
        p,
        [
            "learner.steps=12",  # int
            "learner.lr=1e-4",  # float
            "learner.grad_clip=2",  # an integer for a float field
            "actor.enforce_eager=false",  # bool
            "model.path=/x/y",  # a bare string
            "model.system_prompt=You are terse.",  # a bare string with spaces
            'model.chat_template="none"',  # a TOML string
            "broker.data_dir=123",  # a string field keeps digits as text
            "env.symbols.levels=[1, 2]",  # a list
            'learner.entropy_roles=["action", "reasoning"]',
            "learner.lora.rank=8",  # nested table
            "learner.correction.alert.min_ess=0.1",  # two levels down
            "learner.weighting.role_weights.reasoning=0.5",  # a key of a dict field
            'env.symbols.families=[{name = "a", level = 5, n_turns = 1}]',  # a list of tables
            "broker.replay.sampler=uniform",  # a choice (Literal) as a bare word
        ],
    )
    assert cfg.learner.steps == 12 and cfg.learner.lr == 1e-4 and cfg.learner.grad_clip == 2.0
    assert cfg.actor.enforce_eager is False
    assert cfg.model.path == "/x/y" and cfg.model.system_prompt == "You are terse."
    assert cfg.model.chat_template == "none" and cfg.broker.data_dir == "123"
    assert cfg.env.symbols.levels == [1, 2] and cfg.broker.replay.sampler == "uniform"
    assert cfg.learner.entropy_roles == ["action", "reasoning"]
    assert cfg.learner.lora.rank == 8 and cfg.learner.lora.alpha == Config().learner.lora.alpha
    assert cfg.learner.correction.alert.min_ess == 0.1
    assert cfg.learner.weighting.role_weights["reasoning"] == 0.5
    assert cfg.learner.weighting.role_weights["action"] == 1.0  # the others keep defaults
    assert [(f.name, f.level, f.n_turns) for f in cfg.env.symbols.families] == [("a", 5, 1)]
    # the file's other keys stay; the last --set of a key wins
    assert load_config(p, ["learner.steps=1", "learner.steps=2"]).learner.steps == 2
    assert load_config(p, ["learner.steps=2"]).learner.lr == 0.5


def test_without_a_file_overrides_apply_to_the_defaults() -> None:
    assert load_config(None, ["broker.group_size=4"]).broker.group_size == 4
    assert load_config(None) == Config()


def test_unknown_key_names_the_valid_keys_of_its_section() -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, ["learner.stepz=3"])
    msg = str(e.value)
    assert "learner.stepz=3" in msg and "stepz" in msg and "[learner]" in msg
    assert all(k in msg for k in ("steps", "batch_groups", "lr", "lora", "checkpoint_dir"))
    assert "\n" not in msg
    with pytest.raises(ConfigError) as e:
        load_config(None, ["learner.lora.rnk=3"])
    assert "[learner.lora]" in str(e.value) and "rank" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(None, ["lerner.steps=3"])
    assert "lerner" in str(e.value)
    assert all(s in str(e.value) for s in ("model", "env", "broker", "actor", "learner"))


def test_bad_values_and_bad_syntax_are_one_line_errors() -> None:
    with pytest.raises(ConfigError, match=r"learner\.steps=many.*not an integer"):
        load_config(None, ["learner.steps=many"])
    with pytest.raises(ConfigError, match=r"--set learner\.steps=1\.5: Expected `int`"):
        load_config(None, ["learner.steps=1.5"])
    with pytest.raises(ConfigError, match=r"actor\.enforce_eager=yes.*true or false"):
        load_config(None, ["actor.enforce_eager=yes"])
    with pytest.raises(ConfigError, match="TOML list"):
        load_config(None, ["env.symbols.levels=1,2"])
    with pytest.raises(ConfigError, match="SECTION.KEY=VALUE"):
        load_config(None, ["learner.steps"])
    with pytest.raises(ConfigError, match="not a table"):
        load_config(None, ["learner.steps.max=3"])
    # a schema check that fails because of an override names the overrides
    msg = r"--set model\.dtype=float64: dtype must be one of .*float32.*, not 'float64'"
    with pytest.raises(ConfigError, match=msg):
        load_config(None, ["model.dtype=float64"])
    # a choice inside a list names its key too
    with pytest.raises(ConfigError, match=r"entropy_roles must be one of .*not 'answer'"):
        load_config(None, ['learner.entropy_roles=["action", "answer"]'])


def test_a_moved_key_names_its_new_place(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, ['env.rg_datasets=["gcd"]'])
    assert str(e.value) == (
        '--set env.rg_datasets=["gcd"]: [env] rg_datasets moved to [env.reasoning_gym] datasets'
    )
    with pytest.raises(ConfigError, match=r"\[env\] levels moved to \[env.symbols\] levels"):
        load_config(None, ["env.levels=[1]"])
    p = tmp_path / "c.toml"
    p.write_text('[env]\nta_games = ["guess_the_number.easy"]\n')
    with pytest.raises(ConfigError, match=r"\[env\] ta_games moved to \[env.textarena\] games"):
        load_config(p)


def test_broker_flags_are_checked_by_the_section() -> None:
    from broker.__main__ import build_config
    from broker.__main__ import parse_args as broker_args

    with pytest.raises(ConfigError, match="broker: port 70000 is not a port"):
        build_config(broker_args(["--port", "70000"]))
    with pytest.raises(ConfigError, match=r"--set broker\.group_size=0: .*group_size must be >= 1"):
        build_config(broker_args(["--set", "broker.group_size=0"]))


def _show(capsys: pytest.CaptureFixture, *argv: str) -> str:
    from shared.cli import main

    with pytest.raises(SystemExit) as e:
        main(["config", "show", *argv])
    out, err = capsys.readouterr()
    assert e.value.code == 0, err
    return out


def test_config_show_round_trips_to_an_equal_config(
    tmp_path: Path, repo_root: Path, capsys: pytest.CaptureFixture
) -> None:
    demo = repo_root / "ops/configs/demo.toml"
    sets = [
        "learner.lora.rank=4",
        "env.symbols.levels=[5, 6]",
        'env.symbols.families=[{name = "x", level = 6, reward = "pass"}]',
        'env.reasoning_gym.difficulties=["easy"]',
        "broker.replay.rate_limiter=sample_to_insert",
        "learner.correction.alert.max_kl_behaviour=-inf",
        'model.system_prompt=say "hi"\\n',
    ]
    out = _show(capsys, "--config", str(demo), *(a for s in sets for a in ("--set", s)))
    assert "[learner.lora]\n" in out and "rank = 4\n" in out and "[model]\n" in out
    assert (
        "[env.symbols]\n" in out and "[env.reasoning_gym]\n" in out and "[env.textarena]\n" in out
    )
    shown = tmp_path / "shown.toml"
    shown.write_text(out)
    assert load_config(shown) == load_config(demo, sets)
    # the defaults alone, every section printed
    defaults = tmp_path / "defaults.toml"
    defaults.write_text(_show(capsys))
    assert load_config(defaults) == Config()


def test_config_show_bad_key_exits_2_with_one_line(capsys: pytest.CaptureFixture) -> None:
    from shared.cli import main

    with pytest.raises(SystemExit) as e:
        main(["config", "show", "--set", "broker.prot=1"])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.count("\n") == 1 and "prot" in err and "port" in err


def test_every_config_reading_command_takes_set() -> None:
    from actor.__main__ import parse_args as actor_args
    from broker.__main__ import build_config
    from broker.__main__ import parse_args as broker_args
    from learner.__main__ import parse_args as learner_args
    from learner.replay import parse_args as replay_args

    b = build_config(broker_args(["--set", "broker.group_size=3", "--port", "6000"]))
    assert b.broker.group_size == 3 and b.broker.port == 6000
    assert actor_args(["--set", "a.b=1", "--set", "c.d=2"]).overrides == ["a.b=1", "c.d=2"]
    assert learner_args(["--set", "learner.lr=1"]).overrides == ["learner.lr=1"]
    assert replay_args(["--input", "-", "--set", "learner.lr=1"]).overrides == ["learner.lr=1"]


def test_headrace_run_hands_its_set_flags_and_resume_mode_to_every_role(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shared.cli as cli

    started: dict[str, list[str]] = {}

    class Recorder:
        def __init__(self, name: str, argv: list[str], log_path: Path | None) -> None:
            self.name = name
            started[name] = argv

    monkeypatch.setattr(cli, "Role", Recorder)
    sets = ["learner.lr=0.01", "env.symbols.levels=[1]"]
    args = argparse.Namespace(
        config=None, overrides=sets, actors=1, steps=None, summary_json=None, resume="fresh"
    )
    cli._start_roles(args, load_config(None, sets), tmp_path, [])
    assert set(started) == {"broker", "actor0", "learner"}
    for argv in started.values():
        assert argv[argv.index("--set") :][:4] == ["--set", sets[0], "--set", sets[1]]
    assert "--fresh" in started["learner"] and "--fresh" not in started["broker"]
    assert "--resume" not in started["learner"]

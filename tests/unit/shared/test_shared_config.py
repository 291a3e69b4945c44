from __future__ import annotations

import pytest

from shared.config import Config, ConfigError, load_config


def test_defaults_without_a_file():
    cfg = load_config(None)
    assert cfg.broker.group_size > 0 and cfg.actor.max_concurrent_episodes >= 32


def test_demo_config_loads(repo_root):
    cfg = load_config(repo_root / "ops/configs/demo.toml")
    assert cfg.learner.steps > 0
    assert cfg.digest() == load_config(repo_root / "ops/configs/demo.toml").digest()
    assert cfg.digest() != Config().digest()


def test_unknown_key_is_an_error(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[broker]\nprot = 5555\n")
    with pytest.raises(ConfigError, match="prot"):
        load_config(p)


def test_wrong_type_is_an_error(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[learner]\nsteps = "many"\n')
    with pytest.raises(ConfigError, match="steps"):
        load_config(p)


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    p = tmp_path / "bad.toml"
    p.write_text("[broker\n")
    with pytest.raises(ConfigError, match="TOML"):
        load_config(p)


def _load_text(tmp_path, text: str) -> Config:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return load_config(p)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (
            '[model]\ndtype = "fp8"',
            r"dtype must be one of auto, .*not 'fp8' - at `\$\.model\.dtype`",
        ),
        ('[broker]\ndurability = "fsync"', r"durability must be one of none, sqlite, not 'fsync'"),
        ('[broker.curriculum]\nmode = "bandit"', r"mode must be one of curator, uniform"),
        ('[broker.curriculum]\nsignal = "x"', r"signal must be one of .*learnability"),
        ('[learner.advantage]\nestimator = "gae"', r"estimator must be one of .*gigpo"),
        ('[logging]\nbackends = ["comet"]', r"backends must be one of .*tensorboard"),
        ('[env.symbols]\nreward = "all"', r"reward must be one of pass, turn, not 'all'"),
        (
            '[env.symbols]\nfamilies = [{name = "a", level = 5, reward = "x"}]',
            r"reward must be one of pass, turn.* - at `\$\.env\.symbols\.families\[0\]\.reward`",
        ),
        ('[env.reasoning_gym]\ndifficulties = ["extreme"]', r"difficulties must be one of easy"),
        ('[env.reasoning_gym]\nanswer = "last"', r"answer must be one of first_number, marker"),
    ],
)
def test_a_choice_outside_its_literal_names_the_key_and_the_choices(
    tmp_path, text: str, match: str
) -> None:
    with pytest.raises(ConfigError, match=match) as e:
        _load_text(tmp_path, text)
    assert "\n" not in str(e.value)


def test_per_environment_sections(tmp_path) -> None:
    cfg = _load_text(
        tmp_path,
        '[env]\nname = "mixed"\nmixed = ["symbols", "reasoning_gym", "textarena"]\n'
        '[env.symbols]\nlevels = [5]\nreward = "pass"\n'
        '[env.reasoning_gym]\ndatasets = ["gcd"]\nmax_tokens = 24\nanswer = "first_number"\n'
        '[env.textarena]\ngames = ["tower_of_hanoi.easy"]\nmax_turns = 10\n',
    )
    env = cfg.env
    assert (env.symbols.levels, env.symbols.reward) == ([5], "pass")
    assert (env.reasoning_gym.datasets, env.reasoning_gym.max_tokens) == (["gcd"], 24)
    assert env.reasoning_gym.answer == "first_number"
    assert (env.textarena.games, env.textarena.max_turns) == (["tower_of_hanoi.easy"], 10)
    # the dataset keys stay in [env] and do not collide with the sections' own
    assert (env.max_tokens, env.max_turns, env.reward) == (256, 1, "")


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("rg_datasets = []", "[env] rg_datasets moved to [env.reasoning_gym] datasets"),
        ("rg_max_tokens = 24", "[env] rg_max_tokens moved to [env.reasoning_gym] max_tokens"),
        ("ta_games = []", "[env] ta_games moved to [env.textarena] games"),
        ("ta_max_turns = 3", "[env] ta_max_turns moved to [env.textarena] max_turns"),
        ("levels = [1]", "[env] levels moved to [env.symbols] levels"),
        ("step_delay_s = 0.1", "[env] step_delay_s moved to [env.symbols] step_delay_s"),
        ('reward = "pass"', "[env] reward moved to [env.symbols] reward"),
    ],
)
def test_an_old_flat_env_key_names_its_new_place(tmp_path, old: str, new: str) -> None:
    with pytest.raises(ConfigError) as e:
        _load_text(tmp_path, f"[env]\n{old}\n")
    assert new in str(e.value) and "\n" not in str(e.value)


def test_a_renamed_choice_says_its_new_name(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r'\[learner.correction\] mode: .*renamed to "segment_'):
        _load_text(tmp_path, '[learner.correction]\nmode = "vtrace"\n')


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[broker]\nport = 70000", "port 70000 is not a port"),
        ("[broker]\ngroup_size = 0", "group_size must be >= 1"),
        ("[broker]\nreplay_capacity = 4\ngroup_size = 8", "replay_capacity must hold"),
        ("[broker]\nepisode_timeout_s = -1", "episode_timeout_s must be >= 0"),
        ("[broker.retention]\nmax_bytes = -1", r"max_bytes must be >= 0.* - at `\$\.broker"),
        ("[broker.retention]\ninterval_s = 0", "interval_s must be > 0"),
    ],
)
def test_broker_values_are_checked_when_any_role_loads_the_file(
    tmp_path, text: str, match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        _load_text(tmp_path, text)


def test_sections_are_assembled_in_shared_config() -> None:
    # every section is importable from shared.config, the one place to look
    import shared.config as C

    for name in (
        "BrokerConfig",
        "ReplayConfig",
        "RetentionConfig",
        "CuratorConfig",
        "LearnerConfig",
        "CorrectionConfig",
        "EnvConfig",
        "SymbolsConfig",
        "ReasoningGymConfig",
        "TextArenaConfig",
        "LoraConfig",
        "LoggingConfig",
    ):
        assert name in C.__all__ and isinstance(getattr(C, name), type)
    assert Config().broker.curriculum == C.CuratorConfig()

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

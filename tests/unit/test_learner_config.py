"""The learner's nested TOML sections: [learner.correction], [learner.advantage],
[learner.weighting]."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.config import Config, ConfigError, load_config

TOML = """
[learner]
ppo_epochs = 2
minibatches = 4

[learner.correction]
mode = "mis"
level = "sequence"
mis_threshold = 3.0

[learner.correction.alert]
min_ess = 0.5
max_staleness = 3

[learner.advantage]
estimator = "gigpo"
step_weight = 0.5
mask_truncated = true

[learner.weighting]
mode = "actfocus"
tau = inf
role_weights = { reasoning = 2.0 }
"""


def _load(tmp_path: Path, text: str) -> Config:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return load_config(p)


def test_defaults_are_todays_behaviour() -> None:
    lc = Config().learner
    assert (lc.ppo_epochs, lc.minibatches) == (1, 1)
    assert lc.correction.mode == "decoupled" and lc.correction.is_cap == 2.0
    assert lc.advantage.estimator == "grpo" and not lc.advantage.mask_truncated
    assert lc.weighting.mode == "uniform"


def test_nested_sections_load(tmp_path: Path) -> None:
    lc = _load(tmp_path, TOML).learner
    assert (lc.ppo_epochs, lc.minibatches) == (2, 4)
    assert lc.correction.mode == "mis" and lc.correction.level == "sequence"
    assert lc.correction.alert.min_ess == 0.5 and lc.correction.alert.max_staleness == 3
    assert lc.advantage.estimator == "gigpo" and lc.advantage.mask_truncated
    assert lc.weighting.tau == float("inf")
    # roles not named keep their defaults
    assert lc.weighting.role_weights["reasoning"] == 2.0
    assert lc.weighting.role_weights["action"] == 1.0


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[learner.correction]\nmodee = 'tis'\n", "modee"),
        ("[learner.correction]\nmode = 'ppo'\n", "mode must be one of"),
        ("[learner.advantage]\nestimator = 'gae'\n", "estimator"),
        ("[learner.weighting]\nrole_weights = { answer = 1.0 }\n", "answer"),
        ("[learner.weighting]\nw_max = 0.5\n", "w_max"),
        ("[learner]\nppo_epochs = 0\n", "ppo_epochs"),
        ("[learner.correction.alert]\nmin_ess = 'low'\n", "min_ess"),
    ],
)
def test_bad_values_are_one_line_errors(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        _load(tmp_path, text)

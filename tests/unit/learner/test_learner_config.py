"""The learner's TOML sections: [learner] (clip bounds, entropy bonus, warm-up) and the nested
[learner.correction], [learner.advantage], [learner.weighting]."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.config import Config, ConfigError, load_config

TOML = """
[learner]
ppo_epochs = 2
minibatches = 4
clip_eps_high = 0.28
entropy_coef = 0.01
entropy_roles = ["action", "reasoning"]
warmup_steps = 10

[learner.correction]
mode = "mis"
level = "sequence"
mis_threshold = 3.0

[learner.correction.alert]
min_ess = 0.5
max_staleness = 3
min_action_entropy = 0.1

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
    assert lc.clip_bounds() == (lc.clip_eps, lc.clip_eps)  # the symmetric PPO clip
    assert lc.entropy_coef == 0 and lc.warmup_steps == 0
    assert lc.correction.alert.min_action_entropy > 0  # the one new default that acts


def test_nested_sections_load(tmp_path: Path) -> None:
    lc = _load(tmp_path, TOML).learner
    assert (lc.ppo_epochs, lc.minibatches) == (2, 4)
    assert lc.clip_bounds() == (0.2, 0.28)  # the lower bound falls back to clip_eps
    assert lc.entropy_coef == 0.01 and lc.entropy_roles == ["action", "reasoning"]
    assert lc.warmup_steps == 10 and lc.correction.alert.min_action_entropy == 0.1
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
        ("[learner.correction]\nmode = 'ppo'\n", "mode must be one of .*segment_trace.*not 'ppo'"),
        ("[learner.advantage]\nestimator = 'gae'\n", "estimator"),
        ("[learner.weighting]\nrole_weights = { answer = 1.0 }\n", "role_weights keys .*'answer'"),
        ("[learner.weighting]\nw_max = 0.5\n", "w_max"),
        ("[learner]\nppo_epochs = 0\n", "ppo_epochs"),
        ("[learner.correction.alert]\nmin_ess = 'low'\n", "min_ess"),
        ("[learner.correction.alert]\nmin_action_entropy = nan\n", "min_action_entropy"),
        ("[learner.correction]\nmode = 'vtrace'\n", 'renamed to "segment_trace".*critic-free'),
        ("[learner]\nentropy_roles = ['answer']\n", "entropy_roles must be one of .*not 'answer'"),
        (
            "[learner]\nlr_decay = 'linear'\n",
            r"lr_decay must be one of constant, cosine, not 'linear'",
        ),
        ("[learner.correction]\nlevel = 'group'\n", r"level must be one of .* - at `\$\.learner"),
        ("[learner.weighting]\nenergy = 'x'\n", "energy must be one of entropy, neg_logprob"),
        ("[learner]\nentropy_coef = 0.1\nentropy_roles = []\n", "entropy_roles is empty"),
        ("[learner]\nentropy_coef = -0.1\n", "entropy_coef must be >= 0"),
        ("[learner]\nclip_eps_low = 1.0\n", "eps_low=1.0"),
        ("[learner]\nclip_eps = 1.5\nclip_eps_low = 0.2\n", None),
        ("[learner]\nclip_eps_high = nan\n", "eps_high=nan"),
        ("[learner]\nwarmup_steps = -1\n", "warmup_steps must be >= 0"),
    ],
)
def test_bad_values_are_one_line_errors(tmp_path: Path, text: str, match: str | None) -> None:
    if match is None:  # a valid neighbour of the bad values: must load
        _load(tmp_path, text)
        return
    with pytest.raises(ConfigError, match=match) as e:
        _load(tmp_path, text)
    assert "\n" not in str(e.value)

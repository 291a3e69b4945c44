"""The scalar tags of a learner step: one home for their names.

A step's summary entry (learner/loop.py, the `--summary-json` format) becomes tags grouped by
what a reader looks for together (TensorBoard makes one section per prefix):

- `train/`: reward_mean, pass_rate, loss, lr, grad_norm, clip_fraction, entropy_bonus,
  adv_abs_mean, policy_version
- `entropy/`: action, reasoning (mean proximal entropy of each token role), all
- `offpolicy/`: ess, kl_behaviour, masked_fraction, is_cap_fraction
- `staleness/`: trajectory_mean, trajectory_max (policy versions behind, per trajectory),
  token_mean, token_max
- `throughput/`: tokens_per_s, trajectories_per_s (per second of the step's wall time, the
  wait for its batch included), step_seconds, wait_seconds
- `diag/<key>`: every other number of the entry (ratios, token weights, the ActFocus monitor)

Evaluation adds its own `eval/...` tags through the same tracker (see learner/tracking/step.py).
"""

from __future__ import annotations

import math
from typing import Any

NAMED = {
    "reward_mean": "train/reward_mean",
    "pass_rate": "train/pass_rate",
    "loss": "train/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "clip_fraction": "train/clip_fraction",
    "entropy_bonus": "train/entropy_bonus",
    "adv_abs_mean": "train/adv_abs_mean",
    "policy_version": "train/policy_version",
    "entropy_action": "entropy/action",
    "entropy_reasoning": "entropy/reasoning",
    "entropy_mean": "entropy/all",
    "ess": "offpolicy/ess",
    "kl_behaviour": "offpolicy/kl_behaviour",
    "masked_fraction": "offpolicy/masked_fraction",
    "is_cap_fraction": "offpolicy/is_cap_fraction",
    "staleness_mean": "staleness/trajectory_mean",
    "staleness_max": "staleness/trajectory_max",
    "token_staleness_mean": "staleness/token_mean",
    "token_staleness_max": "staleness/token_max",
    "step_seconds": "throughput/step_seconds",
    "wait_seconds": "throughput/wait_seconds",
}
# Not a scalar worth a curve: the step itself and the wall clock.
SKIPPED = {"step", "time"}


def scalar_tags(entry: dict[str, Any]) -> dict[str, float]:
    """The tags of one summary entry (non-numbers are left out; None becomes NaN)."""
    out: dict[str, float] = {}
    for key, value in entry.items():
        if key in SKIPPED or isinstance(value, bool | str | list | dict):
            continue
        v = math.nan if value is None else float(value)
        out[NAMED.get(key, f"diag/{key}")] = v
    wall = float(entry.get("step_seconds") or 0.0) + float(entry.get("wait_seconds") or 0.0)
    if wall > 0:
        out["throughput/tokens_per_s"] = float(entry.get("n_tokens") or 0.0) / wall
        out["throughput/trajectories_per_s"] = float(entry.get("n_trajectories") or 0.0) / wall
    return out

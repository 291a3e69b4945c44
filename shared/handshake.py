"""What a peer takes from the broker's `Welcome` before it works for the run.

The broker owns the run's shared facts: `group_size` (its [broker] group_size) travels in
every Welcome and Lease, so actors and learners follow the broker's and never their own copy.
What cannot travel (each role runs it itself) must agree between the configs, and
`run_digest` is the digest of exactly that:

- the whole `[env]`: the broker's task bank and the actors' environments must mean the same
  task, payload and reward by each task id; the learner's checkpoints record it as what they
  trained (learner/resume.py);
- `[actor] max_model_len`: the broker refuses every trajectory longer than its own copy, so an
  actor with a longer one would have its long episodes refused one by one.

Not in it: `[model] path` (each role resolves it on its own machine, and the broker needs no
copy; the weights' kind is checked when the actor fetches them), `group_size` (it travels),
and what only one role reads (ports, timeouts, the learner's hyperparameters).
A peer whose digest differs from the Welcome's is refused at once with `ConfigMismatch`, one
line naming both digests: a run whose roles disagree on these trains on something else than
it says, without an error anywhere.
"""

from __future__ import annotations

import hashlib

import msgspec

from shared import protocol as P
from shared.config import Config, ConfigError


class ConfigMismatch(ConfigError):
    """This role's config and the broker's disagree on what the run is."""


def run_digest(cfg: Config) -> str:
    shared = {"env": cfg.env, "actor.max_model_len": cfg.actor.max_model_len}
    return hashlib.blake2b(msgspec.json.encode(shared), digest_size=8).hexdigest()


def check_welcome(cfg: Config, welcome: P.Welcome, role: str, broker: str) -> None:
    """Raise ConfigMismatch when the broker's `welcome` describes another run than `cfg`.
    An empty digest (a broker that does not send one) is not compared."""
    ours = run_digest(cfg)
    if welcome.config_digest and welcome.config_digest != ours:
        raise ConfigMismatch(
            f"this {role}'s config differs from broker {broker}'s in [env] or [actor] "
            f"max_model_len (digest {ours}, the broker's {welcome.config_digest}): give every "
            "role the same config file"
        )


def group_size(cfg: Config, welcome: P.Welcome) -> int:
    """The run's group size: the broker's (0 in its Welcome: a broker that does not say,
    then this role's own [broker] group_size)."""
    return welcome.group_size or cfg.broker.group_size

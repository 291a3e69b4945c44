"""Which checkpoint a starting learner resumes: its own run's by itself, another's never silently.

Every checkpoint records its run identity in `state.json` (`extra["run"]`): the broker's run id
(the broker keeps it in its store, so a broker restarted on the same data dir has the same one)
and `config_digest`, a digest of the config sections that decide what is trained. A learner
that finds a checkpoint in its checkpoint dir asks the broker for its run id (a `Status`
request, before the model is built and before its Hello) and then:

- same run id and digest: resumes it (a restart after a crash, `headrace run --run-dir DIR`);
- otherwise exits 2 with one line naming the checkpoint, why, and the two ways on:
- `--resume`: resumes it anyway (the checkpoints written from then on record this run);
- `--fresh`: moves everything in the checkpoint dir to `<dir>.aside-<time>/` and starts from
  `[model] path`.

Under torchrun rank 0 decides and the other ranks load what it chose (`agree`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from learner import distributed as D
from shared import protocol as P
from shared.checkpoint_dirs import latest
from shared.config import Config
from shared.security import client_keys
from shared.transport import Client, PeerUnreachable

log = logging.getLogger("learner")

EXTRA_KEY = "run"  # the identity's key in a checkpoint's state.json "extra"
# [learner] keys that say how a run is operated, not what it trains: a restart may change them
# (e.g. more steps, another port) and still resume. Every other [model], [env] and [learner]
# key is in the digest; [broker] belongs to the broker, whose store the run id stands for.
OPERATIONAL_KEYS = frozenset(
    {
        "broker",
        "metrics_port",
        "weights_host",
        "weights_port",
        "steps",
        "publish_every",
        "micro_batch_tokens",
        "packing",
        "activation_checkpointing",
        "checkpoint_every",
        "checkpoint_dir",
        "keep_checkpoints",
        "connect_timeout_s",
        "eval_every",
        "eval_tasks",
        "eval_samples",
        "eval_timeout_s",
    }
)


class Refused(Exception):
    """The learner must not start: the one-line reason and its exit code."""

    def __init__(self, reason: str, code: int = 2) -> None:
        super().__init__(reason)
        self.code = code


@dataclass(frozen=True)
class RunIdentity:
    run_id: str
    config_digest: str

    def extra(self) -> dict[str, Any]:
        """What `save_checkpoint(extra=...)` records."""
        return {EXTRA_KEY: {"run_id": self.run_id, "config_digest": self.config_digest}}


@dataclass(frozen=True)
class Choice:
    checkpoint: Path | None  # None: start from the model


def config_digest(cfg: Config) -> str:
    """Digest of what is trained: [model] (but `build_tiny_if_missing`), [env], and [learner]
    less `OPERATIONAL_KEYS`. Takes the config as resolved (`[model] path` included)."""
    d = msgspec.to_builtins(cfg)
    model = {k: v for k, v in d["model"].items() if k != "build_tiny_if_missing"}
    learner = {k: v for k, v in d["learner"].items() if k not in OPERATIONAL_KEYS}
    blob = json.dumps({"model": model, "env": d["env"], "learner": learner}, sort_keys=True)
    return hashlib.blake2b(blob.encode(), digest_size=8).hexdigest()


def recorded(ckpt: Path) -> RunIdentity | None:
    """The identity a checkpoint recorded (None: written before checkpoints recorded one)."""
    try:
        extra = json.loads((ckpt / "state.json").read_text()).get("extra") or {}
    except (OSError, ValueError):
        return None
    run = extra.get(EXTRA_KEY) if isinstance(extra, dict) else None
    if not isinstance(run, dict):
        return None
    return RunIdentity(str(run.get("run_id", "")), str(run.get("config_digest", "")))


def decide(root: Path, mode: str | None, current: RunIdentity | None) -> Path | None:
    """The checkpoint under `root` to resume (None: start from the model).

    `mode`: None (resume only this run's: `current` is needed), "resume" or "fresh"."""
    ckpt = latest(root)
    if ckpt is None:
        return None
    if mode == "fresh":
        aside = move_aside(root)
        log.info("--fresh: moved the checkpoints of %s to %s; starting from the model", root, aside)
        return None
    theirs = recorded(ckpt)
    if mode == "resume":
        if current is None or theirs != current:
            log.warning("--resume: resuming %s, written by %s", ckpt, _describe(theirs))
        return ckpt
    assert current is not None, "mode None needs this run's identity"
    if theirs == current:
        return ckpt
    raise Refused(
        f"checkpoint {ckpt} is not this run's ({_why(theirs, current)}): pass --resume to "
        "continue from it or --fresh to start from the model (its checkpoint dir moved aside)"
    )


def _describe(ident: RunIdentity | None) -> str:
    if ident is None:
        return "a learner that recorded no run identity"
    return f"run {ident.run_id} with config digest {ident.config_digest}"


def _why(theirs: RunIdentity | None, ours: RunIdentity) -> str:
    if theirs is None:
        return "it records no run identity"
    why = []
    if theirs.run_id != ours.run_id:
        why.append(f"broker run {theirs.run_id}, this broker's is {ours.run_id}")
    if theirs.config_digest != ours.config_digest:
        why.append(
            f"config digest {theirs.config_digest}, this config's is {ours.config_digest}:"
            " [model], [env] or [learner] differ"
        )
    return "; ".join(why)


def move_aside(root: Path) -> Path:
    """Move everything in `root` to a new sibling `<root>.aside-<time>` (returned)."""
    root = root.resolve()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = root.with_name(f"{root.name}.aside-{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = root.with_name(f"{root.name}.aside-{stamp}-{n}")
    aside.mkdir()
    for p in sorted(root.iterdir()):
        os.rename(p, aside / p.name)
    return aside


async def broker_run_id(cfg: Config, endpoint: str, peer_id: str) -> str:
    """The broker's run id (its Status), retried within `[learner] connect_timeout_s`."""
    timeout = cfg.learner.connect_timeout_s
    per_try = min(5.0, timeout)
    curve = client_keys(cfg.security, "learner", "broker")
    client = Client(endpoint, peer_id=peer_id, curve=curve)  # not the learner's: no Hello
    client.start()
    try:
        retries = max(0, math.ceil(timeout / per_try) - 1)
        reply = await client.request(P.Status(), P.StatusReply, timeout=per_try, retries=retries)
    except PeerUnreachable:
        raise Refused(f"broker {endpoint} did not answer within {timeout:.0f}s", 3) from None
    except P.ProtocolError as e:
        raise Refused(f"broker {endpoint} refused a Status request: {e}", 3) from None
    finally:
        client.close()
    return str(reply.info.get("run_id", ""))


async def choose(cfg: Config, root: Path, mode: str | None, broker: str, peer_id: str) -> Choice:
    """Rank 0's choice; asks the broker only when there is a checkpoint to judge."""
    current = None
    if mode is None and latest(root) is not None:
        run_id = await broker_run_id(cfg, broker, f"{peer_id}-resume")
        current = RunIdentity(run_id, config_digest(cfg))
    return Choice(decide(root, mode, current))


def agree(ckpt: Path | None) -> Path | None:
    """Under torchrun, rank 0's `ckpt` on every rank (followers pass None): all load one."""
    if D.world_size() <= 1:
        return ckpt
    mine = ("+" + str(ckpt) if ckpt is not None else "-").encode() if D.is_main() else None
    theirs = D.broadcast_from_main(mine).decode()
    return Path(theirs[1:]) if theirs.startswith("+") else None

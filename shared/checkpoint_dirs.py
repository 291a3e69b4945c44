"""Where a learner checkpoint lives on disk, for the roles and for tools that only read one.

`<root>/step_000123/` is one checkpoint; `state.json`, written last, marks it complete
(learner/checkpoint.py writes them). Its top level is a loadable model: a plain Hugging Face
model dir (`config.json`, `*.safetensors`, the tokenizer), or under `[learner.lora]` a PEFT
adapter dir (`adapter_config.json`, `adapter_model.safetensors`) whose base model is the run's
`[model] path`. Kept here, free of torch, so `headrace eval` can find and tell them apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from shared.config import ConfigError

STEP_DIR = re.compile(r"^step_(\d{6,})$")
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's name: a LoRA checkpoint


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every complete checkpoint under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and (p / "state.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint under `root`, or None."""
    found = complete_checkpoints(Path(root))
    return found[-1][1] if found else None


class CheckpointNotFound(ConfigError):
    """The path given is no model, checkpoint or checkpoint root (one line, exit code 2)."""


@dataclass(frozen=True)
class ModelDir:
    """What to load: the model dir `path`, or (`lora`) the adapter dir `path` on top of the
    base model `[model] path` names."""

    path: Path
    lora: bool


def resolve_checkpoint(path: str | Path) -> ModelDir:
    """A checkpoint dir, a checkpoint root (its newest complete checkpoint), or any Hugging
    Face model dir, as `ModelDir`."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise CheckpointNotFound(f"no checkpoint at {p}: no such directory")
    if not _is_model(p):
        newest = latest(p)
        if newest is None:
            raise CheckpointNotFound(
                f"{p} is neither a model dir (config.json or {ADAPTER_CONFIG}) nor a checkpoint"
                " root with a complete step_* checkpoint"
            )
        p = newest
    if STEP_DIR.match(p.name) and not (p / "state.json").is_file():
        raise CheckpointNotFound(f"{p} is an incomplete checkpoint (no state.json yet)")
    return ModelDir(p, lora=(p / ADAPTER_CONFIG).is_file())


def _is_model(p: Path) -> bool:
    return (p / "config.json").is_file() or (p / ADAPTER_CONFIG).is_file()

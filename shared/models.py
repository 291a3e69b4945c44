"""Where `[model] path` points, and in which precision every role runs it.

A path is a local Hugging Face directory (one with `config.json`) or a hub id such as
`HuggingFaceTB/SmolLM2-135M-Instruct`, resolved from the local HF cache only: no role ever
downloads. Anything else is `ModelNotFound`, a one-line error (exit code 2), never a silently
built stand-in; only a config that sets `build_tiny_if_missing` gets the tiny model built there.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from shared.config import ConfigError, ModelConfig

DTYPES = ("float32", "bfloat16", "float16")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class ModelNotFound(ConfigError):
    """`[model] path` is neither a model directory nor a hub id in the local HF cache."""


def _from_hub_cache(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        return None
    try:
        found = Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError, OSError):
        return None
    return found if (found / "config.json").exists() else None


def resolve_model(model: ModelConfig) -> str:
    """The local directory `[model] path` names (a tiny model that `build_tiny_if_missing`
    will build counts as found)."""
    path = Path(model.path).expanduser()
    if (path / "config.json").exists() or model.build_tiny_if_missing:
        return str(path)
    if not path.exists() and _HUB_ID.fullmatch(model.path):
        cached = _from_hub_cache(model.path)
        if cached is not None:
            return str(cached)
        raise ModelNotFound(
            f"[model] path {model.path!r}: no such directory, and not in the local Hugging Face "
            "cache (nothing is downloaded: fetch it with `huggingface-cli download` first)"
        )
    what = "has no config.json" if path.is_dir() else "does not exist"
    raise ModelNotFound(
        f"[model] path {model.path!r} {what}: point it at a Hugging Face model directory "
        "(`headrace models smollm2 --out DIR` writes one), or set build_tiny_if_missing = true "
        "for the tiny test model"
    )


def model_dtype(model: ModelConfig, path: str | Path) -> str:
    """`[model] dtype`, with "auto" the checkpoint's own (`torch_dtype` / `dtype` of its
    config.json; float32 when it names none)."""
    if model.dtype != "auto":
        return model.dtype
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return "float32"
    named = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32")
    return named if named in DTYPES else "float32"

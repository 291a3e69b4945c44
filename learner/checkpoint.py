"""Learner checkpoints without pickle: HF `save_pretrained` + safetensors + JSON.

Layout of `<root>/step_000123/`:

    config.json, model.safetensors, ...   # a plain HF model dir (vLLM / transformers load it)
    tokenizer files                       # copied from the base model when given
    trainer/optimizer.safetensors         # every tensor of optimizer.state_dict(), flattened
    trainer/optimizer.json                # the rest of that dict, tensors replaced by refs
    state.json                            # step, policy version, broker cursor, RNG states

The optimizer state lives in `trainer/` so a loader globbing `*.safetensors` at the top level
sees only model weights. A checkpoint is written into a temp dir and renamed into place with
`state.json` written last, so `latest()` never returns a half-written checkpoint.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

_STEP_DIR = re.compile(r"^step_(\d{6,})$")
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "generation_config.json",
)


@dataclass
class TrainerState:
    step: int
    policy_version: int
    broker_cursor: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- pickle-free nested state


def _flatten(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able mirror of `obj`; tensors go to `tensors` under their path and leave a ref.

    Dict keys keep their type (optimizer state is keyed by int param index) and tuples stay
    tuples (AdamW's betas), so `_unflatten` gives back exactly what `state_dict()` produced.
    """
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        return {"__dict__": [[k, _flatten(v, f"{path}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_flatten(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_flatten(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot checkpoint {type(obj).__name__} at {path} without pickle")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {k: _unflatten(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


# ---------------------------------------------------------------- RNG


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy())


def rng_state() -> dict[str, Any]:
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": _b64(torch.get_rng_state()),
        "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "python": [py_version, list(py_state), py_gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(_unb64(state["torch"]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, py_state, py_gauss = state["python"]
    random.setstate((version, tuple(py_state), py_gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


# ---------------------------------------------------------------- save / find / load


def _complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / "state.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint under `root`, or None."""
    found = _complete_checkpoints(Path(root))
    return found[-1][1] if found else None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    root: str | Path,
    step: int,
    model: Any,  # a transformers PreTrainedModel
    optimizer: torch.optim.Optimizer | None,
    *,
    policy_version: int,
    broker_cursor: int = 0,
    extra: dict[str, Any] | None = None,
    copy_from: str | Path | None = None,
    keep: int = 3,
) -> Path:
    """Write `<root>/step_{step:06d}` atomically and prune to the newest `keep` checkpoints."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if copy_from is not None:  # tokenizer etc., so the checkpoint is a runnable model dir
            for name in _TOKENIZER_FILES:
                src = Path(copy_from) / name
                if src.is_file() and not (tmp / name).exists():
                    shutil.copy2(src, tmp / name)
        trainer = tmp / "trainer"
        trainer.mkdir()
        if optimizer is not None:
            tensors: dict[str, torch.Tensor] = {}
            tree = _flatten(optimizer.state_dict(), "opt", tensors)
            save_file(tensors, str(trainer / "optimizer.safetensors"))
            (trainer / "optimizer.json").write_text(json.dumps(tree))
        state = {
            "step": step,
            "policy_version": policy_version,
            "broker_cursor": broker_cursor,
            "extra": extra or {},
            "rng": rng_state(),
        }
        with open(tmp / "state.json", "w") as f:  # last: marks the checkpoint complete
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o755)
        trash = None
        if final.exists():  # re-saving a step (e.g. final save right after a periodic one)
            trash = root / f".trash-{final.name}-{os.getpid()}"
            os.rename(final, trash)
        os.rename(tmp, final)
        _fsync_dir(root)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in _complete_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _load_model_tensors(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors model files in {path}")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return tensors


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    restore_rng: bool = True,
) -> TrainerState:
    """Load weights (and optimizer, RNG) from a checkpoint dir into existing objects."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    tensors = _load_model_tensors(path)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected:
        raise ValueError(f"{path}: unexpected tensors {unexpected[:5]}")
    # save_pretrained drops tied copies (e.g. lm_head tied to embed_tokens); those are fine.
    loaded_ptrs = {p.data_ptr() for k, p in model.state_dict().items() if k in tensors}
    really_missing = [k for k in missing if model.state_dict()[k].data_ptr() not in loaded_ptrs]
    if really_missing:
        raise ValueError(f"{path}: missing tensors {really_missing[:5]}")
    if optimizer is not None:
        opt_tensors = load_file(str(path / "trainer" / "optimizer.safetensors"))
        tree = json.loads((path / "trainer" / "optimizer.json").read_text())
        optimizer.load_state_dict(_unflatten(tree, opt_tensors))
    if restore_rng:
        set_rng_state(state["rng"])
    return TrainerState(
        step=int(state["step"]),
        policy_version=int(state["policy_version"]),
        broker_cursor=int(state.get("broker_cursor", 0)),
        extra=dict(state.get("extra", {})),
    )

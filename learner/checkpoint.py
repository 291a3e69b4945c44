"""Learner checkpoints without pickle: HF `save_pretrained` + safetensors + JSON.

Layout of `<root>/step_000123/`:

    config.json, model.safetensors, ...   # a plain HF model dir (vLLM / transformers load it)
                                          # or, under [learner.lora], a PEFT adapter dir
                                          # (adapter_config.json, adapter_model.safetensors)
    tokenizer files                       # copied from the base model when given
    trainer/optimizer.safetensors         # every tensor of the optimizer state, flattened
    trainer/optimizer.json                # the rest of that dict, tensors replaced by refs
    state.json                            # step, policy version, broker cursor, RNG states,
                                          # LR scheduler state

The optimizer state lives in `trainer/` so a loader globbing `*.safetensors` at the top level
sees only model weights. It is keyed by parameter name (as `torch.distributed.checkpoint`'s
full optimizer state dict is), not by position, so a checkpoint written by an FSDP run loads
into a single process and back. A checkpoint is written into a temp dir and renamed into place
with `state.json` written last, so `latest()` never returns a half-written checkpoint.

With an FSDP-sharded model (`learner.distributed`) rank 0 alone calls `save_checkpoint`: the
whole model and optimizer state are gathered to its CPU first (the other ranks join that
collective from their command loop). `load_checkpoint` runs on every rank and scatters the
whole state into the shards.

Everything needed for an exact resume is here: weights, optimizer, scheduler, step, policy
version, the broker cursor of the last consumed batch and the python / numpy / torch (and
CUDA) RNG streams.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from learner import distributed as D
from learner.lora import adapter_keys, is_lora
from shared.checkpoint_dirs import complete_checkpoints as _complete_checkpoints
from shared.checkpoint_dirs import latest as latest  # the loop's and tools' way in
from shared.checkpoint_dirs import step_dir_name

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


# ---------------------------------------------------------------- optimizer keys


def _param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each optimizer parameter, in `optimizer.state_dict()` index order."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def _rekey(sd: dict[str, Any], key: Any) -> dict[str, Any]:
    return {
        **sd,
        "state": {key(k): v for k, v in sd["state"].items()},
        "param_groups": [
            {**g, "params": [key(k) for k in g["params"]]} for g in sd["param_groups"]
        ],
    }


def optimizer_state_by_name(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """`optimizer.state_dict()` keyed by parameter name instead of position."""
    names = _param_names(model, optimizer)
    return _rekey(optimizer.state_dict(), lambda k: names[k] if isinstance(k, int) else k)


def _optimizer_state_by_index(
    sd: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    index = {n: i for i, n in enumerate(_param_names(model, optimizer))}
    return _rekey(sd, lambda k: index[k] if isinstance(k, str) else k)


# ---------------------------------------------------------------- RNG


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy())


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple)  # legacy: (name, keys, pos, has_gauss, cached_gaussian)
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np_state
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
    scheduler: Any | None = None,  # a torch LR scheduler
) -> Path:
    """Write `<root>/step_{step:06d}` atomically and prune to the newest `keep` checkpoints.

    With an FSDP-sharded model, call it on rank 0 only (see the module docstring)."""
    if D.is_sharded(model):
        model_state, opt_state = D.full_training_state(model, optimizer)
    else:
        model_state = None  # save_pretrained takes the model's own state dict
        opt_state = None if optimizer is None else optimizer_state_by_name(model, optimizer)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        model.save_pretrained(tmp, state_dict=model_state, safe_serialization=True)
        if copy_from is not None:  # tokenizer etc., so the checkpoint is a runnable model dir
            for name in _TOKENIZER_FILES:
                src = Path(copy_from) / name
                if src.is_file() and not (tmp / name).exists():
                    shutil.copy2(src, tmp / name)
        trainer = tmp / "trainer"
        trainer.mkdir()
        if opt_state is not None:
            tensors: dict[str, torch.Tensor] = {}
            tree = _flatten(opt_state, "opt", tensors)
            save_file(tensors, str(trainer / "optimizer.safetensors"))
            (trainer / "optimizer.json").write_text(json.dumps(tree))
        state = {
            "step": step,
            "policy_version": policy_version,
            "broker_cursor": broker_cursor,
            "extra": extra or {},
            "rng": rng_state(),
        }
        if scheduler is not None:
            no_tensors: dict[str, torch.Tensor] = {}
            state["scheduler"] = _flatten(scheduler.state_dict(), "sched", no_tensors)
            if no_tensors:
                raise TypeError(f"scheduler state holds tensors: {sorted(no_tensors)[:3]}")
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


def _checked_model_tensors(path: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The checkpoint's weights keyed like `model.state_dict()`; every one must belong to the
    model and every weight the checkpoint should hold must be there."""
    tensors = _load_model_tensors(path)
    if is_lora(model):
        # A LoRA checkpoint is a PEFT adapter dir: the adapter alone, under its file names;
        # the frozen base weights come from `[model] path` as they did at the start.
        names = adapter_keys(model)
        unexpected = sorted(set(tensors) - set(names))
        missing = sorted(set(names) - set(tensors))
        if unexpected or missing:
            raise ValueError(f"{path}: adapter unexpected {unexpected[:5]} missing {missing[:5]}")
        return {names[k]: v for k, v in tensors.items()}
    expected = set(model.state_dict())
    unexpected = sorted(set(tensors) - expected)
    if unexpected:
        raise ValueError(f"{path}: unexpected tensors {unexpected[:5]}")
    # save_pretrained drops tied copies (e.g. lm_head tied to embed_tokens); those are fine.
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(params[k]) for k in tensors if k in params}
    really_missing = [
        k for k in sorted(expected - set(tensors)) if k not in params or id(params[k]) not in loaded
    ]
    if really_missing:
        raise ValueError(f"{path}: missing tensors {really_missing[:5]}")
    return tensors


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    restore_rng: bool = True,
    scheduler: Any | None = None,
) -> TrainerState:
    """Load weights (and optimizer, scheduler, RNG) from a checkpoint dir into existing objects.

    With an FSDP-sharded model, call it on every rank (each reads the files)."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    tensors = _checked_model_tensors(path, model)
    opt_state = None
    if optimizer is not None:
        opt_tensors = load_file(str(path / "trainer" / "optimizer.safetensors"))
        tree = json.loads((path / "trainer" / "optimizer.json").read_text())
        opt_state = _unflatten(tree, opt_tensors)
    if D.is_sharded(model):
        if opt_state is not None and optimizer is not None:  # older checkpoints: by position
            names = _param_names(model, optimizer)
            opt_state = _rekey(opt_state, lambda k: names[k] if isinstance(k, int) else k)
        D.load_full_state(model, tensors, optimizer, opt_state)
    else:
        model.load_state_dict(tensors, strict=False)
        if opt_state is not None and optimizer is not None:
            optimizer.load_state_dict(_optimizer_state_by_index(opt_state, model, optimizer))
    if scheduler is not None and "scheduler" in state:
        scheduler.load_state_dict(_unflatten(state["scheduler"], {}))
    if restore_rng:
        set_rng_state(state["rng"])
    return TrainerState(
        step=int(state["step"]),
        policy_version=int(state["policy_version"]),
        broker_cursor=int(state.get("broker_cursor", 0)),
        extra=dict(state.get("extra", {})),
    )

"""LoRA training with `peft` (`[learner.lora]`): the wrapped model and what the actors get.

The base weights stay frozen (float32, as loaded); only the adapters' A and B train, so the
optimiser, its checkpointed state and every published policy hold the adapter alone. A policy
is then the adapter's tensors under the names PEFT writes to `adapter_model.safetensors`
(`get_peft_model_state_dict`, the names vLLM's LoRA loader parses), plus its
`adapter_config.json` as a dict, carried by the `WeightManifest` (kind "lora").

Version 0 is the freshly initialised adapter, B = 0: the base model exactly, which the
actors' engines also start from (actor/engine.py), so tokens stamped 0 are exact either way.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch

from shared.lora_config import LoraConfig

ADAPTER = "default"  # peft's name for the single adapter; not part of exported names


def is_lora(model: torch.nn.Module) -> bool:
    """A peft-wrapped model (its trainable weights are adapters)."""
    return hasattr(model, "peft_config")


def apply_lora(model: torch.nn.Module, lc: LoraConfig) -> torch.nn.Module:
    """`model` with adapters on `lc.target_modules`; everything else frozen.

    Initialisation draws from the global torch RNG (A: Kaiming-uniform, B: 0), so a seeded
    learner builds the same adapter every time.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(**lc.peft_kwargs())  # type: ignore[arg-type]
    wrapped = get_peft_model(model, peft_cfg)
    missing = [m for m in lc.target_modules if not _has_module(wrapped, m)]
    if missing:
        # peft only refuses a config that matches nothing at all; a typo among several names
        # would quietly train fewer modules than asked.
        raise ValueError(f"[learner.lora] target_modules not in the model: {missing}")
    return wrapped


def _has_module(model: torch.nn.Module, suffix: str) -> bool:
    return any(n.endswith(f".{suffix}") and hasattr(m, "lora_A") for n, m in model.named_modules())


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The HF model inside a peft wrapper (its LoRA layers sit inside it), else `model`."""
    return model.get_base_model() if is_lora(model) else model  # type: ignore[operator]


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def exported_name(state_key: str) -> str:
    """The PEFT file name of the adapter tensor `state_key` of the wrapped model's state dict
    (peft drops the adapter's name: `...q_proj.lora_A.default.weight` -> `...lora_A.weight`)."""
    return state_key.replace(f".{ADAPTER}.", ".")


def adapter_keys(model: torch.nn.Module) -> dict[str, str]:
    """exported name -> state-dict key, for every adapter tensor of `model`."""
    keys = [k for k in model.state_dict() if ".lora_" in k and f".{ADAPTER}." in k]
    return {exported_name(k): k for k in keys}


def adapter_state_dict(
    model: torch.nn.Module, state: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The adapter's tensors under the names of `adapter_model.safetensors`, from `state` (a
    gathered full state dict of a sharded model) or the model's own."""
    from peft import get_peft_model_state_dict

    return dict(get_peft_model_state_dict(model, state_dict=state, adapter_name=ADAPTER))


def adapter_config(model: torch.nn.Module) -> dict[str, Any]:
    """`adapter_config.json` as plain JSON values (what `save_pretrained` would write)."""
    cfg = model.peft_config[ADAPTER].to_dict()  # type: ignore[index,union-attr]
    # through JSON: str enums (peft_type) become strings, sets (target_modules) sorted lists
    return json.loads(json.dumps(cfg, default=_json_default))


def _json_default(value: object) -> object:
    if isinstance(value, set | frozenset):
        return sorted(value)
    raise TypeError(f"adapter config value {value!r} has no JSON form")


def publishable(
    model: torch.nn.Module, state: Mapping[str, torch.Tensor]
) -> tuple[Mapping[str, torch.Tensor], str, dict[str, Any] | None]:
    """(tensors, kind, adapter config) of a policy to publish from the model's full `state`:
    the adapter alone under a LoRA run, else every weight."""
    if not is_lora(model):
        return state, "full", None
    return adapter_state_dict(model, state), "lora", adapter_config(model)

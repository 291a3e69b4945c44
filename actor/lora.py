"""PEFT adapter directories for the engine's LoRA slot (`[learner.lora]` rank > 0).

vLLM loads a LoRA adapter from a directory holding `adapter_config.json` and
`adapter_model.safetensors`. The learner publishes exactly those two things (the tensors as the
blob, the config inside the broker-relayed manifest); `write_adapter` lays them out.

`write_zero_adapter` builds version 0 here, without the learner: every tensor 0 (so B = 0),
shaped by peft on a weightless ("meta") copy of the model, under the names the learner's peft
uses. Its output is exactly the base model's (vLLM adds x A^T B^T scale = 0), which is what
the learner's freshly initialised adapter (B = 0) computes too: tokens sampled before the
first adapter arrives are exact version-0 tokens.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from shared.lora_config import LoraConfig

CONFIG_FILE = "adapter_config.json"
TENSORS_FILE = "adapter_model.safetensors"


def write_adapter(out_dir: Path, tensors_path: str, adapter_config: dict[str, Any]) -> Path:
    """`out_dir` as a PEFT adapter dir: the fetched safetensors blob and its config."""
    out_dir.mkdir(parents=True, exist_ok=True)  # a version an engine that died began to load
    shutil.copyfile(tensors_path, out_dir / TENSORS_FILE)
    (out_dir / CONFIG_FILE).write_text(json.dumps(adapter_config))
    return out_dir


def write_zero_adapter(model_path: str, lc: LoraConfig, out_dir: Path) -> Path:
    """An all-zero adapter for the model at `model_path` (see the module docstring)."""
    import torch
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    peft_cfg = PeftLoraConfig(**lc.peft_kwargs())  # type: ignore[arg-type]
    with torch.device("meta"):  # shapes only: no memory for the base weights
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
        peft_model = get_peft_model(model, peft_cfg)
    shapes = {k: v.shape for k, v in get_peft_model_state_dict(peft_model).items()}
    out_dir.mkdir(parents=True, exist_ok=False)
    save_file(
        {k: torch.zeros(s, dtype=torch.float32) for k, s in shapes.items()},
        str(out_dir / TENSORS_FILE),
    )
    peft_model.peft_config["default"].save_pretrained(str(out_dir))  # adapter_config.json
    return out_dir

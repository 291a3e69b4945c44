"""`[learner.lora]`: train LoRA adapters instead of every weight, and sync only the adapter.

A section module that shared/config.py assembles (import it from there or from here: the
roles' LoRA code needs nothing else of the config). The learner wraps its
model with `peft` (learner/lora.py); the actors read this same section from the same TOML to
start vLLM with LoRA enabled (actor/engine.py). rank 0: off, full fine-tuning.
"""

from __future__ import annotations

import math

import msgspec

from shared.config_base import Section

# Llama's attention and MLP projections (also Qwen2/Mistral/SmolLM2 names)
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The ranks vLLM can reserve (`max_lora_rank`); an adapter may be of any rank up to it.
VLLM_MAX_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# The trainer feeds the LM head's weight straight to its logprob kernel (learner/train.py)
# and vLLM's LoRA does not cover the embeddings of these models: an adapter there would be
# trained on one side and silently ignored on the other.
_REFUSED_TARGETS = ("lm_head", "embed_tokens")


def _default_targets() -> list[str]:
    return list(LLAMA_PROJECTIONS)


class LoraConfig(Section):
    """Low-rank adapters W + (alpha / rank) B A on `target_modules`, dropout 0.

    Dropout is not a setting: the learner's proximal logprobs must be the same deterministic
    policy the actors sampled from, and FSDP ranks compute different rows.
    """

    rank: int = 0  # 0: off (full fine-tuning)
    alpha: float = 16.0  # scale alpha / rank
    target_modules: list[str] = msgspec.field(default_factory=_default_targets)

    def __post_init__(self) -> None:
        if not 0 <= self.rank <= VLLM_MAX_RANKS[-1]:
            raise ValueError(f"rank must be in [0, {VLLM_MAX_RANKS[-1]}] (0: off)")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError("alpha must be a finite number > 0")
        if self.rank and not self.target_modules:
            raise ValueError("target_modules is empty but rank > 0")
        if len(set(self.target_modules)) != len(self.target_modules):
            raise ValueError("target_modules has duplicates")
        refused = sorted(set(self.target_modules) & set(_REFUSED_TARGETS))
        if refused:
            raise ValueError(f"target_modules may not include {', '.join(refused)}")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    def vllm_max_rank(self) -> int:
        """The smallest rank vLLM can reserve that holds this adapter."""
        return next(r for r in VLLM_MAX_RANKS if r >= self.rank)

    def peft_kwargs(self) -> dict[str, object]:
        """Keyword arguments of `peft.LoraConfig` (both roles build adapters from them)."""
        return {
            "r": self.rank,
            "lora_alpha": self.alpha,
            "target_modules": list(self.target_modules),
            "lora_dropout": 0.0,
            "bias": "none",
        }

"""The model, optimiser and trainer as the learner builds them: one home for the learner
process (`learner.loop`) and the offline replay (`learner.replay`), so both train the same."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from learner.distributed import ShardedTrainer, shard_model
from learner.lora import apply_lora, trainable_parameters
from learner.tiny_model import build_tiny_model
from learner.train import stability_settings
from learner.util import seed_everything
from shared.config import Config
from shared.models import model_dtype

log = logging.getLogger("learner")


class ModelMissing(RuntimeError):
    """No model at `[model] path` and building the tiny one is switched off."""


def build_trainer(cfg: Config) -> ShardedTrainer:
    """Seed every RNG from `[learner] seed`, load `[model] path` (building the tiny model
    there if missing and allowed) in float32 on CUDA if there is one (forward passes autocast to
    `[model] dtype`), shard it under torchrun,
    and wrap it with AdamW in the trainer `[learner]` configures (stability settings and lr
    schedule included). With `[learner.lora]` rank > 0 the model is a peft wrapper whose
    adapters alone train. The model, optimiser and schedule are `trainer.model`,
    `trainer.optimizer` and `trainer.scheduler`."""
    from transformers import AutoModelForCausalLM

    lc = cfg.learner
    seed_everything(lc.seed)
    path = Path(cfg.model.path)
    cfg.model.check_tiny_seed()
    if not (path / "config.json").exists():
        if not cfg.model.build_tiny_if_missing:
            raise ModelMissing(f"model not found at {path} (build_tiny_if_missing = false)")
        log.info("building the tiny model at %s", path)
        build_tiny_model(path, cfg.model.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # Weights and optimiser state stay float32; `[model] dtype` is the forward's autocast.
    # Any: transformers' decorated `.to` and `config` defeat a type checker.
    model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = model.to(device)
    if lc.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    dtype = model_dtype(cfg.model, path)
    log.info("model %s: forward in %s", path, dtype)
    if lc.lora.enabled:
        # Adapters before sharding: FSDP must see the final parameters (and which train).
        model = apply_lora(model, lc.lora)
        n_train = sum(p.numel() for p in trainable_parameters(model))
        log.info("LoRA rank %d: %d trainable parameters", lc.lora.rank, n_train)
    model = shard_model(model)  # FSDP2 under torchrun (learner.distributed), else as is
    # Only what trains: frozen base weights get no optimiser state (nor a checkpoint of it).
    params = trainable_parameters(model)
    opt = torch.optim.AdamW(params, lr=lc.lr, weight_decay=lc.weight_decay)
    pad_id = model.config.pad_token_id
    trainer = ShardedTrainer(
        model,
        opt,
        grad_clip=lc.grad_clip,
        # vLLM reports "processed" logprobs, i.e. after temperature scaling: match it.
        temperature=cfg.actor.temperature,
        top_k=cfg.actor.top_k,
        top_p=cfg.actor.top_p,
        pad_id=0 if pad_id is None else int(pad_id),
        micro_batch_tokens=lc.micro_batch_tokens,
        packing=lc.packing,
        autocast_dtype=None if dtype == "float32" else getattr(torch, dtype),
        ppo_epochs=lc.ppo_epochs,
        minibatches=lc.minibatches,
        correction=lc.correction,
        advantage=lc.advantage,
        weighting=lc.weighting,
        **stability_settings(lc, opt),
    )
    return trainer

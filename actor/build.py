"""What an actor plays episodes with, built from the config: the model's text format, the
vLLM engine, and `[actor]`'s sampling. The actor process (actor/runner.py) and held-out
evaluation (actor/evaluate.py) both build them here, so evaluation episodes are played exactly
as training episodes are.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, NamedTuple

from actor.chat import ChatFormat, chat_format
from actor.engine import Engine
from actor.envs.base import Env
from actor.episode import run_episode, special_prefix
from shared import protocol as P
from shared.affinity import pin_process
from shared.config import ActorConfig, Config, ModelConfig
from shared.lora_config import LoraConfig
from shared.models import model_dtype


class TextFormat(NamedTuple):
    """How observations become prompt tokens: the tokenizer, the special tokens it puts in
    front of a text, and `[model] chat_template` / `system_prompt` (None: raw text)."""

    tokenizer: Any
    prefix_ids: list[int]
    chat: ChatFormat | None


def text_format(mc: ModelConfig, path: str) -> TextFormat:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    chat = chat_format(tokenizer, mc.chat_template, mc.system_prompt)
    return TextFormat(tokenizer, special_prefix(tokenizer), chat)


def start_engine(
    cfg: Config, path: str, *, max_num_seqs: int, lora: LoraConfig | None = None
) -> Engine:
    """The vLLM engine for the model at `path` under `[model]` / `[actor]`; `lora` (default:
    the learner's `[learner.lora]` of the same TOML) with rank > 0 serves adapters. With
    `[actor] cpus` this process is pinned to those cores first, so the engine's processes,
    which inherit that, run there too (ValueError when a core is not available here)."""
    ac = cfg.actor
    pin_process(ac.cpus, "[actor] cpus")
    return Engine(
        path,
        seed=ac.seed,
        max_model_len=ac.max_model_len,
        max_num_seqs=max_num_seqs,
        kv_cache_gib=ac.kv_cache_gib,
        dtype=model_dtype(cfg.model, path),
        enforce_eager=ac.enforce_eager,
        gpu_memory_utilization=ac.gpu_memory_utilization,
        tensor_parallel_size=ac.tensor_parallel_size,
        cpus=ac.cpus,
        lora=cfg.learner.lora if lora is None else lora,
    )


def play_episode(
    engine: Engine,
    text: TextFormat,
    ac: ActorConfig,
    env: Env,
    lease: P.Lease,
    actor_id: str,
    seed: int | None = None,
) -> Coroutine[Any, Any, P.Trajectory]:
    """One episode of `env` under `[actor]`'s sampling settings; `seed`: vLLM sampling seeded
    per turn (evaluation), None: unseeded (training)."""
    return run_episode(
        engine,
        env,
        text.tokenizer,
        lease,
        actor_id,
        temperature=ac.temperature,
        top_p=ac.top_p,
        top_k=ac.top_k,
        max_model_len=ac.max_model_len,
        prefix_ids=text.prefix_ids,
        chat=text.chat,
        needs_text=getattr(env, "needs_text", False),
        seed=seed,
    )

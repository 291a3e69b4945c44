"""LoRA on real vLLM (`[learner.lora]`): the engine serves the learner's adapters in one slot,
its behaviour logprobs are the learner's (peft) policy's, and an adapter swapped in mid-generation
stamps exact token versions."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
import torch

from actor.engine import Engine, PolicyRejected
from learner.lora import apply_lora, publishable
from learner.publish import serialize_state_dict
from learner.train import Trainer
from shared.lora_config import LoraConfig

# One engine per module (it takes a minute to start): its tests share the loop it lives in.
pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

RANK = 8
# fp32 on CPU, same weights: vLLM's LoRA (punica torch ops) vs peft + the learner's kernel.
# Measured: at most 9.5e-7 over every test here (1-2 float32 ulps of logprobs near -5.5).
TOL = 2e-6


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(tiny_model):
    eng = Engine(
        str(tiny_model), seed=0, max_model_len=512, max_num_seqs=32, lora=LoraConfig(rank=RANK)
    )
    yield eng
    eng.shutdown()


def policy(base: Path, seed: int | None, rank: int = RANK) -> torch.nn.Module:
    """The learner's model: tiny Llama + peft adapter; `seed` None: as initialised (B = 0)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = apply_lora(AutoModelForCausalLM.from_pretrained(base), LoraConfig(rank=rank))
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if ".lora_B." in n:  # non-zero B: the adapter changes the policy
                    p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def current(tiny_model) -> dict[str, torch.nn.Module]:
    """The learner's model of the policy the engine serves now (version 0: B = 0)."""
    return {"model": policy(tiny_model, None)}


async def load(engine: Engine, model: torch.nn.Module, version: int, tmp: Path) -> dict:
    """Publish `model` as the learner does and load it into the engine as `version`."""
    tensors, kind, cfg = publishable(model, model.state_dict())
    assert kind == "lora"
    path = tmp / f"v{version}.safetensors"
    path.write_bytes(serialize_state_dict(tensors))
    return await engine.update_weights(str(path), version, cfg)


def learner_logprobs(model: torch.nn.Module, ids: list[int], start: int, **kw) -> np.ndarray:
    """logprob of ids[t] for t >= start as the learner recomputes it (decoder + kernel)."""
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.0), **kw)
    n = len(ids)
    with torch.no_grad():
        logp, _ = trainer.token_logprobs(
            torch.tensor([ids]),
            torch.ones(1, n, dtype=torch.long),
            torch.zeros(n - start, dtype=torch.long),
            torch.arange(start, n),
        )
    return logp.numpy()


async def test_version_0_is_the_zero_adapter_and_the_base_model(engine, tiny_model, current):
    from transformers import AutoModelForCausalLM

    assert engine.version == 0 and engine.lora_enabled
    prompt = [1, 10, 11, 12]
    out = await engine.generate(prompt, max_tokens=48, ignore_eos=True)
    assert out.versions == [0] * 48
    # the request ran through the LoRA slot (vLLM loaded the zero adapter for it)
    assert set(await engine.llm.list_loras()) == {1}
    ids = prompt + out.token_ids
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    for model in (base, current["model"]):  # the base model, and the learner's version 0
        err = np.max(np.abs(np.array(out.logprobs) - learner_logprobs(model, ids, len(prompt))))
        assert err < TOL, err


async def test_adapter_swap_mid_generation_stamps_exact_token_versions(
    engine, tiny_model, current, tmp_path
):
    # From version 0 (the zero adapter) to the first trained adapter: the requests in flight
    # must already run through the LoRA slot for the new adapter to reach them.
    old, new = current["model"], policy(tiny_model, seed=2)
    v_old = engine.version
    v_new = v_old + 1
    prompt = [1, 20, 21, 22]

    async def scenario():
        tasks = [
            asyncio.create_task(engine.generate(prompt, max_tokens=160, ignore_eos=True))
            for _ in range(4)
        ]
        # swap while every request is part-way through its generation
        while not engine._inflight or min(s.received for s in engine._inflight.values()) < 8:
            await asyncio.sleep(0.005)
        tensors, _, cfg = publishable(new, new.state_dict())
        path = tmp_path / "new.safetensors"
        path.write_bytes(serialize_state_dict(tensors))
        await engine.update_weights(str(path), v_new, cfg)
        return await asyncio.gather(*tasks)

    results = await scenario()
    current["model"] = new
    assert engine.version == v_new
    for r in results:
        k = r.versions.index(v_new)
        assert 0 < k < len(r.token_ids), "the swap must fall inside the generation"
        assert r.versions == [v_old] * k + [v_new] * (len(r.token_ids) - k)
        ids = prompt + r.token_ids
        lp = np.array(r.logprobs)
        old_ref = learner_logprobs(old, ids, len(prompt))
        new_ref = learner_logprobs(new, ids, len(prompt))
        # tokens before the offset were sampled by the old adapter, after it by the new one
        assert np.max(np.abs(lp[:k] - old_ref[:k])) < TOL
        assert np.max(np.abs(lp[k:] - new_ref[k:])) < TOL
        assert np.max(np.abs(lp[k:] - old_ref[k:])) > 1e-2


async def test_adapter_logprobs_match_the_learners_recomputation(
    engine, tiny_model, current, tmp_path
):
    model = policy(tiny_model, seed=1)
    phases = await load(engine, model, engine.version + 1, tmp_path)
    assert set(phases) == {"pause", "reload", "resume"}
    current["model"] = model
    prompt = [1, 10, 11, 12]
    base = policy(tiny_model, None)
    for top_k, top_p in ((0, 1.0), (8, 0.9)):
        out = await engine.generate(
            prompt, max_tokens=64, ignore_eos=True, top_k=top_k or -1, top_p=top_p
        )
        assert out.versions == [engine.version] * 64
        ids = prompt + out.token_ids
        lp = np.array(out.logprobs)
        ref = learner_logprobs(model, ids, len(prompt), top_k=top_k, top_p=top_p)
        assert np.max(np.abs(lp - ref)) < TOL, (top_k, top_p, np.max(np.abs(lp - ref)))
        # and the adapter matters: the base model's logprobs are far off
        off = learner_logprobs(base, ids, len(prompt), top_k=top_k, top_p=top_p)
        assert np.max(np.abs(lp - off)) > 1e-2


async def test_refused_policies_leave_the_served_adapter_in_place(
    engine, tiny_model, current, tmp_path
):
    v = engine.version
    full = tmp_path / "full.safetensors"
    full.write_bytes(serialize_state_dict({"lm_head.weight": torch.zeros(256, 64)}))
    with pytest.raises(PolicyRejected, match="LoRA adapter only"):
        await engine.update_weights(str(full), v + 1)
    # rank 16 does not fit the slot vLLM reserved (max_lora_rank 8): refused inside the pause
    with pytest.raises(PolicyRejected, match="refused"):
        await load(engine, policy(tiny_model, seed=3, rank=16), v + 1, tmp_path)
    assert engine.version == v
    prompt = [1, 30, 31, 32]
    out = await engine.generate(prompt, max_tokens=24, ignore_eos=True)
    assert out.versions == [v] * 24  # generation resumed, on the old adapter
    ref = learner_logprobs(current["model"], prompt + out.token_ids, len(prompt))
    assert np.max(np.abs(np.array(out.logprobs) - ref)) < TOL

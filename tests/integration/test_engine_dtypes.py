"""`[model] dtype` on real vLLM: the learner (float32 weights, forward autocast to the dtype)
recomputes the engine's behaviour logprobs to a tolerance measured per dtype.

Measured on this CPU (tiny model, 3 x 64 sampled tokens): float32 max |diff| 1e-6;
bfloat16 2.3e-3 (mean 6e-4); float16 3.9e-4 (mean 7e-5). On SmolLM2-135M the same check gives
max / mean float32 3.8e-5 / 7.6e-6, bfloat16 0.23 / 0.031, float16 0.058 / 0.0038 (README,
"Real models"): bfloat16 rounds the two stacks differently (vLLM keeps bfloat16 weights and
residuals, autocast float32 ones), so the importance ratio carries that noise; float16's 10
mantissa bits cut it several-fold."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actor.engine import Engine

pytestmark = pytest.mark.integration

# dtype -> (max, mean) tolerance of |vLLM logprob - learner logprob| per sampled token
TOLERANCE = {"bfloat16": (1e-2, 2e-3), "float16": (2e-3, 4e-4)}
# SmolLM2-135M, measured 0.23 / 0.031 (bfloat16) and 0.058 / 0.0038 (float16)
TOLERANCE_SMOLLM2 = {"bfloat16": (0.5, 0.07), "float16": (0.15, 0.01)}


@pytest.mark.parametrize("dtype", sorted(TOLERANCE))
async def test_learner_recomputes_vllm_logprobs_at_each_dtype(dtype, tiny_model) -> None:
    await _check(tiny_model, [1, 10, 11, 12], dtype, TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", sorted(TOLERANCE_SMOLLM2))
async def test_learner_recomputes_smollm2_logprobs_at_each_dtype(dtype, smollm2) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    question = [{"role": "user", "content": "What is 4 + 7? Reply with just the number."}]
    prompt = tok.apply_chat_template(question, add_generation_prompt=True, tokenize=True)
    ids = prompt if isinstance(prompt, list) else prompt["input_ids"]  # a BatchEncoding
    await _check(smollm2, [int(i) for i in ids], dtype, TOLERANCE_SMOLLM2[dtype])


async def _check(model_dir, prompt: list[int], dtype: str, tol: tuple[float, float]) -> None:
    from transformers import AutoModelForCausalLM

    from learner.train import Trainer

    eng = Engine(str(model_dir), seed=0, max_model_len=256, max_num_seqs=8, dtype=dtype)
    try:
        outs = [await eng.generate(prompt, max_tokens=64, ignore_eos=True) for _ in range(3)]
    finally:
        eng.shutdown()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = Trainer(
        model, torch.optim.SGD(model.parameters(), lr=0.0), autocast_dtype=getattr(torch, dtype)
    )
    d = np.concatenate(
        [np.abs(np.array(o.logprobs) - _recompute(trainer, prompt, o.token_ids)) for o in outs]
    )
    worst, mean = tol
    assert d.max() < worst and d.mean() < mean, (dtype, d.max(), d.mean())
    # the learner really ran in that dtype: its float32 recomputation differs
    plain = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.0))
    gen = outs[0].token_ids
    assert not np.array_equal(_recompute(plain, prompt, gen), _recompute(trainer, prompt, gen))


def _recompute(trainer, prompt: list[int], generated: list[int]) -> np.ndarray:
    ids = prompt + generated
    n = len(ids)
    with torch.no_grad():
        logp, _ = trainer.token_logprobs(
            torch.tensor([ids]),
            torch.ones(1, n, dtype=torch.long),
            torch.zeros(len(generated), dtype=torch.long),
            torch.arange(len(prompt), n),
        )
    return logp.numpy()

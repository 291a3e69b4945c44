"""`[model] dtype` on real vLLM: the learner (float32 weights, forward autocast to the dtype)
recomputes the engine's behaviour logprobs to a tolerance measured per dtype.

Measured on this CPU (tiny model, 3 x 64 sampled tokens): float32 max |diff| 1e-6;
bfloat16 2.3e-3 (mean 6e-4); float16 3.9e-4 (mean 7e-5). On SmolLM2-135M the same check gives
float32 7e-5 and bfloat16 0.18 max, 0.04 mean (README, "Real models"): bfloat16 rounds the
two stacks differently (vLLM keeps bfloat16 weights and residuals, autocast float32 ones), so
the importance ratio carries that noise; float16's 10 mantissa bits cut it several-fold."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actor.engine import Engine

pytestmark = pytest.mark.integration

# dtype -> (max, mean) tolerance of |vLLM logprob - learner logprob| per sampled token
TOLERANCE = {"bfloat16": (1e-2, 2e-3), "float16": (2e-3, 4e-4)}


@pytest.mark.parametrize("dtype", sorted(TOLERANCE))
async def test_learner_recomputes_vllm_logprobs_at_each_dtype(dtype, tiny_model) -> None:
    from transformers import AutoModelForCausalLM

    from learner.train import Trainer

    prompt = [1, 10, 11, 12]

    async def sample():
        eng = Engine(str(tiny_model), seed=0, max_model_len=256, max_num_seqs=8, dtype=dtype)
        try:
            return [await eng.generate(prompt, max_tokens=64, ignore_eos=True) for _ in range(3)]
        finally:
            eng.shutdown()

    outs = await sample()
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    trainer = Trainer(
        model, torch.optim.SGD(model.parameters(), lr=0.0), autocast_dtype=getattr(torch, dtype)
    )
    d = np.concatenate(
        [np.abs(np.array(o.logprobs) - _recompute(trainer, prompt, o.token_ids)) for o in outs]
    )
    worst, mean = TOLERANCE[dtype]
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

"""The actor's engine on real vLLM: token-in/token-out episodes and exact versions at a swap."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
import torch

from actor.engine import Engine
from actor.envs import make_env
from actor.episode import run_episode, special_prefix
from shared import protocol as P
from shared.protocol import Role

# One engine per module (it takes a minute to start): its tests share the loop it lives in.
pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(tiny_model):
    eng = Engine(str(tiny_model), seed=0, max_model_len=512, max_num_seqs=32)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def hf_logprobs(model_dir: Path | dict, base: Path, ids: list[int]) -> np.ndarray:
    """logprob of ids[t] given ids[:t] for t >= 1, computed by transformers in fp32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    if isinstance(model_dir, dict):
        model.load_state_dict(model_dir)
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    return np.concatenate([[0.0], lp.numpy()])


async def test_episode_tokens_are_prompt_plus_generated_plus_observations(engine, tokenizer):
    prompts: list[list[int]] = []
    real_generate = engine.generate

    async def recording_generate(prompt_ids, **kw):
        prompts.append(list(prompt_ids))
        return await real_generate(prompt_ids, **kw)

    engine.generate = recording_generate  # type: ignore[method-assign]
    try:
        task = P.TaskSpec(
            task_id="t",
            env="symbols",
            payload={"level": 2, "seed": 1, "n_turns": 3, "reasoning_tokens": 3},
        )
        lease = P.Lease(lease_id="L", task=task, group_size=1, deadline_s=60)
        env = make_env(task, 0)
        traj = await run_episode(
            engine,
            env,
            tokenizer,
            lease,
            "a",
            temperature=1.0,
            max_model_len=512,
            prefix_ids=special_prefix(tokenizer),
        )
    finally:
        engine.generate = real_generate  # type: ignore[method-assign]

    ids = traj.array("token_ids").tolist()
    roles = traj.array("role").tolist()
    mask = traj.array("loss_mask").tolist()
    # every turn's prompt is exactly the episode so far: nothing re-tokenized, no drift
    assert len(prompts) == 3
    for p in prompts:
        assert ids[: len(p)] == p
    first = special_prefix(tokenizer) + tokenizer.encode(
        f"turn sym{env.symbols[0]}", add_special_tokens=False
    )
    assert ids[: len(first)] == first and set(roles[: len(first)]) == {Role.PROMPT}
    # each turn: 3 reasoning tokens then 1 action token, all in the loss mask
    gen_roles = [r for r, m in zip(roles, mask, strict=True) if m]
    assert gen_roles == ([Role.REASONING] * 3 + [Role.ACTION]) * 3
    # observations between turns are the env's text, tokenized on its own
    obs_ids = [i for i, r in zip(ids, roles, strict=True) if r == Role.OBSERVATION]
    verdicts = ["ok" if t.reward else "no" for t in traj.turns[:2]]
    expected = []
    for k, v in enumerate(verdicts):
        expected += tokenizer.encode(f"{v} turn sym{env.symbols[k + 1]}", add_special_tokens=False)
    assert obs_ids == expected
    assert traj.array("turn_idx").tolist()[-1] == 2 and traj.n_turns == 3
    # behaviour logprobs are real logprobs of generated tokens, zero elsewhere
    lp = traj.array("behav_logprob")
    assert (lp[np.array(mask) == 1] < 0).all() and (lp[np.array(mask) == 0] == 0).all()


async def test_a_seeded_episode_samples_the_same_tokens_again(engine, tokenizer):
    """`headrace eval` seeds each episode (actor/evaluate.py): the same seed, the same
    episode, whatever else the engine is running; training episodes stay unseeded."""
    task = P.TaskSpec(task_id="t", env="symbols", payload={"level": 2, "seed": 1, "n_turns": 3})
    lease = P.Lease(lease_id="S", task=task, group_size=1, deadline_s=60)

    async def play(seed: int | None) -> list[int]:
        traj = await run_episode(
            engine,
            make_env(task, 0),
            tokenizer,
            lease,
            "a",
            temperature=1.0,
            max_model_len=256,
            prefix_ids=special_prefix(tokenizer),
            seed=seed,
        )
        return traj.array("token_ids").tolist()

    async def both() -> tuple[list[list[int]], list[list[int]]]:
        seeded = await asyncio.gather(*(play(7) for _ in range(4)), *(play(None) for _ in range(4)))
        return list(seeded[:4]), list(seeded[4:])

    seeded, unseeded = await both()
    assert all(ids == seeded[0] for ids in seeded)
    assert len({tuple(ids) for ids in unseeded}) > 1  # unseeded: they differ (temperature 1)


async def test_behaviour_logprobs_match_transformers(engine, tiny_model):
    out = await engine.generate([1, 10, 11, 12], max_tokens=24, ignore_eos=True)
    ids = [1, 10, 11, 12] + out.token_ids
    ref = hf_logprobs(tiny_model, tiny_model, ids)[4:]
    # vLLM's processed logprobs (temperature 1) vs the learner's stack, fp32 on CPU
    assert np.max(np.abs(np.array(out.logprobs) - ref)) < 1e-4


async def test_learner_recomputes_vllm_behaviour_logprobs_to_1e_6(engine, tiny_model):
    """Same weights, fp32, CPU: the learner's recomputation (decoder + chunked logprob kernel)
    agrees with vLLM's sampled-token logprobs to ~1e-6, so a ratio pi/mu away from 1 means
    the policies differ, not the two stacks."""
    from transformers import AutoModelForCausalLM

    from learner.train import Trainer

    prompt = [1, 10, 11, 12]
    model = AutoModelForCausalLM.from_pretrained(tiny_model, torch_dtype=torch.float32)
    # plain sampling, then truncated sampling (the learner applies the same top-k / top-p)
    for top_k, top_p in ((0, 1.0), (8, 0.9)):
        out = await engine.generate(
            prompt, max_tokens=64, ignore_eos=True, top_k=top_k or -1, top_p=top_p
        )
        ids = prompt + out.token_ids
        trainer = Trainer(
            model, torch.optim.SGD(model.parameters(), lr=0.0), top_k=top_k, top_p=top_p
        )
        n = len(ids)
        with torch.no_grad():
            logp, _ = trainer.token_logprobs(
                torch.tensor([ids]),
                torch.ones(1, n, dtype=torch.long),
                torch.zeros(n - len(prompt), dtype=torch.long),
                torch.arange(len(prompt), n),
            )
        assert np.max(np.abs(np.array(out.logprobs) - logp.numpy())) < 5e-6, (top_k, top_p)


async def test_swap_mid_generation_stamps_exact_token_versions(engine, tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file

    old = load_file(str(tiny_model / "model.safetensors"))
    gen = torch.Generator().manual_seed(1)
    new = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in old.items()}
    path = tmp_path / "v1.safetensors"
    save_file(new, str(path))
    prompt = [1, 20, 21, 22]

    async def scenario():
        tasks = [
            asyncio.create_task(engine.generate(prompt, max_tokens=160, ignore_eos=True))
            for _ in range(4)
        ]
        # swap while every request is part-way through its generation
        while not engine._inflight or min(s.received for s in engine._inflight.values()) < 8:
            await asyncio.sleep(0.005)
        await engine.update_weights(str(path), version=1)
        return await asyncio.gather(*tasks)

    results = await scenario()
    assert engine.version == 1
    for r in results:
        k = r.versions.index(1)
        assert 0 < k < len(r.token_ids), "the swap must fall inside the generation"
        assert r.versions == [0] * k + [1] * (len(r.token_ids) - k)
        ids = prompt + r.token_ids
        lp = np.array(r.logprobs)
        old_ref = hf_logprobs(tiny_model, tiny_model, ids)[len(prompt) :]
        new_ref = hf_logprobs(new, tiny_model, ids)[len(prompt) :]
        # tokens before the offset were sampled by the old weights, after it by the new ones
        assert np.max(np.abs(lp[:k] - old_ref[:k])) < 1e-3
        assert np.max(np.abs(lp[k:] - new_ref[k:])) < 1e-3
        assert np.max(np.abs(lp[k:] - old_ref[k:])) > 1e-2


async def test_published_weights_load_from_the_reused_shared_memory_buffer(engine, tiny_model):
    """The actor's real path: WeightPublisher -> fetch_weights into one WeightBuffer, reused
    for two versions (the second one in bfloat16, half the bytes) -> update_weights."""
    from safetensors.torch import load_file

    from actor.weights import WeightBuffer, fetch_weights
    from learner.publish import WeightPublisher

    old = load_file(str(tiny_model / "model.safetensors"))
    pub = WeightPublisher("tcp://127.0.0.1:0", chunk_bytes=1 << 16)
    pub.start()
    prompt = [1, 30, 31, 32]
    try:
        with WeightBuffer() as buf:
            for step, scale in ((1, 0.03), (2, -0.04)):
                gen = torch.Generator().manual_seed(step)
                new = {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in old.items()}
                if step == 2:
                    pub.dtype = torch.bfloat16
                    new = {k: v.bfloat16().float() for k, v in new.items()}
                version = engine.version + 1
                manifest = pub.publish(version, new)
                path = await fetch_weights(pub.endpoint, manifest, "test", buffer=buf)
                assert path == buf.path and Path(path).stat().st_size == manifest.total_bytes
                await engine.update_weights(path, version)
                out = await engine.generate(prompt, max_tokens=12, ignore_eos=True)
                assert out.versions == [version] * 12
                ref = hf_logprobs(new, tiny_model, prompt + out.token_ids)[len(prompt) :]
                assert np.max(np.abs(np.array(out.logprobs) - ref)) < 1e-3
    finally:
        await pub.aclose()

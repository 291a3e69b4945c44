"""A multi-turn episode of SmolLM2-135M-Instruct on real vLLM with its ChatML template:
each turn's prompt is the episode so far, generation stops at <|im_end|>, the template's
tokens carry role `template` and loss 0, and a generation cut by its budget ends the episode
as `max_tokens` with a truncated turn."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from actor.chat import chat_format
from actor.engine import Engine
from actor.envs.base import Env, Generation, GenerationLimits, ParsedAction, StepResult
from actor.episode import run_episode
from shared import protocol as P
from shared.protocol import Role

pytestmark = pytest.mark.integration


class TwoTurns(Env):
    """Asks for something short, then once more; rewards any non-empty answer."""

    name = "two_turns"
    max_turns = 2
    needs_text = True

    def __init__(self, prompt: str, max_tokens: int) -> None:
        self.prompt, self.max_tokens, self.seen = prompt, max_tokens, []

    async def reset(self) -> str:
        return self.prompt

    def limits(self) -> GenerationLimits:
        return GenerationLimits(max_tokens=self.max_tokens)

    def parse_action(self, gen: Generation) -> ParsedAction:
        text = "".join(gen.text_pieces)
        self.seen.append(text)
        return ParsedAction(text, (0, len(gen.token_ids)), bool(text.strip()))

    async def step(self, action: ParsedAction) -> StepResult:
        return StepResult("Say it once more, in other words.", float(action.valid), False)


async def _episodes(model: Path, envs: list[TwoTurns]):
    tok = AutoTokenizer.from_pretrained(model)
    chat = chat_format(tok, "auto", "You are brief.")
    assert chat is not None and chat.prefix_problem is None
    prompts: list[list[int]] = []

    async def main():
        eng = Engine(str(model), seed=0, max_model_len=512, max_num_seqs=8)
        real = eng.generate

        async def recording(ids, **kw):
            prompts.append(list(ids))
            assert chat.stop_token_ids[0] in kw["stop_token_ids"]
            return await real(ids, **kw)

        eng.generate = recording  # type: ignore[method-assign]
        try:
            lease = P.Lease(
                lease_id="L",
                task=P.TaskSpec(task_id="t", env="two_turns", payload={}),
                group_size=len(envs),
                deadline_s=60,
            )
            coros = [
                run_episode(eng, e, tok, lease, "a", temperature=0.7, max_model_len=512, chat=chat)
                for e in envs
            ]
            return await asyncio.gather(*coros)
        finally:
            eng.shutdown()

    return tok, chat, prompts, await main()


async def test_chat_episodes_on_smollm2(smollm2) -> None:
    envs = [TwoTurns("Say hello in one short sentence.", 64) for _ in range(3)]
    envs.append(TwoTurns("Count from 1 to 100, separated by commas.", 6))
    envs.append(TwoTurns("Repeat after me: " + "la " * 600, 16))  # over max_model_len
    tok, chat, prompts, trajs = await _episodes(smollm2, envs)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    overflow = trajs.pop()
    for traj in trajs:
        ids = traj.array("token_ids").tolist()
        roles = traj.array("role").tolist()
        mask = traj.array("loss_mask").tolist()
        opening = chat.opening("Say hello in one short sentence.")
        if traj is not trajs[-1]:
            assert ids[: len(opening.ids)] == opening.ids
        # the template's tokens are outside the loss
        assert Role.TEMPLATE in roles
        assert all(m == 0 for r, m in zip(roles, mask, strict=True) if r == Role.TEMPLATE)
    # every prompt vLLM saw is a prefix of its episode: nothing re-rendered, nothing dropped
    episodes = [t.array("token_ids").tolist() for t in trajs]
    assert all(any(e[: len(p)] == p for e in episodes) for p in prompts)
    stopped = [t for t in trajs[:3] if t.termination == P.Termination.MAX_TURNS]
    assert stopped, [t.termination for t in trajs]
    for t in stopped:  # two turns, each ended by <|im_end|>, which is trained (loss 1)
        ids, mask = t.array("token_ids").tolist(), t.array("loss_mask").tolist()
        ends = [k for k, i in enumerate(ids) if i == im_end and mask[k] == 1]
        assert len(ends) == 2 and t.n_turns == 2
        assert mask[-1] == 1 and ids[-1] == im_end
        turn_two = chat.follow_up(ids[: ends[0] + 1], "Say it once more, in other words.")
        assert ids[ends[0] + 1 : ends[0] + 1 + len(turn_two.ids)] == turn_two.ids
    # the parser never sees the stop token
    assert all("<|im_end|>" not in s for e in envs for s in e.seen)
    # six tokens cannot count to 100: the turn is truncated and unscored, the episode cut
    cut = trajs[-1]
    assert cut.termination == P.Termination.MAX_TOKENS
    assert cut.n_turns == 1 and cut.turns[0].truncated and cut.turns[0].reward == 0.0
    assert sum(cut.array("loss_mask")) == 6
    # a prompt longer than max_model_len is a clean end, not an engine error
    assert overflow.termination == P.Termination.MAX_TOKENS and overflow.n_turns == 0
    assert len(overflow.array("token_ids")) == 512

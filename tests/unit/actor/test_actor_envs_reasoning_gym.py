"""The reasoning-gym adapter, offline: tasks from the bank, answers parsed, scored, retried."""

from __future__ import annotations

import numpy as np
import pytest

from actor.engine import GenResult
from actor.envs import make_env
from actor.envs.base import EnvError, Generation
from actor.envs.reasoning_gym_env import RETRY, ReasoningGymEnv, find_answer
from actor.episode import run_episode
from broker.curriculum.gym_banks import RG_PRESETS, ReasoningGymBank
from shared import protocol as P
from shared.config import EnvConfig, ReasoningGymConfig
from shared.protocol import Role


def bank(**kw) -> ReasoningGymBank:
    rg = ReasoningGymConfig(tasks_per_family=1000, **kw)
    return ReasoningGymBank(EnvConfig(name="reasoning_gym", reasoning_gym=rg))


def pieces(text: str, width: int = 3) -> Generation:
    """`text` as a generation of `width`-character tokens."""
    parts = [text[i : i + width] for i in range(0, len(text), width)]
    return Generation(token_ids=list(range(len(parts))), text_pieces=parts)


async def started(task: P.TaskSpec) -> tuple[ReasoningGymEnv, str]:
    env = make_env(task, 0)
    assert isinstance(env, ReasoningGymEnv)
    return env, await env.reset()


async def test_every_preset_builds_offline_and_scores_its_own_answer() -> None:
    b = bank()
    assert {f.name.split(".")[0] for f in b.families()} == set(RG_PRESETS)
    for fam in b.families():
        for index in (0, 999):
            env, prompt = await started(b.task(f"rg-{fam.name}-{index}"))
            answer = str(env.entry["answer"])
            assert prompt.startswith(str(env.entry["question"]).rstrip())
            assert prompt.rstrip().endswith("Answer:")
            right = await env.step(env.parse_action(pieces(f"so\nAnswer: {answer}")))
            assert (right.reward, right.done, right.state_key != "") == (1.0, True, True)
            assert env.success([right.reward])
            env, _ = await started(b.task(f"rg-{fam.name}-{index}"))
            wrong = await env.step(env.parse_action(pieces("Answer: bananas")))
            assert (wrong.reward, wrong.done) == (0.0, True) and not env.success([wrong.reward])


async def test_task_is_the_same_question_everywhere_and_survives_the_wire() -> None:
    t = bank().task("rg-chain_sum.hard-17")
    a, _ = await started(t)
    b, _ = await started(bank().task("rg-chain_sum.hard-17"))
    assert a.entry["question"] == b.entry["question"] and a.entry["answer"] == b.entry["answer"]
    lease = P.Lease(lease_id="L", task=t, group_size=1, deadline_s=1.0)
    wire = P.decode(P.encode(P.TaskGrant(leases=[lease])))
    c, _ = await started(wire.leases[0].task)  # type: ignore[union-attr]
    assert c.entry == a.entry
    other, _ = await started(bank().task("rg-chain_sum.hard-18"))
    assert other.entry["question"] != a.entry["question"]


async def test_answer_parsing_and_token_span() -> None:
    env, _ = await started(bank().task("rg-gcd.easy-0"))
    gen = Generation(
        token_ids=[1, 2, 3, 4, 5, 6],
        text_pieces=["Let me think.", "\nAns", "wer", ": ", "42", "</s>"],
    )
    parsed = env.parse_action(gen)
    assert (parsed.action, parsed.span, parsed.valid) == ("42", (4, 5), True)
    # the last marker wins; the answer ends at its line; no marker: the last non-blank line
    assert env.parse_action(pieces("answer: 1\nANSWER:  7 \nbye")).action == "7"
    assert env.parse_action(pieces("I think\n 12 \n\n")).action == "12"
    assert env.parse_action(pieces("Answer:\n5")).action == "5"
    for empty in ("", "  \n", "Answer: <|im_end|>"):
        p = env.parse_action(pieces(empty))
        assert not p.valid and p.span[0] == p.span[1]
    assert find_answer("x<|eot_id|>\n") == (0, 1)


async def test_try_again_gives_feedback_until_solved() -> None:
    env, _ = await started(bank(max_turns=3).task("rg-leg_counting.easy-3"))
    answer = str(env.entry["answer"])
    first = await env.step(env.parse_action(pieces("Answer: -1")))
    assert (first.observation, first.reward, first.done) == (RETRY, 0.0, False)
    invalid = await env.step(env.parse_action(pieces("")))
    assert (invalid.observation, invalid.done) == (RETRY, False)
    assert invalid.state_key != first.state_key  # attempts used is part of the state
    last = await env.step(env.parse_action(pieces(f"Answer: {answer}")))
    assert (last.reward, last.done) == (1.0, True)
    assert env.success([first.reward, invalid.reward, last.reward])


async def test_try_again_ends_at_max_turns_unsolved() -> None:
    env, _ = await started(bank(max_turns=2).task("rg-gcd.hard-3"))
    rewards = []
    for _ in range(2):
        res = await env.step(env.parse_action(pieces("Answer: 0")))
        rewards.append(res.reward)
    assert res.done and rewards == [0.0, 0.0] and not env.success(rewards)


async def test_broken_tasks_are_env_errors() -> None:
    with pytest.raises(EnvError):
        make_env(P.TaskSpec(task_id="x", env="reasoning_gym", payload={}), 0)
    env = make_env(P.TaskSpec(task_id="x", env="reasoning_gym", payload={"dataset": "nope"}), 0)
    with pytest.raises(EnvError):
        await env.reset()


class CharTokenizer:
    """One token per character: decode(encode(x)) == x, so spans are easy to check."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)


class ScriptedEngine:
    version = 3

    def __init__(self, replies: list[str]) -> None:
        self.replies = list(replies)

    async def generate(self, prompt: list[int], *, max_tokens: int, **_: object) -> GenResult:
        ids = [ord(c) for c in self.replies.pop(0)][:max_tokens]
        return GenResult(ids, [-0.5] * len(ids), [self.version] * len(ids), "stop")


async def test_full_episode_through_the_actor_loop() -> None:
    task = bank(max_turns=3).task("rg-chain_sum.easy-5")
    probe, _ = await started(task)
    answer = str(probe.entry["answer"])
    lease = P.Lease(lease_id="L", task=task, group_size=1, deadline_s=60)
    env = make_env(task, 0)
    traj = await run_episode(
        ScriptedEngine(["hmm\nAnswer: 1000", f"sorry.\nAnswer: {answer}"]),
        env,
        CharTokenizer(),
        lease,
        "a",
        temperature=1.0,
        max_model_len=4096,
        prefix_ids=(),
        needs_text=env.needs_text,
    )
    assert traj.termination == P.Termination.DONE and traj.success and traj.n_turns == 2
    assert [t.reward for t in traj.turns] == [0.0, 1.0]
    ids, role = traj.array("token_ids"), traj.array("role")
    acted = "".join(chr(i) for i in ids[role == Role.ACTION])
    assert acted == "1000" + answer
    assert RETRY in "".join(chr(i) for i in ids[role == Role.OBSERVATION])
    assert np.all(traj.array("loss_mask")[role == Role.ACTION] == 1)


@pytest.mark.parametrize("partial_credit", [True, False])
async def test_partial_credit_can_be_turned_off(partial_credit: bool) -> None:
    """chain_sum pays part of a point for a reply that merely contains the right number (a
    policy can drift towards long digit strings for it); without partial credit only the
    right answer scores, and it still scores 1."""
    b = bank(answer="first_number", partial_credit=partial_credit)
    env, _ = await started(b.task("rg-chain_sum.easy-5"))
    answer = str(env.entry["answer"]).lstrip("-")
    padded = await env.step(env.parse_action(pieces(f"{answer}{answer}000")))
    assert (padded.reward > 0) is partial_credit and padded.reward < 1
    env, _ = await started(b.task("rg-chain_sum.easy-5"))
    right = await env.step(env.parse_action(pieces(str(env.entry["answer"]))))
    assert right.reward == 1.0

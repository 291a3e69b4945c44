"""`run_episode` against a scripted engine (tests/unit/actor/fakes.py): what an episode
records per token and per turn is what the learner trains on. (tests/integration/test_engine.py
plays episodes on a real vLLM engine.)"""

from __future__ import annotations

import numpy as np
import pytest

from actor.engine import EngineDead
from actor.episode import run_episode
from learner.tiny_model import build_tokenizer
from shared import protocol as P
from shared.protocol import Role
from shared.synthetic import TINY_VOCAB_SIZE
from shared.validation import Limits, check_trajectory
from tests.unit.actor.fakes import FakeEngine, ToolEnv, logprobs_of

LEASE = P.Lease(
    lease_id="lease-7",
    task=P.TaskSpec(task_id="tool-0", env="tool", family="f", difficulty=1.0, payload={}),
    group_size=4,
    deadline_s=30.0,
    sample_prob=0.5,
    curator_version=3,
)
REPLIES = [[10, 11, 12, 14], [20, 21, 22, 23], [30, 31, 32, 36]]  # calls end even, odd, even


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


async def play(engine: FakeEngine, env: ToolEnv, tok, max_model_len: int = 128, **kw):
    return await run_episode(
        engine, env, tok, LEASE, "actor-1", temperature=1.0, max_model_len=max_model_len, **kw
    )


def arrays(t: P.Trajectory) -> dict[str, list]:
    return {name: t.array(name).tolist() for name in P.TOKEN_ARRAYS}


async def test_every_token_records_its_id_logprob_role_turn_and_version(tok) -> None:
    engine = FakeEngine(REPLIES)
    traj = await play(engine, ToolEnv({"max_turns": 3}), tok)

    opening = tok.encode("task : choose one", add_special_tokens=False)
    result = tok.encode("ok turn", add_special_tokens=False)  # the tool's answer
    # token in, token out: the prompt, each generation as sampled, each tool result between
    # them; none after the last turn, which no generation reads
    segments = [opening, REPLIES[0], result, REPLIES[1], result, REPLIES[2]]
    a = arrays(traj)
    assert a["token_ids"] == [i for s in segments for i in s]
    gen = [Role.REASONING] * 2 + [Role.ACTION] * 2  # the env's action span is the last two
    roles = [[Role.PROMPT] * len(opening), gen, [Role.OBSERVATION] * len(result)]
    roles += [gen, [Role.OBSERVATION] * len(result), gen]
    assert a["role"] == [int(r) for s in roles for r in s]
    # only sampled tokens are trained: the prompt and the tool's results are masked out
    generated = [0, 1, 0, 1, 0, 1]
    assert a["loss_mask"] == [g for s, g in zip(segments, generated, strict=True) for _ in s]
    assert a["behav_logprob"] == pytest.approx(
        [
            lp
            for s, g in zip(segments, generated, strict=True)
            for lp in (logprobs_of(s) if g else [0.0] * len(s))
        ]
    )
    turns = [0, 0, 1, 1, 2, 2]
    assert a["turn_idx"] == [t for s, t in zip(segments, turns, strict=True) for _ in s]
    assert a["policy_version"] == [0] * len(a["token_ids"])

    # each turn's prompt is the episode so far, never re-tokenized text
    n = [len(opening), len(opening) + 4 + len(result), len(opening) + 8 + 2 * len(result)]
    assert engine.prompts == [a["token_ids"][:k] for k in n]

    assert [(x.reward, x.done, x.state_key, x.action) for x in traj.turns] == [
        (1.0, False, "t0", "14"),
        (0.0, False, "t1", "23"),
        (1.0, True, "t2", "36"),
    ]
    assert traj.n_turns == 3 and traj.termination == P.Termination.DONE
    assert traj.outcome_reward == pytest.approx(2 / 3) and not traj.success
    assert (traj.group_id, traj.lease_id, traj.task_id) == ("lease-7", "lease-7", "tool-0")
    assert (traj.sample_prob, traj.curator_version, traj.actor_id) == (0.5, 3, "actor-1")
    limits = Limits(vocab_size=TINY_VOCAB_SIZE, max_tokens=128, policy_version=0)
    assert check_trajectory(traj, limits) is None


async def test_a_weight_swap_mid_episode_stamps_each_token_with_its_policy(tok) -> None:
    engine = FakeEngine(REPLIES)
    engine.swap_at = (2, 1)  # v1 arrives after two tokens of the first generation
    traj = await play(engine, ToolEnv({"max_turns": 2}), tok)
    v, mask = traj.array("policy_version"), traj.array("loss_mask")
    n_open = len(tok.encode("task : choose one", add_special_tokens=False))
    assert v[:n_open].tolist() == [0] * n_open  # the prompt, under the policy it was sent to
    assert v[n_open : n_open + 4].tolist() == [0, 0, 1, 1]
    assert (v[n_open + 4 :] == 1).all()  # the tool's answer and the next turn: all v1
    assert np.all(np.diff(v) >= 0)  # an actor only moves to newer weights
    assert mask.sum() == 8


async def test_a_tool_error_ends_the_episode_as_env_error(tok) -> None:
    traj = await play(FakeEngine(REPLIES), ToolEnv({"max_turns": 3, "env_error_at": 1}), tok)
    assert traj.termination == P.Termination.ENV_ERROR
    assert not traj.success
    assert traj.n_turns == 1  # the turn whose tool call failed is not recorded
    assert traj.array("loss_mask").sum() == 8  # both generations are kept


@pytest.mark.parametrize("error", [RuntimeError("CUDA error"), EngineDead("engine process died")])
async def test_an_engine_error_ends_the_episode_without_a_trajectory(tok, error) -> None:
    """The actor, not the episode, decides what an engine failure means (test_actor_runner)."""
    engine = FakeEngine(REPLIES)
    engine.fail = error
    with pytest.raises(type(error)):
        await play(engine, ToolEnv(), tok)


async def test_a_generation_cut_by_its_budget_is_truncated_and_unscored(tok) -> None:
    # A tool-call env that stops on EOS: a reply that runs out of tokens instead is cut short.
    env = ToolEnv({"max_turns": 3, "ignore_eos": False})
    traj = await play(FakeEngine([[10, 11, 12, 14, 16]]), env, tok)
    assert traj.termination == P.Termination.MAX_TOKENS
    (turn,) = traj.turns
    assert turn.truncated and turn.reward == 0.0 and not turn.action_valid
    assert traj.array("loss_mask").sum() == 4


async def test_an_episode_never_outgrows_max_model_len(tok) -> None:
    n_open = len(tok.encode("task : choose one", add_special_tokens=False))
    engine = FakeEngine(REPLIES)
    traj = await play(engine, ToolEnv({"max_turns": 3}), tok, max_model_len=n_open + 6)
    assert traj.n_tokens == n_open + 6
    assert traj.termination == P.Termination.MAX_TOKENS
    assert [c["max_tokens"] for c in engine.calls] == [4]  # the tool result fills the rest


async def test_sampling_settings_and_the_evaluation_seed_reach_the_engine(tok) -> None:
    engine = FakeEngine(REPLIES)
    traj = await play(engine, ToolEnv({"max_turns": 2}), tok, top_p=0.9, top_k=0, seed=100)
    assert [c["seed"] for c in engine.calls] == [100, 101]  # one per turn: repeatable
    assert all(c["top_k"] == -1 and c["top_p"] == 0.9 for c in engine.calls)  # 0: vLLM's off
    assert all(c["ignore_eos"] and c["max_tokens"] == 4 for c in engine.calls)
    assert traj.sampling == {"temperature": 1.0, "top_p": 0.9, "top_k": 0.0}

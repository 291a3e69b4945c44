"""The TextArena adapter, offline: scripted games from the bank, played to the end."""

from __future__ import annotations

import random

import numpy as np

from actor.engine import GenResult
from actor.envs import make_env
from actor.envs.base import Generation, StepResult
from actor.envs.textarena_env import TextArenaEnv
from actor.episode import run_episode
from broker.curriculum.gym_banks import TA_PRESETS, TextArenaBank
from shared import protocol as P
from shared.config import EnvConfig, TextArenaConfig
from shared.protocol import Role


def bank(**kw) -> TextArenaBank:
    games = sorted(TA_PRESETS)
    ta = TextArenaConfig(games=games, tasks_per_family=500, **kw)
    return TextArenaBank(EnvConfig(name="textarena", textarena=ta))


def said(text: str) -> Generation:
    parts = [text[i : i + 2] for i in range(0, len(text), 2)]  # 2-character "tokens"
    return Generation(token_ids=list(range(len(parts))), text_pieces=parts)


async def started(task_id: str, **kw) -> tuple[TextArenaEnv, str]:
    env = make_env(bank(**kw).task(task_id), 0)
    assert isinstance(env, TextArenaEnv)
    return env, await env.reset()


async def move(env: TextArenaEnv, text: str) -> StepResult:
    return await env.step(env.parse_action(said(text)))


async def test_guess_the_number_by_bisection() -> None:
    env, prompt = await started("ta-guess_the_number.medium-7")
    assert "between 1 and 20" in prompt
    lo, hi, results, keys = 1, 20, [], []
    while True:
        guess = (lo + hi) // 2
        parsed = env.parse_action(said(f"Halfway is {guess}, so [{guess}]"))
        assert parsed.valid and parsed.action == f"[{guess}]"
        res = await env.step(parsed)
        results.append(res)
        keys.append(res.state_key)
        if res.done:
            break
        assert res.reward == 0.0 and ("higher" in res.observation or "lower" in res.observation)
        lo, hi = (guess + 1, hi) if "higher" in res.observation else (lo, guess - 1)
    assert results[-1].reward == 1.0 and env.success([r.reward for r in results])
    assert len(results) <= 5 and len(set(keys)) == len(keys)  # every guess changes the state
    # another episode of the same task starts in the same state
    again, _ = await started("ta-guess_the_number.medium-7")
    assert (await move(again, "[1]")).state_key == keys[0]


async def test_tower_of_hanoi_scripted_solution() -> None:
    env, prompt = await started("ta-tower_of_hanoi.easy-0")
    assert "A: [3, 2, 1]" in prompt
    rewards = []
    for src, dst in ["AC", "AB", "CB", "AC", "BA", "BC", "AC"]:
        res = await move(env, f"I move the top disk: [{src} {dst}]")
        rewards.append(res.reward)
    assert res.done and rewards == [0.0] * 6 + [1.0] and env.success(rewards)


async def test_mastermind_feedback_and_only_the_last_bracket_is_the_move() -> None:
    env, _ = await started("ta-mastermind.medium-3")
    gen = said("not [9 9] but [1 2 3 4]")
    parsed = env.parse_action(gen)
    assert parsed.action == "[1 2 3 4]"
    assert "".join(gen.text_pieces[slice(*parsed.span)]) == "[1 2 3 4]"
    res = await env.step(parsed)
    assert "black peg" in res.observation and not res.done


async def test_invalid_moves_are_submitted_and_the_game_decides() -> None:
    env, _ = await started("ta-guess_the_number.easy-1")
    parsed = env.parse_action(said("no idea"))
    assert not parsed.valid and parsed.span[0] == parsed.span[1]
    first = await env.step(parsed)
    assert not first.done and "invalid move" in first.observation.lower()
    second = await move(env, "still no idea")  # TextArena allows one retry per turn
    assert second.done and second.info["invalid_move"] == 1.0
    assert not env.success([first.reward, second.reward])


async def test_games_are_seeded_per_task_and_leave_global_random_alone() -> None:
    random.seed(123)
    before = random.getstate()
    a, _ = await started("ta-guess_the_number.hard-4")
    b, _ = await started("ta-guess_the_number.hard-4")
    await move(a, "[50]")  # interleaved episodes of one task see the same secret
    await move(b, "[50]")
    assert a.game.game_number == b.game.game_number
    assert random.getstate() == before
    secrets = {
        (await started(f"ta-guess_the_number.hard-{i}"))[0].game.game_number for i in range(8)
    }
    assert len(secrets) > 1


async def test_turn_cap_truncates_a_game_in_progress() -> None:
    env, _ = await started("ta-guess_the_number.hard-2", max_turns=2)
    assert env.max_turns == 2
    secret = env.game.game_number
    wrong = [g for g in (1, 2, 3) if g != secret]
    assert not (await move(env, f"[{wrong[0]}]")).truncated
    res = await move(env, f"[{wrong[1]}]")
    assert res.truncated and not res.done and res.reward == 0.0


class CharTokenizer:
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)


class BisectingEngine:
    """Plays Guess The Number from the hints in its own context, like a policy would."""

    version = 1

    async def generate(self, prompt: list[int], *, max_tokens: int, **_: object) -> GenResult:
        lo, hi, last = 1, 10, 0
        for line in "".join(chr(i) for i in prompt).split("\n"):
            if line.startswith("my guess: ["):
                last = int(line[line.rindex("[") + 1 : line.rindex("]")])
            elif line.startswith("The target number is"):
                lo, hi = (last + 1, hi) if "higher" in line else (lo, last - 1)
        ids = [ord(c) for c in f"\nmy guess: [{(lo + hi) // 2}]\n"]
        return GenResult(ids, [-1.0] * len(ids), [self.version] * len(ids), "stop")


async def test_full_episode_through_the_actor_loop() -> None:
    task = bank().task("ta-guess_the_number.easy-9")
    env = make_env(task, 0)
    lease = P.Lease(lease_id="L", task=task, group_size=1, deadline_s=60)
    traj = await run_episode(
        BisectingEngine(),
        env,
        CharTokenizer(),
        lease,
        "a",
        temperature=1.0,
        max_model_len=8192,
        prefix_ids=(),
        needs_text=env.needs_text,
    )
    assert traj.termination == P.Termination.DONE and traj.success
    assert traj.turns[-1].reward == 1.0 and all(t.state_key for t in traj.turns)
    ids, role = traj.array("token_ids"), traj.array("role")
    moves = "".join(chr(i) for i in ids[role == Role.ACTION])
    assert moves == "".join(t.action for t in traj.turns)


async def test_an_observation_past_max_model_len_is_clipped_and_no_generated_token_lost() -> None:
    """An episode never exceeds max_model_len (the broker refuses longer ones): the tail of an
    observation that overflows is cut, every generated token stays."""
    task = bank().task("ta-guess_the_number.easy-9")

    async def play(max_len: int) -> P.Trajectory:
        env = make_env(task, 0)
        lease = P.Lease(lease_id="L", task=task, group_size=1, deadline_s=60)
        return await run_episode(
            BisectingEngine(),
            env,
            CharTokenizer(),
            lease,
            "a",
            temperature=1.0,
            max_model_len=max_len,
            prefix_ids=(),
            needs_text=env.needs_text,
        )

    full = await play(8192)
    mask = full.array("loss_mask")
    n_first = int((full.array("turn_idx")[mask > 0] == 0).sum())  # generated in turn 0
    first_gen_end = int(np.flatnonzero(mask)[0]) + n_first
    clipped = await play(first_gen_end + 3)  # 3 characters into the first observation
    assert clipped.n_tokens == first_gen_end + 3
    assert clipped.termination == P.Termination.MAX_TOKENS
    assert (clipped.array("token_ids") == full.array("token_ids")[: first_gen_end + 3]).all()
    assert clipped.array("loss_mask").sum() == n_first

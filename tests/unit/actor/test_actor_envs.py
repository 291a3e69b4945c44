from __future__ import annotations

import pytest

from actor.envs import REGISTRY, make_env
from actor.envs.base import EnvError, Generation, char_span_to_token_span
from shared import protocol as P
from shared.symbols import correct_choice


def task(level=1, seed=3, n_turns=3, r=4, k=4):
    payload = {
        "level": level,
        "seed": seed,
        "n_turns": n_turns,
        "reasoning_tokens": r,
        "n_choices": k,
    }
    return P.TaskSpec(task_id="t", env="symbols", payload=payload)


async def play(env, actions):
    obs = [await env.reset()]
    rewards = []
    for a in actions:
        gen = Generation(token_ids=[0] * env.reasoning_tokens + [a], text_pieces=[])
        parsed = env.parse_action(gen)
        assert parsed.span == (env.reasoning_tokens, env.reasoning_tokens + 1)
        res = await env.step(parsed)
        obs.append(res.observation)
        rewards.append(res.reward)
        if res.done:
            break
    return obs, rewards


async def test_correct_actions_score_and_wrong_ones_do_not():
    env = make_env(task(level=2), 0)
    right = [correct_choice(2, s, t, 4) for t, s in enumerate(env.symbols)]
    obs, rewards = await play(make_env(task(level=2), 0), right)
    assert rewards == [1.0, 1.0, 1.0]
    assert obs[0].startswith("turn sym") and obs[1].startswith("ok turn sym")
    wrong = [(c + 1) % 4 + 4 * 7 for c in right]  # token ids mapping to other choices
    _, rewards = await play(make_env(task(level=2), 0), wrong)
    assert rewards == [0.0, 0.0, 0.0]


def test_task_seed_fixes_the_symbols_for_every_episode_of_a_group():
    assert make_env(task(seed=5), 0).symbols == make_env(task(seed=5), 7).symbols


def test_short_generation_is_an_invalid_action():
    env = make_env(task(), 0)
    parsed = env.parse_action(Generation(token_ids=[1, 2], text_pieces=[]))
    assert not parsed.valid


def test_char_span_maps_to_covering_tokens():
    pieces = ["I ", "think", " <a>", "42", "</a>"]
    text = "".join(pieces)
    start = text.index("42")
    assert char_span_to_token_span(pieces, start, start + 2) == (3, 4)
    assert char_span_to_token_span(pieces, text.index("<a>"), len(text)) == (2, 5)


def test_registry_names_every_bank_environment() -> None:
    assert set(REGISTRY) == {"symbols", "reasoning_gym", "textarena"}
    with pytest.raises(EnvError):
        make_env(P.TaskSpec(task_id="t", env="nope"), 0)
    # text-parsing environments ask the actor to decode generated tokens; symbols does not
    assert not getattr(make_env(task(), 0), "needs_text", False)
    for name, payload in [("reasoning_gym", {"dataset": "gcd"}), ("textarena", {"game": "x"})]:
        assert make_env(P.TaskSpec(task_id="t", env=name, payload=payload), 0).needs_text

"""The `symbols` env's tool delay: fixed or long-tailed (lognormal), seeded per episode, with
`[env.symbols] step_delay_s` as its mean, and carried from the config through the bank."""

from __future__ import annotations

import asyncio
import statistics

import pytest

from actor.envs import make_env
from actor.envs.base import Generation
from actor.envs.symbols import SymbolsEnv, step_delays
from broker.curriculum.banks import SymbolsBank
from shared.config import ConfigError, EnvConfig, SymbolsConfig, load_config


def _pooled(mean_s: float, sigma: float, episodes: int = 4000, turns: int = 5) -> list[float]:
    return [
        d
        for task in range(episodes // 8)
        for k in range(8)
        for d in step_delays(mean_s, "lognormal", sigma, 1000 + task, k, turns)
    ]


def test_lognormal_delays_repeat_per_episode_and_differ_between_episodes() -> None:
    a = step_delays(0.2, "lognormal", 1.0, task_seed=7, episode_seed=3, n=6)
    assert a == step_delays(0.2, "lognormal", 1.0, task_seed=7, episode_seed=3, n=6)
    assert a != step_delays(0.2, "lognormal", 1.0, task_seed=7, episode_seed=4, n=6)
    assert a != step_delays(0.2, "lognormal", 1.0, task_seed=8, episode_seed=3, n=6)
    assert len(set(a)) == 6 and all(d > 0 for d in a)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 1.5])
def test_lognormal_delays_have_the_configured_mean_and_a_long_tail(sigma: float) -> None:
    xs = sorted(_pooled(0.2, sigma))
    assert statistics.fmean(xs) == pytest.approx(0.2, rel=0.08)
    median, p99 = xs[len(xs) // 2], xs[int(0.99 * len(xs))]
    # lognormal: p99 / median = exp(2.326 sigma), i.e. 3.2, 10.2, 32.7
    assert p99 / median > 0.8 * 2.718281828 ** (2.326 * sigma)
    assert max(xs) > 4 * 0.2  # some calls take many times the mean


def test_fixed_and_zero_delays() -> None:
    assert step_delays(0.3, "fixed", 1.0, 1, 2, 3) == [0.3, 0.3, 0.3]
    assert step_delays(0.0, "lognormal", 1.0, 1, 2, 3) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="unknown step_delay_dist 'pareto'"):
        step_delays(0.3, "pareto", 1.0, 1, 2, 3)


def test_the_bank_carries_the_distribution_and_each_step_awaits_its_draw(monkeypatch) -> None:
    sy = SymbolsConfig(levels=[1], n_turns=3, step_delay_s=0.25, step_delay_dist="lognormal")
    task = SymbolsBank(EnvConfig(seed=0, symbols=sy)).tasks[5]
    assert task.payload["step_delay_dist"] == "lognormal"
    env = make_env(task, episode_seed=2)
    assert isinstance(env, SymbolsEnv)
    want = step_delays(0.25, "lognormal", 1.0, int(task.payload["seed"]), 2, 3)
    assert env.step_delays == want

    slept: list[float] = []

    async def sleep(s: float) -> None:  # records what the env awaits instead of waiting it
        slept.append(s)

    monkeypatch.setattr(asyncio, "sleep", sleep)

    async def play() -> None:
        await env.reset()
        done = False
        while not done:
            gen = Generation([5] * (env.reasoning_tokens + 1), [])
            done = (await env.step(env.parse_action(gen))).done

    asyncio.run(play())
    assert slept == want


def test_a_fixed_delay_leaves_the_payload_as_it_was() -> None:
    sy = SymbolsConfig(levels=[1], step_delay_s=0.2)
    payload = SymbolsBank(EnvConfig(symbols=sy)).tasks[0].payload
    assert payload["step_delay_s"] == 0.2
    assert "step_delay_dist" not in payload and "step_delay_sigma" not in payload


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (
            'step_delay_dist = "pareto"',
            r"step_delay_dist must be one of fixed, lognormal, not 'pareto'"
            r" - at `\$\.env\.symbols\.step_delay_dist`",
        ),
        ("step_delay_sigma = 0.0", r"step_delay_sigma must be in \(0, 4\], got 0.0"),
        ("step_delay_s = -0.1", r"step_delay_s must be >= 0"),
    ],
)
def test_a_bad_delay_setting_is_a_one_line_config_error(tmp_path, text: str, match: str) -> None:
    p = tmp_path / "c.toml"
    p.write_text(f"[env.symbols]\n{text}\n")
    with pytest.raises(ConfigError, match=match) as e:
        load_config(p)
    assert "\n" not in str(e.value)

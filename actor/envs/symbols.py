"""`symbols`: the built-in multi-turn environment, learnable by a tiny random model on CPU.

Each turn shows a symbol (`turn sym12`). The agent writes `reasoning_tokens` free tokens and
then an action of `action_tokens` tokens (a short "word"); the last token of the word decides:
the answer is its id modulo `n_choices`, the tokens before it are free. The right answer is a
function of the symbol (shared/symbols.py has the rules and the levels), so the reward depends
on the actions only and a random policy starts at 1/n_choices per turn: every GRPO group
carries signal from the first step. With `reward = "turn"` each turn is rewarded and the next
observation says whether the last answer was right; with `reward = "pass"` only the last turn
is rewarded (1 when every answer was right) and no verdict is shown.

Every `step` may await a tool delay (`[env.symbols] step_delay_s`, the mean): fixed, or drawn
from a long-tailed lognormal (`step_delay_dist = "lognormal"`, `step_delay_sigma`) seeded by
the task and the episode's index in its group, so the same run waits the same.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Sequence

from actor.envs.base import Env, Generation, GenerationLimits, ParsedAction, StepResult
from shared import symbols as S


def step_delays(
    mean_s: float, dist: str, sigma: float, task_seed: int, episode_seed: int, n: int
) -> list[float]:
    """The tool delays of an episode's `n` steps, in seconds.

    "fixed": `mean_s` each. "lognormal": exp(N(mu, sigma^2)) with mu = ln(mean_s) - sigma^2/2,
    so the mean is `mean_s` whatever `sigma`, and the median exp(-sigma^2/2) of it: most
    calls return quickly and a few take many times the mean. Seeded by (task, episode index):
    the same episode waits the same in every run, whichever process plays it.
    """
    if mean_s <= 0 or n <= 0:
        return [0.0] * max(0, n)
    if dist == "fixed":
        return [mean_s] * n
    if dist != "lognormal":
        raise ValueError(f"unknown step_delay_dist {dist!r} (known: fixed, lognormal)")
    # a str seed is hashed with SHA-512 by `random`: stable across processes and hash seeds
    rng = random.Random(f"symbols-step-delay:{task_seed}:{episode_seed}")
    mu = math.log(mean_s) - sigma * sigma / 2
    return [rng.lognormvariate(mu, sigma) for _ in range(n)]


class SymbolsEnv(Env):
    name = "symbols"

    def __init__(self, payload: dict, episode_seed: int) -> None:
        self.level = int(payload.get("level", 1))
        self.n_choices = int(payload.get("n_choices", 4))
        self.max_turns = int(payload.get("n_turns", 3))
        self.reasoning_tokens = int(payload.get("reasoning_tokens", 4))
        self.action_tokens = max(1, int(payload.get("action_tokens", 1)))
        self.sparse = str(payload.get("reward", "turn")) == "pass"
        self.map_seed = int(payload.get("map_seed", 0))
        self.task_seed = int(payload.get("seed", 0))
        self.episode_seed = episode_seed  # the noise level and the tool delays use it
        shown = str(payload.get("symbols", "")).split()
        # The bank sends the symbols; a payload without them (older banks) derives them from
        # the task seed. Every episode of a group sees the same task either way.
        self.symbols = [int(s) for s in shown] or S.task_symbols(
            self.level, self.task_seed, self.max_turns, self.n_choices, map_seed=self.map_seed
        )
        self.max_turns = len(self.symbols)
        # A tool call's latency per `step` ([env.symbols] step_delay_*, via the bank's payload;
        # absent: none). Drawn up front: the episode's delays do not depend on its actions.
        self.step_delays = step_delays(
            float(payload.get("step_delay_s", 0.0)),
            str(payload.get("step_delay_dist", "fixed")),
            float(payload.get("step_delay_sigma", 1.0)),
            self.task_seed,
            episode_seed,
            self.max_turns,
        )
        self.right: list[bool] = []
        self.turn = 0

    def _show(self) -> str:
        return f"turn sym{self.symbols[self.turn]}"

    async def reset(self) -> str:
        self.turn = 0
        self.right = []
        return self._show()

    def limits(self) -> GenerationLimits:
        return GenerationLimits(
            max_tokens=self.reasoning_tokens + self.action_tokens, ignore_eos=True
        )

    def parse_action(self, gen: Generation) -> ParsedAction:
        start, end = self.reasoning_tokens, self.reasoning_tokens + self.action_tokens
        if len(gen.token_ids) < end:
            return ParsedAction(action="", span=(len(gen.token_ids),) * 2, valid=False)
        return ParsedAction(action=str(gen.token_ids[end - 1] % self.n_choices), span=(start, end))

    def state_key(self) -> str:
        return f"t{self.turn}:sym{self.symbols[self.turn]}"

    def want(self) -> int:
        if self.level == S.NOISE_LEVEL:
            return S.noise_choice(self.task_seed, self.episode_seed, self.turn, self.n_choices)
        sym = self.symbols[self.turn]
        return S.correct_choice(self.level, sym, self.turn, self.n_choices, self.map_seed)

    async def step(self, action: ParsedAction) -> StepResult:
        delay = self.step_delays[self.turn] if self.turn < len(self.step_delays) else 0.0
        if delay > 0:
            await asyncio.sleep(delay)
        key = self.state_key()
        right = action.valid and int(action.action) == self.want()
        self.right.append(right)
        self.turn += 1
        done = self.turn >= self.max_turns
        if self.sparse:
            reward = float(done and all(self.right))
            obs = "end" if done else self._show()
        else:
            reward = float(right)
            verdict = "ok" if right else "no"
            obs = verdict if done else f"{verdict} {self._show()}"
        return StepResult(observation=obs, reward=reward, done=done, state_key=key)

    def success(self, rewards: Sequence[float]) -> bool:
        if self.sparse:
            return bool(rewards) and rewards[-1] > 0
        return bool(rewards) and min(rewards) > 0

    def outcome(self, rewards: Sequence[float]) -> float:
        if self.sparse:
            return float(self.success(rewards) and len(rewards) == self.max_turns)
        return super().outcome(rewards)

"""`symbols`: the built-in multi-turn environment, learnable by a tiny random model on CPU.

Each turn shows a symbol (`turn sym12`). The agent writes `reasoning_tokens` free tokens and
then one action token; the action is that token's id modulo `n_choices`. The correct choice is
a fixed function of the symbol (and, at higher levels, of the turn), so the reward depends on
the actions only and a random policy starts at 1/n_choices per turn: every GRPO group carries
signal from the first step. The next observation says whether the last action was right.

Levels (task difficulty):
  1: 2 distinct symbols,  choice = sym % K
  2: 8 distinct symbols,  choice = sym % K
  3: 16 distinct symbols, choice = (sym + turn) % K
  4: 32 distinct symbols, choice = (3 * sym + 1) % K
"""

from __future__ import annotations

import asyncio
import random

from actor.envs.base import Env, Generation, GenerationLimits, ParsedAction, StepResult

N_SYMBOLS = {1: 2, 2: 8, 3: 16, 4: 32}


def correct_choice(level: int, sym: int, turn: int, n_choices: int) -> int:
    if level == 3:
        return (sym + turn) % n_choices
    if level >= 4:
        return (3 * sym + 1) % n_choices
    return sym % n_choices


class SymbolsEnv(Env):
    name = "symbols"

    def __init__(self, payload: dict, episode_seed: int) -> None:
        self.level = int(payload.get("level", 1))
        self.n_choices = int(payload.get("n_choices", 4))
        self.max_turns = int(payload.get("n_turns", 3))
        self.reasoning_tokens = int(payload.get("reasoning_tokens", 4))
        # A tool call's latency, awaited in every `step` ([env] step_delay_s, via the actor).
        self.step_delay_s = float(payload.get("step_delay_s", 0.0))
        # The task seed fixes the symbol sequence: every episode of a group sees the same task.
        rng = random.Random(int(payload.get("seed", 0)))
        n_sym = N_SYMBOLS.get(self.level, 32)
        self.symbols = [rng.randrange(n_sym) for _ in range(self.max_turns)]
        self.turn = 0
        del episode_seed  # deterministic task; sampling randomness comes from the engine

    def _show(self) -> str:
        return f"turn sym{self.symbols[self.turn]}"

    async def reset(self) -> str:
        self.turn = 0
        return self._show()

    def limits(self) -> GenerationLimits:
        return GenerationLimits(max_tokens=self.reasoning_tokens + 1, ignore_eos=True)

    def parse_action(self, gen: Generation) -> ParsedAction:
        if len(gen.token_ids) < self.reasoning_tokens + 1:
            return ParsedAction(action="", span=(len(gen.token_ids),) * 2, valid=False)
        i = self.reasoning_tokens
        return ParsedAction(action=str(gen.token_ids[i] % self.n_choices), span=(i, i + 1))

    def state_key(self) -> str:
        return f"t{self.turn}:sym{self.symbols[self.turn]}"

    async def step(self, action: ParsedAction) -> StepResult:
        if self.step_delay_s > 0:
            await asyncio.sleep(self.step_delay_s)
        key = self.state_key()
        want = correct_choice(self.level, self.symbols[self.turn], self.turn, self.n_choices)
        right = action.valid and int(action.action) == want
        self.turn += 1
        done = self.turn >= self.max_turns
        verdict = "ok" if right else "no"
        obs = verdict if done else f"{verdict} {self._show()}"
        return StepResult(observation=obs, reward=float(right), done=done, state_key=key)

    def success(self, rewards) -> bool:
        return bool(rewards) and min(rewards) > 0

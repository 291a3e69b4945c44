"""`dataset`: one row of a dataset, answered by the model and scored by a user's function.

The task payload (broker/curriculum/dataset_bank.py) carries the row as JSON text and the
import paths of the reward function and the optional step hook:

    def score(completion: str, row: dict) -> float            # or `async def`
    def step(completion: str, row: dict, turn: int) -> str | None

The opening is the row's `prompt` (a user message under a chat template) or its `messages`
(the conversation as given). Each turn the whole reply (without the template's end-of-turn
token) is the completion; `score` rates it. With `step` and `[env] max_turns` > 1 the hook
then returns the next user message, or None to end the episode. The episode's reward is the
last turn's score; success means it is at least 1. A reply that runs out of `max_tokens`
before its end-of-turn token is not scored (truncated), unless `[env] fixed_length` asks for
replies of exactly that many tokens.

A reward or step function that raises (or returns something that is not a finite number)
fails the environment, not the agent: the episode ends with termination `env_error`.
Functions run on the actor's event loop: make a slow one `async`.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
from collections.abc import Callable
from typing import Any

from shared.env_api import EnvError, GenerationLimits, Opening, ParsedAction, StepResult, TextEnv
from shared.env_loader import EnvLoadError, load_function


async def call_user(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)`, awaited when it is async (or returns an awaitable)."""
    result = fn(*args)
    if inspect.isawaitable(result):
        result = await result
    return result


def _load(path: str, what: str) -> Callable[..., Any]:
    try:
        return load_function(path, what)
    except EnvLoadError as e:
        raise EnvError(str(e)) from e


class DatasetEnv(TextEnv):
    name = "dataset"

    def __init__(self, payload: dict, episode_seed: int, options: dict | None = None) -> None:
        super().__init__(payload, episode_seed, options)
        try:
            self.row: dict[str, Any] = json.loads(str(payload["row"]))
            self.reward_path = str(payload["reward"])
            self.step_path = str(payload.get("step", ""))
            self.max_turns = max(1, int(payload.get("max_turns", 1)))
            self.budget = int(payload.get("max_tokens", self.max_tokens))
            self.fixed_length = bool(int(payload.get("fixed_length", 0)))
        except (KeyError, TypeError, ValueError) as e:
            raise EnvError(f"dataset: bad task payload: {e!r}") from None
        if not self.step_path:
            self.max_turns = 1  # nothing would say what comes after the first reply
        self.turn = 0
        self.key = hashlib.blake2b(str(payload["row"]).encode(), digest_size=8).hexdigest()

    def limits(self) -> GenerationLimits:
        return GenerationLimits(max_tokens=self.budget, ignore_eos=self.fixed_length)

    async def reset(self) -> Opening:
        self.turn = 0
        self.score_fn = _load(self.reward_path, "reward function")
        self.step_fn = _load(self.step_path, "step function") if self.step_path else None
        prompt = self.row.get("prompt")
        if prompt is not None:
            return str(prompt)
        return [{"role": m["role"], "content": m["content"]} for m in self.row["messages"]]

    async def step(self, action: ParsedAction) -> StepResult:
        turn = self.turn
        self.turn += 1
        completion = action.action
        try:
            reward = await call_user(self.score_fn, completion, self.row)
        except Exception as e:
            raise EnvError(f"reward function {self.reward_path} raised {e!r}") from e
        if isinstance(reward, bool) or not isinstance(reward, int | float):
            raise EnvError(f"reward function {self.reward_path} returned {reward!r}, not a number")
        if not math.isfinite(reward):
            raise EnvError(f"reward function {self.reward_path} returned {reward}")
        nxt = None
        if self.step_fn is not None and self.turn < self.max_turns:
            try:
                nxt = await call_user(self.step_fn, completion, self.row, turn)
            except Exception as e:
                raise EnvError(f"step function {self.step_path} raised {e!r}") from e
            if nxt is not None and not isinstance(nxt, str):
                raise EnvError(f"step function {self.step_path} returned {nxt!r}, not text")
        return StepResult(
            observation=nxt or "",
            reward=float(reward),
            done=nxt is None,
            state_key=f"{self.key}:t{turn}",
        )

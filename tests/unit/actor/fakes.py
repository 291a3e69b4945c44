"""Test doubles for the actor's unit tests: an engine without vLLM, a broker client without a
broker, and a small tool-use environment.

`FakeEngine` implements what `actor.episode.run_episode` and `actor.runner.Actor` call on
`actor.engine.Engine`: `generate` (token ids in; ids, logprobs, per-token policy versions and a
finish reason out), `version`, `dead`, `lora_enabled`, `update_weights`, `shutdown`. Its replies
are scripted, so a test knows every token an episode must record.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from typing import Any

from actor.engine import GenResult
from actor.envs.base import (
    Env,
    EnvError,
    Generation,
    GenerationLimits,
    ParsedAction,
    StepResult,
)
from shared import protocol as P


def logprobs_of(ids: Sequence[int]) -> list[float]:
    """The logprob the fake engine reports for each sampled id (distinct per id, < 0)."""
    return [-i / 1000 for i in ids]


class FakeEngine:
    """Scripted generations: reply `i` of `replies` answers the `i`-th `generate` (cut at
    `max_tokens`), then `filler` repeated. `fail` is raised by the next `generate`; with
    `hold` set, `generate` waits for it (an episode still generating); `swap_at = (offset,
    version)` swaps the weights during the next generation after `offset` tokens, as
    `Engine.update_weights` does to requests in flight."""

    def __init__(self, replies: Sequence[Sequence[int]] = (), *, filler: int = 40) -> None:
        self.version = 0
        self.dead = False
        self.lora_enabled = False
        self.replies = deque(list(r) for r in replies)
        self.filler = filler
        self.fail: BaseException | None = None
        self.hold: asyncio.Event | None = None
        self.swap_at: tuple[int, int] | None = None
        self.prompts: list[list[int]] = []
        self.calls: list[dict[str, Any]] = []

    async def generate(
        self,
        prompt_ids: list[int],
        *,
        max_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = -1,
        stop_token_ids: list[int] | None = None,
        ignore_eos: bool = False,
        seed: int | None = None,
    ) -> GenResult:
        self.prompts.append(list(prompt_ids))
        self.calls.append(
            dict(
                max_tokens=max_tokens,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                stop_token_ids=list(stop_token_ids or []),
                ignore_eos=ignore_eos,
                seed=seed,
            )
        )
        if self.hold is not None:
            await self.hold.wait()
        await asyncio.sleep(0)  # a real generation yields to the other episodes
        if self.fail is not None:
            raise self.fail
        ids = self.replies.popleft() if self.replies else [self.filler] * max_tokens
        finish = "stop"
        stops = [i for i, t in enumerate(ids) if t in (stop_token_ids or [])]
        if stops:
            ids = ids[: stops[0] + 1]
        if len(ids) >= max_tokens:
            ids, finish = ids[:max_tokens], "length"
        versions = [self.version] * len(ids)
        if self.swap_at is not None:
            offset, self.version = self.swap_at
            versions[offset:] = [self.version] * len(versions[offset:])
            self.swap_at = None
        return GenResult(list(ids), logprobs_of(ids), versions, finish)

    async def update_weights(
        self, path: str, version: int, adapter_config: dict[str, Any] | None = None
    ) -> dict[str, float]:
        self.version = version
        return {}

    def shutdown(self) -> None:
        self.dead = True


class FakeClient:
    """The broker side of `shared.transport.Client` the actor uses: `grants` are what `recv`
    returns, in order (then it times out, as a silent broker does); `sent` is what it sent."""

    def __init__(self, grants: Sequence[P.TaskGrant] = ()) -> None:
        self.grants = deque(grants)
        self.sent: list[P.Base] = []

    async def recv(self, kind: type, timeout: float | None = None) -> Any:
        if self.grants:
            return self.grants.popleft()
        await asyncio.sleep(timeout or 0)
        raise TimeoutError

    async def send(self, msg: P.Base) -> None:
        self.sent.append(msg)

    def close(self) -> None:
        pass


class RecordingOutbox:
    """Keeps what the actor hands to its outbox (the real one sends it to the broker)."""

    def __init__(self) -> None:
        self.items: list[P.Trajectory] = []

    def put(self, traj: P.Trajectory) -> None:
        self.items.append(traj)

    def __len__(self) -> int:
        return len(self.items)


class ToolEnv(Env):
    """A multi-turn tool-use task over the tiny model's words: each turn the agent writes
    `reasoning` free tokens, then an `action`-token call; the tool's result comes back as the
    next observation ("ok turn"). Reward 1 for a call whose last token is even. Payload keys:
    those, `max_turns`, `ignore_eos`, and `env_error_at` (the tool fails at that turn). Also
    loadable by name, as a user's environment: "tests.unit.actor.fakes:ToolEnv"."""

    name = "tool"

    def __init__(
        self, payload: dict[str, Any] | None = None, episode_seed: int = 0, options=None
    ) -> None:
        super().__init__(payload or {}, episode_seed, options)
        p = self.payload
        self.max_turns = int(p.get("max_turns", 3))
        self.reasoning, self.action = int(p.get("reasoning", 2)), int(p.get("action", 2))
        self.ignore_eos = bool(p.get("ignore_eos", True))
        self.env_error_at = p.get("env_error_at")
        self.turn = 0

    async def reset(self) -> str:
        self.turn = 0
        return "task : choose one"

    def limits(self) -> GenerationLimits:
        return GenerationLimits(max_tokens=self.reasoning + self.action, ignore_eos=self.ignore_eos)

    def parse_action(self, gen: Generation) -> ParsedAction:
        start, end = self.reasoning, self.reasoning + self.action
        if len(gen.token_ids) < end:
            return ParsedAction(action="", span=(len(gen.token_ids),) * 2, valid=False)
        return ParsedAction(action=str(gen.token_ids[end - 1]), span=(start, end))

    async def step(self, action: ParsedAction) -> StepResult:
        if self.turn == self.env_error_at:
            raise EnvError("the tool is down")
        key = f"t{self.turn}"
        self.turn += 1
        reward = float(action.valid and int(action.action) % 2 == 0)
        done = self.turn >= self.max_turns
        return StepResult(observation="ok turn", reward=reward, done=done, state_key=key)

"""The environment API: what an environment implements, for the actor and the broker alike.

This is the public place a user's environment module imports from (`from shared.env_api
import TextEnv, Task, ...`); `actor/envs/base.py` re-exports it for the built-in envs. It is
pure Python so the broker can import a user's module for its tasks without torch or vLLM.

An environment is async (it may call tools or remote services) and multi-turn. Each turn the
actor shows the model the episode so far, the model generates reasoning tokens followed by an
action, the environment's parser marks which generated tokens are the action, and `step` scores
that action. Observations are text; the actor tokenizes only the new observation and appends it
to the episode's token ids, so nothing is ever re-tokenized.

A user's environment (`[env] name = "pkg.module:Name"`, README "Train on your own task") is
one class: `tasks(options)` yields its tasks on the broker, an instance plays one episode of
one task on the actor. `TextEnv` gives text tasks (the whole reply is the answer) defaults for
everything but `reset` and `step`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

# A task's payload travels in `TaskSpec.payload` (msgpack): flat, str / int / float values.
# Richer data goes as JSON text in one field.
Payload = dict[str, str | int | float]
# What `reset` may return: the first observation as text (a user message under a chat
# template), or the opening conversation as chat messages ({"role", "content"} dicts).
Opening = str | list[dict[str, str]]


class EnvError(RuntimeError):
    """The environment failed (not the agent): the episode ends with termination env_error."""


@dataclass
class Generation:
    """What the model produced in one turn, token-aligned."""

    token_ids: list[int]
    text_pieces: list[str]  # decoded text of each token, for char-span parsers

    @property
    def text(self) -> str:
        return "".join(self.text_pieces)


@dataclass
class ParsedAction:
    action: str
    span: tuple[int, int]  # [start, end) offsets into Generation.token_ids
    valid: bool = True


@dataclass
class StepResult:
    observation: str
    reward: float
    done: bool
    truncated: bool = False
    state_key: str = ""  # a hashable description of the state the action was taken in
    # With a chat template: the message role the observation arrives as, "user" or "tool"
    role: str = "user"
    info: dict[str, float] = field(default_factory=dict)


@dataclass
class GenerationLimits:
    max_tokens: int
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False


@dataclass
class Task:
    """One task a user's environment yields on the broker (`Env.tasks`).

    `payload` is what the actor's episode gets (flat str / int / float values; nest JSON text
    for rows). It must carry everything the episode needs: actors may run on other machines
    than the broker, so a row index into a file only the broker has is not enough.
    """

    payload: Payload
    family: str = "default"
    difficulty: float = 0.0


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


class Env(ABC):
    """One episode of one task. Created per episode by the env registry.

    Built-in environments take `(payload, episode_seed)`; a user's environment is built with
    `(payload, episode_seed, options)` (`[env.options]`), which this constructor stores.
    """

    name: str = ""
    max_turns: int = 1
    needs_text: bool = False  # the actor decodes each generated token for `parse_action`

    def __init__(
        self, payload: Mapping[str, Any], episode_seed: int = 0, options: Mapping | None = None
    ) -> None:
        self.payload = dict(payload)
        self.episode_seed = episode_seed
        self.options = dict(options or {})

    # ------------------------------------------------------------------ broker side

    @classmethod
    def tasks(cls, options: Mapping[str, Any]) -> Iterable[Task | Payload]:
        """The training tasks (called once, on the broker, with `[env.options]`): `Task`s or
        bare payload dicts (family "default"). Needed by user environments only."""
        raise NotImplementedError(f"{cls.__name__}.tasks(options) yields no tasks")

    @classmethod
    def heldout_tasks(cls, options: Mapping[str, Any]) -> Iterable[Task | Payload] | None:
        """Tasks training never leases, for evaluation; None: `[env] eval_fraction` of
        `tasks` is held out instead."""
        return None

    # ------------------------------------------------------------------ actor side

    @abstractmethod
    async def reset(self) -> Opening:
        """Start the episode; return the first observation (the prompt), or the opening
        conversation as chat messages."""

    @abstractmethod
    def limits(self) -> GenerationLimits:
        """How much the model may generate this turn."""

    @abstractmethod
    def parse_action(self, gen: Generation) -> ParsedAction:
        """Find the action in this turn's generation."""

    @abstractmethod
    async def step(self, action: ParsedAction) -> StepResult:
        """Apply the action; return the next observation and the turn's reward."""

    def success(self, rewards: Sequence[float]) -> bool:
        return bool(rewards) and min(rewards) > 0

    def outcome(self, rewards: Sequence[float]) -> float:
        """The episode's reward from its turn rewards: by default their sum over the turn
        limit (a turn never played counts 0). Environments that reward only the final turn
        (try again, games) return that turn's reward instead."""
        return sum(rewards) / self.max_turns if self.max_turns else 0.0


class TextEnv(Env):
    """A text environment: each turn the model replies, and the whole reply (without the
    chat template's end-of-turn token) is the action. Implement `reset` and `step`.

    The generation budget per turn is `max_tokens` (the class attribute, or the payload's or
    `[env.options]`'s `max_tokens`). The episode's reward is the last turn's reward and
    success means it is at least `success_threshold`.
    """

    needs_text = True
    max_tokens: int = 256
    success_threshold: float = 1.0

    def limits(self) -> GenerationLimits:
        n = self.payload.get("max_tokens", self.options.get("max_tokens", self.max_tokens))
        return GenerationLimits(max_tokens=int(n if n is not None else self.max_tokens))

    def parse_action(self, gen: Generation) -> ParsedAction:
        return ParsedAction(action=gen.text, span=(0, len(gen.token_ids)))

    def outcome(self, rewards: Sequence[float]) -> float:
        return float(rewards[-1]) if rewards else 0.0

    def success(self, rewards: Sequence[float]) -> bool:
        return bool(rewards) and rewards[-1] >= self.success_threshold


def char_span_to_token_span(pieces: Sequence[str], start: int, end: int) -> tuple[int, int]:
    """Map a character span of the concatenated pieces onto the tokens that cover it."""
    pos, first, last = 0, None, None
    for i, piece in enumerate(pieces):
        nxt = pos + len(piece)
        if first is None and nxt > start:
            first = i
        if nxt >= end and first is not None:
            last = i + 1
            break
        pos = nxt
    if first is None:
        return len(pieces), len(pieces)
    return first, last if last is not None else len(pieces)


__all__ = [
    "Env",
    "EnvError",
    "Generation",
    "GenerationLimits",
    "Opening",
    "ParsedAction",
    "Payload",
    "StepResult",
    "Task",
    "TextEnv",
    "Tokenizer",
    "char_span_to_token_span",
]

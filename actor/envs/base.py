"""The environment API the actor drives.

An environment is async (it may call tools or remote services) and multi-turn. Each turn the
actor shows the model the episode so far, the model generates reasoning tokens followed by an
action, the environment's parser marks which generated tokens are the action, and `step` scores
that action. Observations are text; the actor tokenizes only the new observation and appends it
to the episode's token ids, so nothing is ever re-tokenized.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol


class EnvError(RuntimeError):
    """The environment failed (not the agent): the episode ends with termination env_error."""


@dataclass
class Generation:
    """What the model produced in one turn, token-aligned."""

    token_ids: list[int]
    text_pieces: list[str]  # decoded text of each token, for char-span parsers


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


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


class Env(ABC):
    """One episode of one task. Created per episode by the env registry."""

    name: str = ""
    max_turns: int = 1

    @abstractmethod
    async def reset(self) -> str:
        """Start the episode; return the first observation (the prompt)."""

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

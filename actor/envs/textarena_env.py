"""`textarena`: a single-player TextArena game, played move by move.

The payload names the game's registry id (a "-raw" id: no TextArena wrappers, because those
re-send the whole history every turn while the actor appends only what is new), its kwargs
(JSON) and the reset seed (see broker/curriculum/banks.py). Each turn the observation is the
game's new messages; the model's move is its last `[...]` (TextArena's action format), which is
all that is submitted; the game's final reward arrives on the last turn (0 before it).

TextArena games draw from the global `random` module and seed it in `reset`. Episodes of many
games interleave in one actor process, so each game gets a private copy of that state: it is
swapped in around every call into the game and swapped out again after, which keeps a task's
game identical in every episode and leaves everyone else's `random` untouched.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from actor.envs.base import (
    Env,
    EnvError,
    Generation,
    GenerationLimits,
    ParsedAction,
    StepResult,
    char_span_to_token_span,
)

_MOVE = re.compile(r"\[[^\[\]]*\]")


class TextArenaEnv(Env):
    name = "textarena"
    needs_text = True  # the actor decodes each generated token so the move can be found

    def __init__(self, payload: dict, episode_seed: int) -> None:
        try:
            self.game_id = str(payload["game"])
            self.kwargs: dict[str, Any] = json.loads(str(payload.get("kwargs", "{}")))
            self.seed = int(payload.get("seed", 0))
            self.max_turns = max(1, int(payload.get("max_turns", 20)))
            self.max_tokens = int(payload.get("max_tokens", 256))
        except (KeyError, TypeError, ValueError) as e:
            raise EnvError(f"{self.name}: bad task payload: {e!r}") from None
        self.turn = 0
        self.game: Any = None
        self._random: object | None = None  # this game's private `random` state
        del episode_seed  # deterministic task; sampling randomness comes from the engine

    @contextmanager
    def _own_random(self) -> Iterator[None]:
        outer = random.getstate()
        if self._random is not None:
            random.setstate(self._random)  # type: ignore[arg-type]
        try:
            yield
        finally:
            self._random = random.getstate()
            random.setstate(outer)

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            with self._own_random():
                return fn(*args, **kwargs)
        except Exception as e:  # a crash inside the game is the environment's failure
            raise EnvError(f"textarena {self.game_id} {what}: {e}") from e

    def _new_messages(self) -> str:
        import textarena as ta

        _, messages = self.game.get_observation()
        # The agent's own move is already in the token stream; everything else is news.
        return "\n".join(
            str(msg) for _, msg, kind in messages if kind != ta.ObservationType.PLAYER_ACTION
        )

    def state_key(self) -> str:
        # GiGPO anchor state: the game's full state (secret included, fixed per task), so two
        # episodes of a group share a key exactly when they reached the same position.
        state = getattr(self.game.state, "game_state", None)
        raw = f"{self.game_id}:{self.seed}:{state!r}"
        return hashlib.blake2b(raw.encode(), digest_size=8).hexdigest()

    async def reset(self) -> str:
        import textarena as ta  # lazy: only actors playing this env pay for the import

        self.game = self._call("make", ta.make, self.game_id, **self.kwargs)
        self._random = None
        self._call("reset", self.game.reset, num_players=1, seed=self.seed)
        self.turn = 0
        return self._new_messages()

    def limits(self) -> GenerationLimits:
        return GenerationLimits(max_tokens=self.max_tokens)

    def parse_action(self, gen: Generation) -> ParsedAction:
        n = len(gen.token_ids)
        text = "".join(gen.text_pieces)
        moves = list(_MOVE.finditer(text))
        if not moves:
            # Submitted anyway (see step): the game's own rules decide what an invalid move costs.
            return ParsedAction(action=text.strip(), span=(n, n), valid=False)
        m = moves[-1]
        return ParsedAction(m.group(), char_span_to_token_span(gen.text_pieces, *m.span()))

    async def step(self, action: ParsedAction) -> StepResult:
        key = self.state_key()
        done, _ = self._call("step", self.game.step, action.action)
        self.turn += 1
        if done:
            rewards, game_info = self._call("close", self.game.close)
            info = (game_info or {}).get(0, {})
            return StepResult(
                observation=str(info.get("reason", "")),
                reward=float((rewards or {}).get(0, 0.0)),
                done=True,
                state_key=key,
                info={"invalid_move": float(bool(info.get("invalid_move", False)))},
            )
        # Out of turns before the game ended (only when `max_turns` caps it): no game reward.
        truncated = self.turn >= self.max_turns
        return StepResult(
            observation=f"\n{self._new_messages()}\n",
            reward=0.0,
            done=False,
            truncated=truncated,
            state_key=key,
        )

    def outcome(self, rewards: Sequence[float]) -> float:
        return float(rewards[-1]) if rewards else 0.0  # only the last turn is scored

    def success(self, rewards: Sequence[float]) -> bool:
        return bool(rewards) and rewards[-1] >= 1.0

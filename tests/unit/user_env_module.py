"""A user's environment module, as README "Train on your own task" describes one: loaded by
tests through `[env] name = "tests.unit.user_env_module:EchoEnv"` (and an entry point)."""

from __future__ import annotations

import json

from shared.env_api import ParsedAction, StepResult, Task, TextEnv

SEEN_OPTIONS: list[dict] = []  # what `tasks` was called with (broker side)


class EchoEnv(TextEnv):
    """Say the word: reward 1 when the reply contains it. Options: `words`, `repeat`."""

    max_tokens = 8

    @classmethod
    def tasks(cls, options):
        SEEN_OPTIONS.append(dict(options))
        for i, word in enumerate(options.get("words", ["yes", "no", "ok"])):
            for k in range(int(options.get("repeat", 2))):
                family = "short" if len(word) <= 2 else "long"
                yield Task({"word": word, "k": k, "meta": json.dumps({"i": i})}, family, len(word))

    async def reset(self) -> str:
        return f"{self.options.get('say', 'say')} {self.payload['word']}"

    async def step(self, action: ParsedAction) -> StepResult:
        hit = str(self.payload["word"]) in action.action.split()
        return StepResult(observation="", reward=float(hit), done=True)


class HeldEnv(EchoEnv):
    """Gives its held-out tasks itself; payloads as bare dicts."""

    @classmethod
    def tasks(cls, options):
        return [{"word": w} for w in ("a", "b", "c")]

    @classmethod
    def heldout_tasks(cls, options):
        return [{"word": "z"}]


class BadPayloadEnv(EchoEnv):
    @classmethod
    def tasks(cls, options):
        return [{"word": ["not", "flat"]}]


class NotAnEnv:
    pass

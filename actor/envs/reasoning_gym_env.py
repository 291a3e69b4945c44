"""`reasoning_gym`: one reasoning-gym question, answered once or with "try again" retries.

The task payload names a procedural dataset, its config (JSON), seed and index (see
broker/curriculum/banks.py), so the question is `create_dataset(...)[index]`, identical in
every actor and every episode of a group. The model writes its reasoning and then the answer;
the answer is the text after the last "Answer:" (any case) up to the end of that line, or,
with no such marker, the last non-empty line. That span (and only it) is the action, and the
dataset's own `score_answer` is the reward (in [0, 1]; some datasets give partial credit, e.g.
for an answer that merely contains the right one).

With `answer` = "first_number" (and an instruction such as "Reply with just the number.") the
answer is instead the first number the model writes: a reply that restates the question first
scores 0, so the model is rewarded for the format (the answer first) and the answer both.
With `partial_credit` = false the reward is 1 for a right answer and 0 otherwise, whatever
partial credit the dataset would give.

With `max_turns` > 1 a wrong answer is met with "Wrong, try again." and another attempt, until
the answer is right or the attempts run out. Only the final attempt is rewarded (its score),
so earlier turns carry 0 and success means the last answer scored 1.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Sequence
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

INSTRUCTION = "\n\nThink step by step, then give your final answer on its own line as:\nAnswer: "
RETRY = "\nWrong, try again.\n"
_MARKER = re.compile(r"answer\s*:", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
ANSWER_MODES = ("marker", "first_number")
# Special tokens a tokenizer may decode into the text (EOS and friends): never part of an answer.
_SPECIAL = r"<\|[^|>]*\|>|</?s>|<eos>|<pad>|<unk>"
_TRIM = re.compile(rf"(?:\s|{_SPECIAL})*(.*?)(?:\s|{_SPECIAL})*\Z", re.DOTALL)


@functools.lru_cache(maxsize=128)
def _dataset(name: str, config: str, seed: int, size: int) -> Any:
    # Cached: one dataset object serves every task of a family (some load word lists at init).
    import reasoning_gym  # lazy: a multi-second import only actors playing this env pay

    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(config).items()}
    return reasoning_gym.create_dataset(name, seed=seed, size=size, **kwargs)


def find_answer(text: str) -> tuple[int, int] | None:
    """[start, end) of the answer in `text`, or None when there is nothing to grade."""
    marks = list(_MARKER.finditer(text))
    if marks:  # the first non-blank line after the last marker ("Answer:\n42" counts too)
        start = len(text) - len(text[marks[-1].end() :].lstrip())
        nl = text.find("\n", start)
        end = len(text) if nl < 0 else nl
    else:  # no marker: the last non-blank line
        end = len(text.rstrip())
        start = text.rfind("\n", 0, end) + 1
    m = _TRIM.match(text, start, end)
    assert m is not None  # the pattern matches any string
    return m.span(1) if m.end(1) > m.start(1) else None


class ReasoningGymEnv(Env):
    name = "reasoning_gym"
    needs_text = True  # the actor decodes each generated token so the answer can be found

    def __init__(self, payload: dict, episode_seed: int) -> None:
        try:
            self.dataset_name = str(payload["dataset"])
            self.config = str(payload.get("config", "{}"))
            self.seed = int(payload.get("seed", 0))
            self.index = int(payload.get("index", 0))
            self.size = max(int(payload.get("size", 1)), self.index + 1)
            self.max_turns = max(1, int(payload.get("max_turns", 1)))
            self.max_tokens = int(payload.get("max_tokens", 512))
            self.instruction = str(payload.get("instruction") or INSTRUCTION)
            self.answer_mode = str(payload.get("answer", "marker"))
            self.partial_credit = bool(payload.get("partial_credit", True))
        except (KeyError, TypeError, ValueError) as e:
            raise EnvError(f"{self.name}: bad task payload: {e!r}") from None
        self.turn = 0
        self.ds: Any = None  # the reasoning-gym dataset, built in reset
        self.entry: dict[str, Any] = {}  # its item: question, answer, metadata
        self.key = ""  # hash of the question, the stem of every turn's state_key
        del episode_seed  # deterministic task; sampling randomness comes from the engine

    async def reset(self) -> str:
        try:
            self.ds = _dataset(self.dataset_name, self.config, self.seed, self.size)
            self.entry = self.ds[self.index]
        except Exception as e:  # unknown dataset, bad config: the task is broken, not the agent
            raise EnvError(f"reasoning_gym {self.dataset_name}[{self.index}]: {e}") from e
        self.turn = 0
        question = str(self.entry["question"]).rstrip()
        # GiGPO anchor state: the question plus how many attempts have been used.
        self.key = hashlib.blake2b(question.encode(), digest_size=8).hexdigest()
        return question + self.instruction

    def limits(self) -> GenerationLimits:
        return GenerationLimits(max_tokens=self.max_tokens)

    def parse_action(self, gen: Generation) -> ParsedAction:
        n = len(gen.token_ids)
        text = "".join(gen.text_pieces)
        if self.answer_mode == "first_number":
            m = _NUMBER.search(text)
            span = m.span() if m else None
        else:
            span = find_answer(text)
        if span is None:
            return ParsedAction(action="", span=(n, n), valid=False)
        return ParsedAction(
            action=text[span[0] : span[1]],
            span=char_span_to_token_span(gen.text_pieces, *span),
        )

    def score(self, answer: str | None) -> float:
        try:
            score = float(self.ds.score_answer(answer, self.entry))
        except Exception:  # a malformed answer some scorers choke on is simply wrong
            return 0.0
        return score if self.partial_credit else float(score >= 1.0)

    async def step(self, action: ParsedAction) -> StepResult:
        key = f"{self.key}:a{self.turn}"
        score = self.score(action.action if action.valid else None)
        self.turn += 1
        done = score >= 1.0 or self.turn >= self.max_turns
        return StepResult(
            observation="" if done else RETRY,
            reward=score if done else 0.0,
            done=done,
            state_key=key,
            info={"score": score},
        )

    def outcome(self, rewards: Sequence[float]) -> float:
        return float(rewards[-1]) if rewards else 0.0  # only the last turn is scored

    def success(self, rewards: Sequence[float]) -> bool:
        return bool(rewards) and rewards[-1] >= 1.0

"""Chat templates, still token in / token out.

An instruct model expects its conversation in its chat template. The episode stays a list of
token ids that only grows: the opening (system prompt, first observation as a user message,
the assistant's generation prompt), then each generation exactly as sampled (it ends at the
template's end-of-turn token, where generation stops), then for each later observation only
the *incremental* template tokens: what the template puts after an assistant's end-of-turn
token, the new user (or tool) message, and the next generation prompt. No earlier text is ever
rendered or tokenized again.

The incremental tokens come from rendering a fixed stand-in conversation with and without the
new message and tokenizing only the difference; this equals tokenizing the whole conversation
(`apply_chat_template`) for every template with the *prefix property*: rendering a longer
conversation does not rewrite the earlier turns. Templates that do (Qwen3-style templates strip
the reasoning of earlier assistant turns) are detected at start (`ChatFormat.prefix_problem`,
logged once): their episodes still carry every turn as generated, so from the second turn on
the model sees its earlier turns as it wrote them rather than as the template would re-render
them, and the learner trains on exactly what the actors sampled from.

Tokens the template adds have role `template` (loss 0); the observation's own tokens have role
`prompt` (first) or `observation` (later), located by character offsets.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.protocol import Role

log = logging.getLogger(__name__)

# The stand-in turns the incremental tokens are cut from (plain words: no template treats them
# specially, and they tokenize the same wherever they stand).
_USER, _ASSISTANT = "question", "answer"
OPENINGS_CACHED = 1024  # observation texts whose opening tokens are kept


class ChatTemplateError(ValueError):
    """The chat template cannot be used token-incrementally (named in the message)."""


@dataclass
class Tokens:
    """Token ids with the role of each."""

    ids: list[int]
    roles: list[int]

    def __add__(self, other: Tokens) -> Tokens:
        return Tokens(self.ids + other.ids, self.roles + other.roles)


def resolve_template(tokenizer: Any, setting: str) -> str | None:
    """`[model] chat_template`: "auto" (the tokenizer's own template, None when it has none),
    "none" (raw text prompts), or the path of a Jinja file."""
    if setting == "none":
        return None
    if setting == "auto":
        return getattr(tokenizer, "chat_template", None) or None
    path = Path(setting)
    if not path.is_file():
        raise ChatTemplateError(f'chat_template: no file {path} (or use "auto" / "none")')
    return path.read_text()


class ChatFormat:
    """One model's chat template, applied one message at a time."""

    def __init__(self, tokenizer: Any, template: str, system_prompt: str = "") -> None:
        self.tokenizer = tokenizer
        self.template = template
        self._system = [{"role": "system", "content": system_prompt}] if system_prompt else []
        closing = self._assistant_closing()
        self._closing = closing
        # Generation stops at the first special token the template closes a turn with
        # (ChatML's <|im_end|>, Llama-3's <|eot_id|>), and at EOS.
        special = set(getattr(tokenizer, "all_special_ids", []))
        special |= set(getattr(tokenizer, "added_tokens_decoder", {}))
        eot = [i for i in closing if i in special][:1]
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self.stop_token_ids: list[int] = list(dict.fromkeys(eot + eos))
        # Openings by observation text: a group's episodes all start from the same one, and
        # rendering and tokenizing it costs ~0.3 ms (SmolLM2), ~10 us per token of a short
        # episode. Rendering is a pure function of the text, so a cached one is the same.
        self._openings: OrderedDict[str, Tokens] = OrderedDict()
        self.prefix_problem = self._check_prefix_property()

    # ------------------------------------------------------------------ rendering

    def render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        text = self.tokenizer.apply_chat_template(
            messages,
            chat_template=self.template,
            tokenize=False,
            add_generation_prompt=generation_prompt,
        )
        return str(text)

    def _tokens(self, text: str, content: str, role: Role) -> Tokens:
        """`text` tokenized; tokens overlapping `content` (its last occurrence) get `role`,
        the rest `template`."""
        start = text.rfind(content) if content else -1
        return self._tokens_in(text, [(start, start + len(content))] if start >= 0 else [], role)

    def _tokens_in(self, text: str, spans: list[tuple[int, int]], role: Role) -> Tokens:
        """`text` tokenized; tokens overlapping any character span get `role`, the rest
        `template`."""
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        roles = []
        for a, b in enc["offset_mapping"]:
            inside = any(a < end and b > start for start, end in spans)
            roles.append(int(role if inside else Role.TEMPLATE))
        return Tokens(list(enc["input_ids"]), roles)

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _base(self) -> list[dict[str, str]]:
        return [
            *self._system,
            {"role": "user", "content": _USER},
            {"role": "assistant", "content": _ASSISTANT},
        ]

    def _assistant_closing(self) -> list[int]:
        """The tokens the template puts after an assistant message's content."""
        text = self.render(self._base(), False)
        at = text.rfind(_ASSISTANT)
        if at < 0:
            raise ChatTemplateError("the chat template drops the assistant's message")
        return self._ids(text[at + len(_ASSISTANT) :])

    # ------------------------------------------------------------------ the episode's pieces

    def opening(self, observation: str | list[dict[str, str]]) -> Tokens:
        """System prompt, the first observation as a user message, the generation prompt.
        An observation given as chat messages (a dataset row's `messages`) is rendered as
        that conversation, after `system_prompt` unless it has a system message of its own;
        the messages' contents are the prompt, everything else the template's."""
        if isinstance(observation, str):
            cached = self._openings.get(observation)
            if cached is None:
                msgs = [*self._system, {"role": "user", "content": observation}]
                cached = self._tokens(self.render(msgs, True), observation, Role.PROMPT)
                self._openings[observation] = cached
                if len(self._openings) > OPENINGS_CACHED:
                    self._openings.popitem(last=False)  # the oldest: its group has started
            return Tokens(list(cached.ids), list(cached.roles))  # the caller's to change
        given = [{"role": m["role"], "content": m["content"]} for m in observation]
        has_system = any(m["role"] == "system" for m in given)
        text = self.render([*([] if has_system else self._system), *given], True)
        spans, pos = [], 0
        for m in given:  # each content where the template put it, in order
            at = text.find(m["content"], pos) if m["content"] else -1
            if at >= 0:
                spans.append((at, at + len(m["content"])))
                pos = at + len(m["content"])
        return self._tokens_in(text, spans, Role.PROMPT)

    def follow_up(self, generated: list[int], observation: str, role: str = "user") -> Tokens:
        """After a generation that ended at a stop token: the rest of the assistant's closing,
        the observation as a `role` message ("user" or "tool"), the next generation prompt."""
        tail = self._closing
        if generated and generated[-1] in tail:
            tail = tail[tail.index(generated[-1]) + 1 :]
        base = self._base()
        before = self.render(base, False)
        after = self.render([*base, {"role": role, "content": observation}], True)
        if not after.startswith(before):
            raise ChatTemplateError(
                f"the chat template rewrites earlier turns when a {role} message follows"
            )
        delta = self._tokens(after[len(before) :], observation, Role.OBSERVATION)
        return Tokens(tail, [int(Role.TEMPLATE)] * len(tail)) + delta

    # ------------------------------------------------------------------ the prefix property

    def _check_prefix_property(self) -> str | None:
        """None when turn-by-turn tokens equal the whole conversation's `apply_chat_template`
        tokens on a probe conversation (with reasoning in the assistant turns), otherwise
        where they part."""
        turns = [
            ("what is 2 + 3?", "<think>2 plus 3</think>5"),
            ("and 4 + 4?", "<think>4 plus 4</think>8"),
        ]
        ids = self.opening(turns[0][0]).ids
        msgs = [*self._system, {"role": "user", "content": turns[0][0]}]
        for k, (_, answer) in enumerate(turns):
            generated = self._ids(answer) + self.stop_token_ids[:1]
            ids += generated
            msgs.append({"role": "assistant", "content": answer})
            nxt = turns[k + 1][0] if k + 1 < len(turns) else "thanks"
            ids += self.follow_up(generated, nxt).ids
            msgs.append({"role": "user", "content": nxt})
        whole = self._ids(self.render(msgs, True))
        if ids == whole:
            return None
        at = next((i for i, (a, b) in enumerate(zip(ids, whole, strict=False)) if a != b), None)
        at = min(len(ids), len(whole)) if at is None else at
        return (
            "the chat template lacks the prefix property: rendering the whole conversation "
            f"differs from rendering it turn by turn from token {at} on ("
            f"{self.tokenizer.decode(whole[max(0, at - 4) : at + 8])!r} vs "
            f"{self.tokenizer.decode(ids[max(0, at - 4) : at + 8])!r}); episodes keep every "
            "turn as generated"
        )


def chat_format(tokenizer: Any, setting: str, system_prompt: str = "") -> ChatFormat | None:
    """The `ChatFormat` `[model] chat_template` asks for, or None for raw text prompts."""
    template = resolve_template(tokenizer, setting)
    if template is None:
        if setting == "auto":
            log.info("the tokenizer has no chat template: prompts are raw text")
        return None
    fmt = ChatFormat(tokenizer, template, system_prompt)
    if fmt.prefix_problem:
        log.warning("%s", fmt.prefix_problem)
    return fmt

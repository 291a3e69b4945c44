"""Chat templates, token in / token out: an episode built one message at a time (the opening,
each generation as sampled, then only the incremental template tokens of each new message) has
exactly the ids `apply_chat_template` gives the whole conversation, for every template with the
prefix property; a template without it is detected and named."""

from __future__ import annotations

import logging

import pytest

from actor.chat import ChatFormat, ChatTemplateError, chat_format, resolve_template
from shared.protocol import Role
from tests.chat_tokenizers import llama3_tokenizer, qwen3_style_tokenizer, smollm2_tokenizer

CONVERSATION = [
    ("user", "What is 2 + 3? Reply with just the number."),
    ("assistant", "<think>2 plus 3 is 5</think>5"),
    ("user", "Wrong, try again."),
    ("assistant", "The answer is 5."),
    ("tool", "calculator: 5"),
]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    return smollm2_tokenizer(tmp_path_factory.mktemp("smollm2"))


def _whole(tok, msgs) -> list[int]:
    out = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _turn_by_turn(fmt: ChatFormat, tok, conversation) -> tuple[list[int], list[int]]:
    """The episode the actor builds; assistant turns stand for generations (their content's
    tokens and the stop token, as vLLM returns them)."""
    first = fmt.opening(conversation[0][1])
    ids, roles = list(first.ids), list(first.roles)
    generated: list[int] = []
    for role, content in conversation[1:]:
        if role == "assistant":
            generated = tok.encode(content, add_special_tokens=False) + fmt.stop_token_ids[:1]
            ids += generated
            roles += [Role.REASONING] * len(generated)
        else:
            nxt = fmt.follow_up(generated, content, role)
            ids += nxt.ids
            roles += nxt.roles
    return ids, roles


def _family(name: str, smollm2):
    return smollm2 if name == "smollm2" else llama3_tokenizer()


@pytest.mark.parametrize("family", ["smollm2", "llama3"])
@pytest.mark.parametrize("system", ["", "You are terse."])
def test_turn_by_turn_ids_equal_the_whole_conversation(family, system, smollm2) -> None:
    tok = _family(family, smollm2)
    # Llama-3's template names roles verbatim; "tool" is "ipython" there
    conv = [(("ipython" if r == "tool" and family == "llama3" else r), c) for r, c in CONVERSATION]
    fmt = ChatFormat(tok, tok.chat_template, system)
    assert fmt.prefix_problem is None
    ids, _ = _turn_by_turn(fmt, tok, conv)
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": r, "content": c} for r, c in conv
    ]
    assert ids == _whole(tok, msgs)


@pytest.mark.parametrize("family", ["smollm2", "llama3"])
def test_template_tokens_have_role_template_and_observations_their_own(family, smollm2) -> None:
    tok = _family(family, smollm2)
    fmt = ChatFormat(tok, tok.chat_template)
    ids, roles = _turn_by_turn(fmt, tok, CONVERSATION[:3])
    prompt = [i for i, r in zip(ids, roles, strict=True) if r == Role.PROMPT]
    obs = [i for i, r in zip(ids, roles, strict=True) if r == Role.OBSERVATION]
    assert tok.decode(prompt) == CONVERSATION[0][1]
    assert tok.decode(obs) == CONVERSATION[2][1]
    assert Role.TEMPLATE in roles
    # every special token the template writes is a template token
    specials = set(tok.all_special_ids) | set(tok.added_tokens_decoder)
    for i, r in zip(ids, roles, strict=True):
        if i in specials and r != Role.REASONING:
            assert r == Role.TEMPLATE, tok.decode([i])


def test_generation_stops_at_the_end_of_turn_token(smollm2) -> None:
    fmt = ChatFormat(smollm2, smollm2.chat_template)
    assert fmt.stop_token_ids[0] == smollm2.convert_tokens_to_ids("<|im_end|>")
    tok = llama3_tokenizer()
    assert ChatFormat(tok, tok.chat_template).stop_token_ids == [
        tok.convert_tokens_to_ids("<|eot_id|>"),
        tok.convert_tokens_to_ids("<|end_of_text|>"),
    ]


def test_a_template_that_rewrites_earlier_turns_is_named_once(caplog) -> None:
    tok = qwen3_style_tokenizer()
    with caplog.at_level(logging.WARNING, logger="actor.chat"):
        fmt = chat_format(tok, "auto")
    assert fmt is not None and fmt.prefix_problem is not None
    assert "prefix property" in fmt.prefix_problem
    lines = [r for r in caplog.records if "prefix property" in r.getMessage()]
    assert len(lines) == 1
    # the episode still grows turn by turn: what was generated stays as generated
    ids, _ = _turn_by_turn(fmt, tok, CONVERSATION[:4])
    think = tok.encode(CONVERSATION[1][1], add_special_tokens=False)
    assert any(ids[i : i + len(think)] == think for i in range(len(ids)))


def test_template_settings(tmp_path, smollm2) -> None:
    assert resolve_template(smollm2, "none") is None
    assert resolve_template(smollm2, "auto") == smollm2.chat_template
    path = tmp_path / "t.jinja"
    path.write_text(llama3_tokenizer().chat_template)
    assert resolve_template(smollm2, str(path)) == path.read_text()
    with pytest.raises(ChatTemplateError, match="no file"):
        resolve_template(smollm2, str(tmp_path / "missing.jinja"))
    from learner.tiny_model import build_tokenizer

    assert chat_format(build_tokenizer(), "auto") is None  # no template: raw text prompts


def test_a_repeated_opening_is_the_same_tokens_and_the_cache_stays_bounded(
    smollm2, monkeypatch
) -> None:
    """A group's episodes share their first observation: its opening is rendered once, and
    every episode gets the same ids and roles in lists of its own."""
    fmt = ChatFormat(smollm2, smollm2.chat_template, "You are terse.")
    first = fmt.opening("turn sym7")
    first.ids.append(-1)  # an episode extends its own lists
    first.roles.append(-1)
    again = fmt.opening("turn sym7")
    other = ChatFormat(smollm2, smollm2.chat_template, "You are terse.")
    assert again == other.opening("turn sym7") and -1 not in again.ids
    assert fmt.opening("turn sym8") == other.opening("turn sym8") != again
    monkeypatch.setattr("actor.chat.OPENINGS_CACHED", 4)
    for k in range(10):
        fmt.opening(f"turn sym{k}")
    assert list(fmt._openings) == [f"turn sym{k}" for k in range(6, 10)]

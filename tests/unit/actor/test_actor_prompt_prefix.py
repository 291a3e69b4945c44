"""An episode's prompt starts with the special tokens the model's own tokenizer adds, and no
others: a defined `bos_token` alone must not put BOS in front of a GPT-2-style prompt."""

from tokenizers import processors

from actor.episode import _opening, special_prefix
from learner.tiny_model import build_tokenizer
from shared.protocol import Role


def test_a_tokenizer_that_adds_no_bos_gets_no_prefix() -> None:
    tok = build_tokenizer()
    assert tok.bos_token_id is not None  # defined, yet the tokenizer never adds it
    assert special_prefix(tok) == []


def test_a_tokenizer_that_adds_bos_gets_exactly_bos() -> None:
    tok = build_tokenizer()
    bos, eos = tok.bos_token_id, tok.eos_token_id
    # Llama-style: BOS before the text; an EOS after it must not leak into the prefix.
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", bos), ("</s>", eos)]
    )
    assert tok.encode("turn", add_special_tokens=True)[0] == bos
    assert special_prefix(tok) == [bos]


def test_a_repeated_raw_opening_is_the_same_tokens_and_the_callers_to_change() -> None:
    tok = build_tokenizer()
    first = _opening("turn sym3", tok, None, [7])
    assert first.ids == [7, *tok.encode("turn sym3", add_special_tokens=False)]
    first.ids.append(99)  # an episode extends its own copy...
    first.roles.append(99)
    again = _opening("turn sym3", tok, None, [7])  # ...and the group's next one is unharmed
    assert again.ids == first.ids[:-1] and again.roles == first.roles[:-1]
    assert again.roles == [int(Role.PROMPT)] * len(again.ids)
    assert _opening("turn sym3", tok, None, []).ids[0] != 7  # the prefix is part of the key

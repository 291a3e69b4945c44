"""An episode's prompt starts with the special tokens the model's own tokenizer adds, and no
others: a defined `bos_token` alone must not put BOS in front of a GPT-2-style prompt."""

from tokenizers import processors

from actor.episode import special_prefix
from learner.tiny_model import build_tokenizer


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

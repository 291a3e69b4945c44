"""`[model] path`: a local directory, a hub id from the local HF cache, or a one-line error
with exit code 2 (never a silently built stand-in); `[model] dtype` "auto" is the
checkpoint's own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from learner.__main__ import main as learner_main
from shared.config import ModelConfig
from shared.models import ModelNotFound, model_dtype, resolve_model


def _fake_hub_cache(cache: Path, repo: str, dtype: str = "bfloat16") -> Path:
    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": dtype}))
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("0" * 40)
    return snap


def test_a_local_directory_and_a_cached_hub_id_resolve(tmp_path, monkeypatch) -> None:
    import huggingface_hub.constants

    local = tmp_path / "m"
    local.mkdir()
    (local / "config.json").write_text("{}")
    assert resolve_model(ModelConfig(path=str(local))) == str(local)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    snap = _fake_hub_cache(tmp_path / "hub", "HuggingFaceTB/SmolLM2-135M-Instruct")
    found = resolve_model(ModelConfig(path="HuggingFaceTB/SmolLM2-135M-Instruct"))
    assert Path(found) == snap
    assert model_dtype(ModelConfig(dtype="auto"), found) == "bfloat16"
    assert model_dtype(ModelConfig(dtype="float16"), found) == "float16"
    assert model_dtype(ModelConfig(dtype="auto"), tmp_path / "nowhere") == "float32"


@pytest.mark.parametrize("path", ["no/such-model", "./misspelt-dir", "HuggingFaceTB/SmolLM2"])
def test_an_unknown_path_is_a_named_error_and_builds_nothing(tmp_path, monkeypatch, path) -> None:
    import huggingface_hub.constants

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelNotFound, match=repr(path).replace(".", r"\.")):
        resolve_model(ModelConfig(path=path))
    assert list(tmp_path.iterdir()) == []  # nothing built at that path
    # only a config that asks for the tiny model gets it (its builder runs later)
    assert resolve_model(ModelConfig(path=path, build_tiny_if_missing=True)) == str(Path(path))


def test_the_learner_exits_2_with_one_line_on_an_unknown_path(tmp_path, capsys) -> None:
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(f'[model]\npath = "{tmp_path / "typo"}"\n')
    assert learner_main(["--config", str(cfg), "--metrics-port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0] and "typo" in err[0]
    assert not (tmp_path / "typo").exists()

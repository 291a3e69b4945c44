"""`headrace eval` end to end on real vLLM: a learner checkpoint of the tiny model (written by
`learner.checkpoint.save_checkpoint`, as `headrace run` writes them), given as the checkpoint
root, evaluated on symbols' held-out tasks. That vLLM starts on the checkpoint dir is also what
README's "Serve a checkpoint with vLLM" relies on (`vllm serve DIR` loads it the same way)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration

CONFIG = """
[model]
path = "{model}"
[env]
name = "symbols"
[env.symbols]
levels = [5]
tasks_per_level = 16
n_choices = 4
n_turns = 1
reasoning_tokens = 2
[actor]
max_concurrent_episodes = 16
max_model_len = 128
temperature = 1.0
"""


def test_eval_a_learner_checkpoint_prints_one_json_object(
    tiny_model: Path, tmp_path: Path, repo_root: Path
) -> None:
    from transformers import AutoModelForCausalLM

    from learner.checkpoint import save_checkpoint

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.arange(8)[None]
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()  # a real optimizer state to save, as a learner's checkpoint holds
    root = tmp_path / "run" / "learner"
    ckpt = save_checkpoint(root, 3, model, opt, policy_version=3, copy_from=tiny_model)
    # what vLLM needs at the top level: config, weights, tokenizer; optimizer state apart
    for name in ("config.json", "model.safetensors", "tokenizer.json", "state.json"):
        assert (ckpt / name).is_file(), name
    assert (ckpt / "trainer" / "optimizer.safetensors").is_file()
    assert [p.name for p in ckpt.glob("*.safetensors")] == ["model.safetensors"]
    config = tmp_path / "symbols.toml"
    config.write_text(CONFIG.format(model=tiny_model))

    argv = [sys.executable, "-m", "shared.cli", "eval", "--checkpoint", str(root)]
    argv += ["--config", str(config), "--n", "4", "--samples", "2", "--json"]
    proc = subprocess.run(argv, cwd=repo_root, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)  # all of stdout: one JSON object
    assert report["checkpoint"] == str(ckpt) and report["lora"] is False
    assert (report["n"], report["k"], report["samples"], report["episodes"]) == (4, 2, 2, 8)
    assert set(report["families"]) == {"L5"}
    fam = report["families"]["L5"]
    assert fam["n"] == 4 and fam["blind_ceiling"]["pass"] > 0
    assert 0.0 <= report["pass_at_1"] <= report["pass_at_k"] <= 1.0
    assert 0.0 <= report["mean_reward"] <= 1.0
    assert report["pass_at_1"] == pytest.approx(fam["pass_at_1"])

"""LoRA under FSDP2 over 2 CPU ranks (gloo) trains exactly like LoRA in one process.

`learner.build` applies the adapters before sharding, so FSDP shards a peft wrapper whose
base weights are frozen. This launches this file under torchrun: rank 0 drives
`ShardedTrainer.step` and the other rank follows its broadcast commands, as in the learner;
rank 0 then gathers the full state and takes from it what the learner publishes under LoRA
(`learner.lora.publishable`: the adapter alone, under PEFT's file names). The same steps run
in the test process without sharding: per-step losses, the published adapter and the frozen
base weights must agree to float rounding.

SGD with momentum, as in test_fsdp.py: its update is linear in the gradient, so the adapter
weights check the gradients themselves.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers import torchrun_two_ranks

STEPS = 3
LR = 0.5

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def _trainer(model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    from learner.distributed import ShardedTrainer, shard_model
    from learner.lora import apply_lora, trainable_parameters
    from learner.util import seed_everything
    from shared.lora_config import LoraConfig

    seed_everything(0)  # the adapters' A is drawn from the global RNG: the same on every rank
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = apply_lora(model, LoraConfig(rank=4, alpha=8.0, target_modules=["q_proj", "v_proj"]))
    model = shard_model(model)  # as learner.build: adapters first, then FSDP
    opt = torch.optim.SGD(trainable_parameters(model), lr=LR, momentum=0.9)
    return ShardedTrainer(model, opt)


def _steps(trainer: Any) -> list[dict[str, float]]:
    from shared.synthetic import synthetic_batch

    trajs = synthetic_batch(n_groups=2, group_size=3, n_tokens=24, seed=1)[:5]
    is_w = [1.0, 0.5, 0.8, 0.25, 0.9]
    out = []
    for _ in range(STEPS):
        diag, _ = trainer.step(trajs, is_w, policy_version=0)
        out.append({k: diag[k] for k in ("loss", "grad_norm", "clip_fraction")})
    return out


def _published(trainer: Any) -> tuple[dict[str, torch.Tensor], str, dict[str, Any] | None]:
    from learner.distributed import full_state_dict
    from learner.lora import publishable

    state = full_state_dict(trainer.model)  # collective under FSDP: followers join
    tensors, kind, cfg = publishable(trainer.model, state)
    return {k: v.detach().clone() for k, v in tensors.items()}, kind, cfg


def _worker(model_dir: Path, out: Path) -> None:
    """One torchrun rank: train, rank 0 publishes and reports."""
    from safetensors.torch import save_file

    from learner import distributed as D

    D.init_distributed()
    assert D.world_size() == 2
    trainer = _trainer(model_dir)
    assert D.is_sharded(trainer.model)
    if D.is_main():
        diags = _steps(trainer)
        tensors, kind, cfg = _published(trainer)
        base = {k: v.clone() for k, v in D.full_state_dict(trainer.model).items()}
        D.stop_followers()
        save_file(tensors, str(out / "adapter.safetensors"))
        save_file(base, str(out / "state.safetensors"))
        (out / "report.json").write_text(json.dumps({"diags": diags, "kind": kind, "cfg": cfg}))
    else:
        trainer.follow()
    D.shutdown()
    D.exit_rank(0)  # see exit_rank: a sharded rank's teardown can abort


def test_lora_two_ranks_match_one_process(tiny_model: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    torchrun_two_ranks(__file__, str(tiny_model), str(tmp_path))
    report = json.loads((tmp_path / "report.json").read_text())

    ref = _trainer(tiny_model)
    want = _steps(ref)
    for step, (w, g) in enumerate(zip(want, report["diags"], strict=True)):
        for k in w:
            assert g[k] == pytest.approx(w[k], rel=1e-5, abs=1e-7), (step, k)

    # What the actors would get: the adapter alone, the same tensors, the same config.
    tensors, kind, cfg = _published(ref)
    assert kind == report["kind"] == "lora"
    assert cfg == report["cfg"]
    got = load_file(str(tmp_path / "adapter.safetensors"))
    assert sorted(got) == sorted(tensors) and any(".lora_B." in k for k in got)
    for k, t in tensors.items():
        torch.testing.assert_close(got[k], t, rtol=1e-5, atol=1e-6, msg=k)
    # It trained (B starts at 0), and the frozen base weights did not move under sharding.
    assert any(t.abs().max() > 0 for k, t in got.items() if ".lora_B." in k)
    state = load_file(str(tmp_path / "state.safetensors"))
    ref_state = ref.model.state_dict()
    assert sorted(state) == sorted(ref_state)
    for k, t in ref_state.items():
        torch.testing.assert_close(state[k], t, rtol=1e-5, atol=1e-6, msg=k)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), Path(sys.argv[2]))

"""FSDP2 over 2 CPU ranks (gloo) trains exactly like one process on the whole batch.

The test launches this file under torchrun: rank 0 drives `ShardedTrainer.step` and the
other rank follows its broadcast commands, as in the learner. The same steps then run in the
test process without sharding; per-step losses, final weights and the optimizer state (read
back from the checkpoint rank 0 wrote) must agree to float rounding.

The optimizer is SGD with momentum, whose update is linear in the gradient, so the weights
check the gradients themselves. (Adam divides by sqrt(v): in the few coordinates whose
gradient is ~0 it turns summation-order rounding into differences of a sizeable fraction of
the learning rate, which says nothing about the sharding.)
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
# The second config splits the 5 rows into minibatches of 2, 2 and 1, so one rank has no row
# in the last one and must still join FSDP's collectives.
CONFIGS: dict[str, dict[str, Any]] = {
    "one_update": {},
    "epochs_minibatches": {"ppo_epochs": 2, "minibatches": 3},
}

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def _batch() -> tuple[list[Any], list[float]]:
    from shared.synthetic import synthetic_batch

    trajs = synthetic_batch(n_groups=2, group_size=3, n_tokens=24, seed=1)[:5]
    return trajs, [1.0, 0.5, 0.8, 0.25, 0.9]  # replay IS weights, normalised by their max


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=0.01)


def _trainer(model_dir: Path, kw: dict[str, Any]) -> Any:
    from transformers import AutoModelForCausalLM

    from learner.distributed import ShardedTrainer, shard_model
    from learner.util import seed_everything

    seed_everything(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = shard_model(model)
    opt = _optimizer(model)
    return ShardedTrainer(model, opt, **kw)


def _steps(trainer: Any) -> list[dict[str, float]]:
    trajs, is_w = _batch()
    out = []
    for _ in range(STEPS):
        diag, _ = trainer.step(trajs, is_w, policy_version=0)
        out.append({k: diag[k] for k in ("loss", "grad_norm", "clip_fraction", "ess")})
    return out


def _worker(model_dir: Path, out: Path) -> None:
    """One torchrun rank: train every config, rank 0 checkpoints and reports."""

    from learner import distributed as D
    from learner.checkpoint import save_checkpoint

    D.init_distributed()
    assert D.world_size() == 2
    for name, kw in CONFIGS.items():
        trainer = _trainer(model_dir, kw)
        assert D.is_sharded(trainer.model)
        if D.is_main():
            diags = _steps(trainer)
            save_checkpoint(
                out / name, STEPS, trainer.model, trainer.optimizer, policy_version=STEPS
            )
            D.stop_followers()
            (out / f"{name}.json").write_text(json.dumps(diags))
        else:
            trainer.follow()
    D.shutdown()
    D.exit_rank(0)  # see exit_rank: a sharded rank's teardown can abort


def test_two_ranks_match_one_process(tiny_model: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from learner.checkpoint import latest, load_checkpoint

    torchrun_two_ranks(__file__, str(tiny_model), str(tmp_path))

    for name, kw in CONFIGS.items():
        ref = _trainer(tiny_model, kw)
        want = _steps(ref)
        got = json.loads((tmp_path / f"{name}.json").read_text())
        for step, (w, g) in enumerate(zip(want, got, strict=True)):
            for k in w:
                assert g[k] == pytest.approx(w[k], rel=1e-5, abs=1e-7), (name, step, k)

        # The gathered checkpoint holds the same weights and optimizer state.
        ckpt = latest(tmp_path / name)
        assert ckpt is not None
        model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
        opt = _optimizer(model)
        st = load_checkpoint(ckpt, model, opt, restore_rng=False)
        assert st.step == STEPS
        arch = json.loads((ckpt / "config.json").read_text())["architectures"]
        assert arch == ["LlamaForCausalLM"]
        weights = model.state_dict()
        for k, t in ref.model.state_dict().items():
            torch.testing.assert_close(weights[k], t, rtol=1e-5, atol=1e-6, msg=f"{name}: {k}")
        s_ref, s_got = ref.optimizer.state_dict(), opt.state_dict()
        assert s_ref["param_groups"] == s_got["param_groups"]
        for i, st_ref in s_ref["state"].items():
            for key, t in st_ref.items():
                torch.testing.assert_close(
                    s_got["state"][i][key], t, rtol=1e-5, atol=1e-6, msg=f"{name}: {i} {key}"
                )


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), Path(sys.argv[2]))

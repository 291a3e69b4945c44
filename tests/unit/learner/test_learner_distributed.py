"""`learner.distributed` in a single process: every helper is a no-op and `ShardedTrainer` is
exactly `Trainer`. (Two ranks: tests/integration/test_fsdp.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from learner import distributed as D
from learner.tiny_model import build_tiny_model
from learner.train import Trainer
from learner.util import seed_everything
from shared.synthetic import synthetic_batch


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("m") / "tiny", seed=0)


def test_single_process_helpers_are_no_ops(model_dir: Path, monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    D.init_distributed()
    assert not D.launched_distributed()
    assert (D.world_size(), D.rank(), D.is_main()) == (1, 0, True)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert D.shard_model(model) is model and not D.is_sharded(model)
    full = D.full_state_dict(model)
    assert all(torch.equal(full[k], v) for k, v in model.state_dict().items())
    D.stop_followers()
    D.shutdown()


def test_sharded_trainer_is_trainer_in_one_process(model_dir: Path) -> None:
    trajs = synthetic_batch(n_groups=2, group_size=3, n_tokens=16, seed=0)
    results = []
    for cls in (Trainer, D.ShardedTrainer):
        seed_everything(0)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        trainer = cls(model, opt, minibatches=2)
        diag, adv = trainer.step(trajs, [1.0] * len(trajs), 0)
        results.append((diag["loss"], adv, model.state_dict()))
    (loss_a, adv_a, sd_a), (loss_b, adv_b, sd_b) = results
    assert loss_a == loss_b and (adv_a == adv_b).all()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)


def test_step_command_roundtrip() -> None:
    trajs = synthetic_batch(n_groups=1, group_size=2, n_tokens=8, seed=0)
    rng = torch.get_rng_state().numpy().tobytes()
    cmd = D._Command("step", trajs, [0.5, 1.0], 3, rng)
    back = D._decoder.decode(D._encoder.encode(cmd))
    assert back == cmd
    assert torch.equal(
        torch.frombuffer(bytearray(back.torch_rng), dtype=torch.uint8), torch.get_rng_state()
    )
    assert D._decoder.decode(D._encoder.encode(D._Command(op="stop"))).op == "stop"

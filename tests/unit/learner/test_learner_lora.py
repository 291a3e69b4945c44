"""`[learner.lora]`: only the adapters train, the published policy is the adapter alone (as PEFT
names and configures it), and a checkpoint resumes the very same adapter."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
import torch

from learner.build import build_trainer
from learner.checkpoint import load_checkpoint, save_checkpoint
from learner.distributed import ShardedTrainer
from learner.lora import adapter_keys, is_lora, publishable
from learner.publish import WeightPublisher, serialize_state_dict
from learner.tiny_model import build_tiny_model
from learner.train import Trainer
from shared import protocol as P
from shared.config import Config, ConfigError, load_config
from shared.lora_config import LLAMA_PROJECTIONS, LoraConfig
from shared.synthetic import synthetic_batch

RANK = 8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("m") / "tiny", seed=0)


def _trainer(model_dir: Path, seed: int = 0) -> ShardedTrainer:
    cfg = Config()
    cfg.model.path = str(model_dir)
    cfg.learner.seed = seed
    cfg.learner.lr = 1e-2
    cfg.learner.lora = LoraConfig(rank=RANK, alpha=16)
    return build_trainer(cfg)


def _clone(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_config_section_and_its_checks(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text('[learner.lora]\nrank = 4\nalpha = 8\ntarget_modules = ["q_proj", "v_proj"]\n')
    lc = load_config(toml).learner.lora
    assert (lc.rank, lc.alpha, lc.target_modules, lc.enabled) == (
        4,
        8.0,
        ["q_proj", "v_proj"],
        True,
    )
    assert lc.vllm_max_rank() == 8 and LoraConfig(rank=16).vllm_max_rank() == 16
    assert not Config().learner.lora.enabled  # off by default: full fine-tuning
    assert Config().learner.lora.target_modules == list(LLAMA_PROJECTIONS)
    for bad in (
        "rank = -1",
        "rank = 600",
        "alpha = 0",
        'target_modules = ["lm_head"]',
        'target_modules = ["q_proj", "q_proj"]',
        "rank = 8\ntarget_modules = []",
        "dropout = 0.1",  # not a setting: dropout is always 0
    ):
        toml.write_text(f"[learner.lora]\n{bad}\n")
        with pytest.raises(ConfigError):
            load_config(toml)


def test_unknown_target_module_is_refused(model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from learner.lora import apply_lora

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with pytest.raises(ValueError, match="qproj"):
        apply_lora(model, LoraConfig(rank=RANK, target_modules=["q_proj", "qproj"]))


def test_only_adapters_train_and_base_weights_stay_bit_identical(model_dir: Path) -> None:
    trainer = _trainer(model_dir)
    model = trainer.model
    assert is_lora(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    n_layers = 2
    assert len(trainable) == 2 * len(LLAMA_PROJECTIONS) * n_layers  # A and B per projection
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    in_optimiser = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert in_optimiser == {id(p) for n, p in model.named_parameters() if n in trainable}

    before = _clone(model)
    trajs = synthetic_batch(2, 4, 32)
    changed_after: list[set[str]] = []
    for _ in range(2):
        diag, _ = trainer.step(trajs)
        assert diag["skipped"] == 0 and diag["n_tokens"] > 0
        now = model.state_dict()
        changed_after.append({k for k, v in now.items() if not torch.equal(v, before[k])})
    base = {k for k in before if ".lora_" not in k}
    assert not (changed_after[-1] & base), "a frozen base weight moved"
    lora_b = {k for k in before if ".lora_B." in k}
    # B starts at 0, so the first step's gradient reaches B only; A moves from the second on.
    assert changed_after[0] == lora_b
    assert changed_after[1] == set(before) - base


def test_trainer_logprobs_run_the_decoder_with_the_adapters(model_dir: Path) -> None:
    trainer = _trainer(model_dir)
    model = trainer.model
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    ids = torch.randint(4, 256, (2, 20), generator=g)
    row = torch.arange(2).repeat_interleave(19)
    pos = torch.arange(1, 20).repeat(2)
    probe = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.0))
    with torch.no_grad():
        logp, _ = probe.token_logprobs(ids, torch.ones_like(ids), row, pos)
        ref = torch.log_softmax(model(input_ids=ids).logits, -1)[row, pos - 1, ids[row, pos]]
        with model.disable_adapter():
            base = torch.log_softmax(model(input_ids=ids).logits, -1)[row, pos - 1, ids[row, pos]]
    torch.testing.assert_close(logp, ref, rtol=0, atol=1e-5)
    assert float((ref - base).abs().max()) > 1e-2  # the adapters do change the policy


def test_published_adapter_is_small_and_a_valid_peft_adapter(
    model_dir: Path, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trainer = _trainer(model_dir)
    model = trainer.model
    trainer.step(synthetic_batch(2, 4, 32))  # B != 0
    tensors, kind, adapter_cfg = publishable(model, model.state_dict())
    assert kind == "lora" and adapter_cfg is not None
    assert adapter_cfg["r"] == RANK and set(adapter_cfg["target_modules"]) == set(LLAMA_PROJECTIONS)
    # the names PEFT itself writes to adapter_model.safetensors, the ones vLLM parses
    model.save_pretrained(tmp_path / "peft")
    from safetensors.torch import load_file

    assert set(tensors) == set(load_file(str(tmp_path / "peft" / "adapter_model.safetensors")))
    assert set(tensors) == set(adapter_keys(model))

    pub = WeightPublisher("tcp://127.0.0.1:0")
    try:
        manifest = pub.publish(3, tensors, kind, adapter_cfg)
        full = pub.publish(4, AutoModelForCausalLM.from_pretrained(model_dir).state_dict())
    finally:
        pub.server.close()
    assert manifest.kind == "lora" and full.kind == "full" and full.adapter_config is None
    ratio = manifest.total_bytes / full.total_bytes
    assert ratio < 0.2, ratio  # tiny model, rank 8: ~0.14; SmolLM2 rank 16: ~0.04
    assert len(serialize_state_dict(tensors)) == manifest.total_bytes
    back = P.decode(P.encode(P.PolicyPublished(3, "tcp://x:1", manifest)))
    assert isinstance(back, P.PolicyPublished) and back.manifest == manifest
    # a full-weight manifest encodes as before LoRA: peers without these fields still decode
    assert b"adapter_config" not in msgspec.msgpack.encode(full)
    assert b"kind" not in msgspec.msgpack.encode(full)

    # blob + manifest config = a PEFT adapter dir that reproduces the trained policy
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "adapter_model.safetensors").write_bytes(pub._versions[3].blob)
    (out / "adapter_config.json").write_text(msgspec.json.encode(adapter_cfg).decode())
    fresh = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out)
    ids = torch.randint(4, 256, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits)


def test_checkpoint_resume_restores_the_adapter_exactly(model_dir: Path, tmp_path: Path) -> None:
    trajs = synthetic_batch(2, 4, 32, seed=1)
    a = _trainer(model_dir, seed=0)
    for _ in range(2):
        a.step(trajs)
    path = save_checkpoint(tmp_path, 2, a.model, a.optimizer, policy_version=2, copy_from=model_dir)
    files = {p.name for p in path.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= files
    assert "model.safetensors" not in files  # the adapter alone, not the base weights
    saved = _clone(a.model)

    b = _trainer(model_dir, seed=1)  # another seed: another initial A
    assert not all(torch.equal(v, saved[k]) for k, v in b.model.state_dict().items())
    st = load_checkpoint(path, b.model, b.optimizer)
    assert (st.step, st.policy_version) == (2, 2)
    for k, v in b.model.state_dict().items():
        assert torch.equal(v, saved[k]), k
    opt_a, opt_b = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert opt_a["state"].keys() == opt_b["state"].keys()
    for i, s in opt_a["state"].items():
        for name, t in s.items():
            assert torch.equal(torch.as_tensor(t), torch.as_tensor(opt_b["state"][i][name]))

    # the resumed run continues exactly as the original does
    a.step(trajs)
    b.step(trajs)
    for k, v in b.model.state_dict().items():
        assert torch.equal(v, a.model.state_dict()[k]), k


def test_a_full_checkpoint_does_not_load_into_a_lora_model(model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    full = AutoModelForCausalLM.from_pretrained(model_dir)
    path = save_checkpoint(tmp_path, 1, full, None, policy_version=1)
    with pytest.raises(ValueError, match="adapter unexpected"):
        load_checkpoint(path, _trainer(model_dir).model, restore_rng=False)

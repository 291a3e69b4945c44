"""The fused chunked logprob/entropy op against the naive [N x V] reference, in float64."""

from __future__ import annotations

import pytest
import torch

from kernels.logprobs import naive_token_logprobs_and_entropy, token_logprobs_and_entropy


def _inputs(n: int = 13, h: int = 8, v: int = 11, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, targets


@pytest.mark.parametrize("chunk", [1, 4, 13, 1024])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_and_grads_match_naive(chunk: int, temperature: float) -> None:
    hidden, weight, targets = _inputs()
    targets[3] = -100  # an ignored token
    lp, ent = token_logprobs_and_entropy(hidden, weight, targets, chunk, temperature)
    lp_ref, ent_ref = naive_token_logprobs_and_entropy(hidden, weight, targets, temperature)
    torch.testing.assert_close(lp, lp_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ent, ent_ref, rtol=1e-12, atol=1e-12)
    assert lp[3] == 0 and ent[3] == 0

    # Arbitrary upstream grads on both outputs exercise the logp and entropy backward paths.
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(13, generator=g, dtype=torch.float64), torch.randn(13, generator=g)
    b = b.double()
    gh, gw = torch.autograd.grad((lp * a).sum() + (ent * b).sum(), (hidden, weight))
    gh_ref, gw_ref = torch.autograd.grad((lp_ref * a).sum() + (ent_ref * b).sum(), (hidden, weight))
    torch.testing.assert_close(gh, gh_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-10, atol=1e-12)
    assert torch.all(gh[3] == 0)


def test_gradcheck_logp_and_entropy() -> None:
    hidden, weight, targets = _inputs(n=6, h=4, v=5)

    def f(hh: torch.Tensor, ww: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return token_logprobs_and_entropy(hh, ww, targets, chunk_size=4, temperature=0.9)

    assert torch.autograd.gradcheck(f, (hidden, weight), eps=1e-6, atol=1e-8)


def test_logp_only_backward_and_no_weight_grad() -> None:
    hidden, weight, targets = _inputs()
    weight.requires_grad_(False)
    lp, _ = token_logprobs_and_entropy(hidden, weight, targets, chunk_size=5)
    (gh,) = torch.autograd.grad(lp.sum(), (hidden,))
    lp_ref, _ = naive_token_logprobs_and_entropy(hidden, weight, targets)
    (gh_ref,) = torch.autograd.grad(lp_ref.sum(), (hidden,))
    torch.testing.assert_close(gh, gh_ref)


def test_low_precision_inputs_accumulate_in_fp32() -> None:
    hidden, weight, targets = _inputs(n=32, h=16, v=50, dtype=torch.float32)
    hb, wb = hidden.detach().bfloat16(), weight.detach().bfloat16()
    lp, ent = token_logprobs_and_entropy(hb, wb, targets, chunk_size=7)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    lp_ref, ent_ref = naive_token_logprobs_and_entropy(hb.float(), wb.float(), targets)
    torch.testing.assert_close(lp, lp_ref, rtol=2e-2, atol=2e-2)
    assert torch.all(lp <= 0)


def test_bad_shapes_rejected() -> None:
    hidden, weight, targets = _inputs()
    with pytest.raises(ValueError):
        token_logprobs_and_entropy(hidden, weight[:, :3], targets)
    with pytest.raises(ValueError):
        token_logprobs_and_entropy(hidden, weight, targets[:3])
    with pytest.raises(ValueError):
        token_logprobs_and_entropy(hidden, weight, targets, temperature=0.0)

"""The fused chunked logprob/entropy op (torch backend) against the naive [N x V] reference."""

from __future__ import annotations

import pytest
import torch

from kernels import logprobs, truncation
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


def _grads(lp, ent, hidden, weight, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(lp.shape[0], generator=g, dtype=torch.float64).to(lp.dtype)
    b = torch.randn(lp.shape[0], generator=g, dtype=torch.float64).to(lp.dtype)
    return torch.autograd.grad((lp * a).sum() + (ent * b).sum(), (hidden, weight))


def test_fp32_moderate_shape_as_accurate_as_naive(monkeypatch) -> None:
    """fp32 at a realistic-ish shape: no worse than the naive fp32 op, both vs float64 truth."""
    h64, w64, targets = _inputs(n=300, h=64, v=5000)
    targets[::7] = -100
    # A 1 MiB budget -> 16-row chunks with a ragged tail, exercising buffer reuse.
    monkeypatch.setattr(logprobs, "DEFAULT_CHUNK_BYTES", 1 << 20)
    assert logprobs.auto_chunk_rows(5000, torch.float32, 1 << 20) == 16

    def run(fn, dtype):
        hidden = h64.detach().to(dtype).requires_grad_()
        weight = w64.detach().to(dtype).requires_grad_()
        lp, ent = fn(hidden, weight, targets, temperature=0.8)
        return [x.double() for x in (lp, ent, *_grads(lp, ent, hidden, weight))]

    truth = run(naive_token_logprobs_and_entropy, torch.float64)
    fused = run(token_logprobs_and_entropy, torch.float32)
    naive = run(naive_token_logprobs_and_entropy, torch.float32)
    for f, n, t in zip(fused, naive, truth, strict=True):
        err_f, err_n = (f - t).abs().max().item(), (n - t).abs().max().item()
        assert err_f <= 2 * err_n + 1e-6 and err_f < 1e-3


def test_entropy_only_backward() -> None:
    hidden, weight, targets = _inputs()
    _, ent = token_logprobs_and_entropy(hidden, weight, targets, chunk_size=5)
    _, ent_ref = naive_token_logprobs_and_entropy(hidden, weight, targets)
    got = torch.autograd.grad(ent.sum(), (hidden, weight))
    want = torch.autograd.grad(ent_ref.sum(), (hidden, weight))
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


def test_auto_chunk_rows_respects_the_budget() -> None:
    rows = logprobs.auto_chunk_rows(49152, torch.float32)
    assert 2 * rows * 49152 * 4 <= logprobs.DEFAULT_CHUNK_BYTES and rows % 16 == 0
    assert logprobs.auto_chunk_rows(10**9, torch.bfloat16) == 1  # never zero rows
    assert logprobs.auto_chunk_rows(100, torch.float64, 1 << 30) % 16 == 0


def test_empty_batch() -> None:
    hidden, weight, _ = _inputs(n=0)
    lp, ent = token_logprobs_and_entropy(hidden, weight, torch.zeros(0, dtype=torch.long))
    assert lp.shape == ent.shape == (0,)


TRUNCATIONS = [(3, 1.0), (0, 0.6), (0, 0.95), (4, 0.5), (11, 1.0), (50, 0.9)]


@pytest.mark.parametrize(("top_k", "top_p"), TRUNCATIONS)
@pytest.mark.parametrize("chunk", [4, 1024])
def test_truncated_values_and_grads_match_naive(top_k: int, top_p: float, chunk: int) -> None:
    hidden, weight, targets = _inputs(n=13, h=8, v=11)
    targets[3] = -100
    lp, ent = token_logprobs_and_entropy(
        hidden, weight, targets, chunk, 0.7, top_k=top_k, top_p=top_p
    )
    lp_ref, ent_ref = naive_token_logprobs_and_entropy(hidden, weight, targets, 0.7, top_k, top_p)
    torch.testing.assert_close(lp, lp_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ent, ent_ref, rtol=1e-12, atol=1e-12)
    assert torch.all(torch.isfinite(lp)) and torch.all(torch.isfinite(ent))
    for got, want in zip(
        _grads(lp, ent, hidden, weight), _grads(lp_ref, ent_ref, hidden, weight), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_truncation_really_truncates_and_keeps_in_set_targets_exact() -> None:
    hidden, weight, _ = _inputs(n=20, h=8, v=40)
    full = (hidden @ weight.T).detach()
    targets = full.argmax(1)  # always inside any top-k / top-p set
    lp_full, ent_full = token_logprobs_and_entropy(hidden, weight, targets)
    lp_k, ent_k = token_logprobs_and_entropy(hidden, weight, targets, top_k=2)
    # Renormalising over 2 tokens raises the argmax's probability and shrinks the entropy.
    assert torch.all(lp_k > lp_full) and torch.all(ent_k <= torch.log(torch.tensor(2.0)) + 1e-12)
    top2 = full.topk(2, dim=1).values
    torch.testing.assert_close(lp_k, top2[:, 0] - torch.logsumexp(top2, 1))
    lp_1, ent_1 = token_logprobs_and_entropy(hidden, weight, targets, top_k=1)
    assert torch.all(lp_1 == 0) and torch.all(ent_1 == 0)
    # top_k >= V and top_p = 1 are no-ops.
    lp_off, _ = token_logprobs_and_entropy(hidden, weight, targets, top_k=40, top_p=1.0)
    torch.testing.assert_close(lp_off, lp_full)


def test_wide_nucleus_falls_back_to_a_full_sort(monkeypatch) -> None:
    monkeypatch.setattr(truncation, "_TOP_P_PROBE", 4)  # nucleus of a flat-ish row is wider
    hidden, weight, targets = _inputs(n=10, h=8, v=60)
    with torch.no_grad():
        weight *= 0.2
    lp, ent = token_logprobs_and_entropy(hidden, weight, targets, top_p=0.9)
    lp_ref, ent_ref = naive_token_logprobs_and_entropy(hidden, weight, targets, top_p=0.9)
    torch.testing.assert_close(lp, lp_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ent, ent_ref, rtol=1e-12, atol=1e-12)


def test_gradcheck_truncated() -> None:
    hidden, weight, targets = _inputs(n=6, h=4, v=9)

    def f(hh: torch.Tensor, ww: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return token_logprobs_and_entropy(hh, ww, targets, 4, 0.9, top_k=5, top_p=0.8)

    assert torch.autograd.gradcheck(f, (hidden, weight), eps=1e-6, atol=1e-8)


def test_bad_truncation_rejected() -> None:
    hidden, weight, targets = _inputs()
    for kw in ({"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(ValueError):
            token_logprobs_and_entropy(hidden, weight, targets, **kw)
    with pytest.raises(ValueError):
        token_logprobs_and_entropy(hidden, weight, targets, backend="cuda-magic")

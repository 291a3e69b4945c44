"""The Triton backend against the torch backend and the naive reference.

No GPU is needed: Triton's interpreter (TRITON_INTERPRET=1) runs the same kernel source with
numpy, one program at a time, so the shapes stay small and the vocab tile is shrunk to force
several tiles (the online max/sum rescaling) and a ragged last tile.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

ON_GPU = torch.cuda.is_available()
_saved_env = os.environ.get("TRITON_INTERPRET")
if not ON_GPU and "triton" not in sys.modules:
    # Triton decorates its own standard library (tl.sum, tl.max, ...) when it is first imported,
    # so the interpreter must be chosen before that import, i.e. while this module is collected.
    os.environ["TRITON_INTERPRET"] = "1"
try:
    triton = pytest.importorskip("triton", reason="triton is not installed; nothing to check")
finally:
    # Not for the rest of the session: subprocesses (e.g. vLLM actors) would inherit it.
    if _saved_env is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _saved_env

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from kernels.logprobs import naive_token_logprobs_and_entropy, token_logprobs_and_entropy  # noqa: E402

if not ON_GPU and not isinstance(triton.language.sum, InterpretedFunction):
    pytest.skip(
        "triton was imported before TRITON_INTERPRET=1 could be set and there is no GPU; "
        "run this file on its own",
        allow_module_level=True,
    )
DEVICE = "cuda" if ON_GPU else "cpu"


@pytest.fixture(scope="module", autouse=True)
def kernels_module():
    """The kernels module, (re)loaded now so its @triton.jit sees the interpreter setting."""
    import kernels.triton_logprobs as tlp

    mp = pytest.MonkeyPatch()
    if not ON_GPU:
        mp.setenv("TRITON_INTERPRET", "1")  # only while this module's tests run
    importlib.reload(tlp)
    mp.setattr(tlp, "MAX_BLOCK_V", 64)  # V=203 -> 4 tiles, the last one ragged
    yield tlp
    mp.undo()
    if not ON_GPU:
        importlib.reload(tlp)  # back to plain JIT kernels, matching the restored environment


def _inputs(n: int = 9, h: int = 16, v: int = 203, seed: int = 0, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(DEVICE).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * scale).to(DEVICE).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g).to(DEVICE)
    targets[2] = -100  # ignored token
    return hidden, weight, targets


def _run(backend: str, hidden, weight, targets, a, b, **kw):
    lp, ent = token_logprobs_and_entropy(hidden, weight, targets, backend=backend, **kw)
    loss = (lp * a).sum() + (ent * b).sum() if b is not None else (lp * a).sum()
    gh, gw = torch.autograd.grad(loss, (hidden, weight))
    return lp, ent, gh, gw


def _upstream(n: int = 9, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g).to(DEVICE), torch.randn(n, generator=g).to(DEVICE)


def _close(got, want, tol: float = 2e-5) -> None:
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


@pytest.mark.parametrize("chunk", [4, 9])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_values_and_grads_match_torch_backend(chunk: int, temperature: float) -> None:
    hidden, weight, targets = _inputs()
    a, b = _upstream()
    kw = {"chunk_size": chunk, "temperature": temperature}
    got = _run("triton", hidden, weight, targets, a, b, **kw)
    want = _run("torch", hidden, weight, targets, a, b, **kw)
    _close(got, want)
    assert got[0][2] == 0 and got[1][2] == 0 and torch.all(got[2][2] == 0)


def test_online_rescaling_when_the_max_comes_late() -> None:
    # Logits growing along the vocab put each new max in a later tile, with a wide range.
    hidden, weight, targets = _inputs(scale=4.0)
    with torch.no_grad():
        weight += torch.linspace(0, 3, weight.shape[0], device=weight.device)[:, None]
    a, b = _upstream()
    _close(
        _run("triton", hidden, weight, targets, a, b),
        _run("torch", hidden, weight, targets, a, b),
        1e-4,
    )


@pytest.mark.parametrize("which", ["logp", "entropy"])
def test_single_output_gradients(which: str) -> None:
    hidden, weight, targets = _inputs()
    a, _ = _upstream()
    outs = {}
    for backend in ("triton", "torch"):
        lp, ent = token_logprobs_and_entropy(hidden, weight, targets, 4, backend=backend)
        outs[backend] = torch.autograd.grad(
            ((lp if which == "logp" else ent) * a).sum(), (hidden, weight)
        )
    _close(outs["triton"], outs["torch"])


@pytest.mark.parametrize(("top_k", "top_p"), [(5, 1.0), (0, 0.8), (20, 0.7)])
def test_truncation_matches_naive(top_k: int, top_p: float) -> None:
    hidden, weight, targets = _inputs(scale=0.7)
    a, b = _upstream()
    kw = {"temperature": 0.9, "top_k": top_k, "top_p": top_p}
    lp, ent = token_logprobs_and_entropy(hidden, weight, targets, 4, backend="triton", **kw)
    got = (lp, ent, *torch.autograd.grad((lp * a).sum() + (ent * b).sum(), (hidden, weight)))
    lp_r, ent_r = naive_token_logprobs_and_entropy(hidden, weight, targets, **kw)
    want = (
        lp_r,
        ent_r,
        *torch.autograd.grad((lp_r * a).sum() + (ent_r * b).sum(), (hidden, weight)),
    )
    _close(got, want)
    assert torch.all(torch.isfinite(lp))


def test_auto_picks_triton_only_for_cuda(kernels_module, monkeypatch) -> None:
    calls = []
    real = kernels_module.forward
    monkeypatch.setattr(kernels_module, "forward", lambda *a: calls.append(1) or real(*a))
    hidden, weight, targets = _inputs()
    token_logprobs_and_entropy(hidden, weight, targets)
    token_logprobs_and_entropy(hidden.detach().cpu(), weight.detach().cpu(), targets.cpu())
    assert len(calls) == (1 if ON_GPU else 0)


def test_bf16_inputs_keep_fp32_statistics() -> None:
    hidden, weight, targets = _inputs()
    hb = hidden.detach().bfloat16().requires_grad_()
    wb = weight.detach().bfloat16().requires_grad_()
    a, b = _upstream()
    got = _run("triton", hb, wb, targets, a, b, chunk_size=4)
    want = _run("torch", hb, wb, targets, a, b, chunk_size=4)
    assert got[0].dtype == torch.float32 and got[2].dtype == torch.bfloat16
    _close(got[:2], want[:2], 1e-5)
    # Gradients pass through bf16 logit buffers in the Triton path: bf16-level agreement.
    for x, y in zip(got[2:], want[2:], strict=True):
        torch.testing.assert_close(x.float(), y.float(), rtol=2e-2, atol=2e-2)


def test_strided_targets() -> None:
    hidden, weight, targets = _inputs()
    strided = torch.stack([targets, torch.zeros_like(targets)], 1)[:, 0]  # stride 2
    assert not strided.is_contiguous()
    a, b = _upstream()
    _close(
        _run("triton", hidden, weight, strided, a, b), _run("torch", hidden, weight, targets, a, b)
    )

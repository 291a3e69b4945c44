"""Fused, chunked LM head -> log-softmax -> gather (+ entropy) for the learner.

A policy-gradient step needs only logp(target) and the entropy per token, yet the naive
`log_softmax(hidden @ weight.T)` materialises an [N x V] tensor (and autograd keeps it, plus
the softmax, for backward): for 64k tokens x 150k vocab in fp32 that is ~40 GB. Here the
forward walks over token chunks, keeping only per-token `logp`, `entropy` and the
log-partition `lse`; the backward recomputes each chunk's logits from (hidden, weight) and
turns them into gradients immediately, so peak extra memory is O(chunk_size x V).

Gradients flow to `hidden` and `weight` from both outputs: logp (the policy gradient) and
entropy (an entropy bonus). `targets` < 0 mark ignored tokens: logp and entropy are 0 there and
they contribute no gradient.

Backends: "torch" is the portable path used on CPU. A Triton path will register in
`_BACKENDS` under "triton" with the same (forward, backward) contract; "auto" picks it for
CUDA tensors once it exists.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

IGNORE_INDEX = -100


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # Softmax statistics in bf16/fp16 lose ~3 digits; accumulate in fp32 (or fp64 if given).
    return torch.promote_types(dtype, torch.float32)


def _chunk_stats(
    h: Tensor, weight: Tensor, tgt: Tensor, inv_t: float, acc: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """(lse, logp[target], entropy) of one chunk's scaled logits s = (h W^T)/T."""
    s = (h @ weight.T).to(acc) * inv_t  # [n, V]
    lse = torch.logsumexp(s, dim=-1)  # [n]
    safe_tgt = tgt.clamp_min(0)
    logp = s.gather(1, safe_tgt[:, None]).squeeze(1) - lse
    p = torch.exp(s - lse[:, None])
    # H = -sum p log p = lse - sum p s
    ent = lse - (p * s).sum(-1)
    valid = tgt >= 0
    return lse, torch.where(valid, logp, 0.0), torch.where(valid, ent, 0.0)


def _torch_forward(
    hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int, inv_t: float
) -> tuple[Tensor, Tensor, Tensor]:
    acc = _acc_dtype(hidden.dtype)
    n = hidden.shape[0]
    logp = hidden.new_empty(n, dtype=acc)
    ent = hidden.new_empty(n, dtype=acc)
    lse = hidden.new_empty(n, dtype=acc)
    for i in range(0, n, chunk):
        sl = slice(i, i + chunk)
        lse[sl], logp[sl], ent[sl] = _chunk_stats(hidden[sl], weight, targets[sl], inv_t, acc)
    return logp, ent, lse


def _torch_backward(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    lse: Tensor,
    ent: Tensor,
    g_logp: Tensor | None,
    g_ent: Tensor | None,
    chunk: int,
    inv_t: float,
    need_hidden: bool,
    need_weight: bool,
) -> tuple[Tensor | None, Tensor | None]:
    acc = _acc_dtype(hidden.dtype)
    grad_h = torch.empty_like(hidden) if need_hidden else None
    # Accumulate dW over chunks in the accumulation dtype; cast once at the end.
    grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None
    w_acc = weight.to(acc)
    for i in range(0, hidden.shape[0], chunk):
        sl = slice(i, i + chunk)
        h, tgt = hidden[sl], targets[sl]
        valid = (tgt >= 0).to(acc)
        s = (h @ weight.T).to(acc) * inv_t
        logp_all = s - lse[sl, None]
        p = torch.exp(logp_all)
        # d/ds of logp[t] = onehot(t) - p ; d/ds of H = -p * (log p + H)
        gs = torch.zeros_like(s)
        if g_logp is not None:
            g = g_logp[sl].to(acc) * valid
            gs -= p * g[:, None]
            gs.scatter_add_(1, tgt.clamp_min(0)[:, None], g[:, None])
        if g_ent is not None:
            g = g_ent[sl].to(acc) * valid
            gs -= p * (logp_all + ent[sl, None]) * g[:, None]
        gs *= inv_t  # chain rule through s = z / T
        if grad_h is not None:
            grad_h[sl] = (gs @ w_acc).to(hidden.dtype)
        if grad_w is not None:
            grad_w += gs.T @ h.to(acc)
    return grad_h, (grad_w.to(weight.dtype) if grad_w is not None else None)


# name -> (forward, backward); the Triton path registers here with the same signatures.
_BACKENDS: dict[str, tuple[Callable[..., tuple], Callable[..., tuple]]] = {
    "torch": (_torch_forward, _torch_backward),
}


def _pick_backend(name: str, hidden: Tensor) -> str:
    if name == "auto":
        return "triton" if hidden.is_cuda and "triton" in _BACKENDS else "torch"
    if name not in _BACKENDS:
        raise ValueError(f"unknown logprob backend {name!r}; have {sorted(_BACKENDS)}")
    return name


class _FusedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        targets: Tensor,
        chunk: int,
        inv_t: float,
        backend: str,
    ) -> tuple[Tensor, Tensor]:
        fwd, _ = _BACKENDS[backend]
        logp, ent, lse = fwd(hidden, weight, targets, chunk, inv_t)
        ctx.save_for_backward(hidden, weight, targets, lse, ent)
        ctx.chunk, ctx.inv_t, ctx.backend = chunk, inv_t, backend
        # Unused outputs arrive as None, so e.g. no entropy-gradient work when H is only logged.
        ctx.set_materialize_grads(False)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp: Tensor | None, g_ent: Tensor | None):  # type: ignore[override]
        hidden, weight, targets, lse, ent = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (g_logp is None and g_ent is None) or not (need_h or need_w):
            return None, None, None, None, None, None
        _, bwd = _BACKENDS[ctx.backend]
        grad_h, grad_w = bwd(
            hidden, weight, targets, lse, ent, g_logp, g_ent, ctx.chunk, ctx.inv_t, need_h, need_w
        )
        return grad_h, grad_w, None, None, None, None


def token_logprobs_and_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    chunk_size: int = 1024,
    temperature: float = 1.0,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """logp[i] = log softmax(hidden[i] @ weight.T / T)[targets[i]] and the entropy of that softmax.

    hidden: [N, H]; weight: [V, H] (the LM head); targets: [N] int (negative = ignore).
    Returns (logp[N], entropy[N]) in fp32 (fp64 if the inputs are fp64), both differentiable
    w.r.t. hidden and weight. Never holds more than `chunk_size` x V logits at once.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"want hidden [N,H], weight [V,H]; got {hidden.shape}, {weight.shape}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets {tuple(targets.shape)} != [{hidden.shape[0]}]")
    if temperature <= 0:
        raise ValueError("temperature must be > 0 (greedy sampling has no logprobs to correct)")
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    name = _pick_backend(backend, hidden)
    return _FusedLogprobs.apply(
        hidden, weight, targets.long(), int(chunk_size), 1.0 / float(temperature), name
    )


def naive_token_logprobs_and_entropy(
    hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Reference implementation (materialises [N x V]); for tests and benchmarks."""
    s = (hidden @ weight.T).to(_acc_dtype(hidden.dtype)) / temperature
    logp_all = torch.log_softmax(s, dim=-1)
    valid = targets >= 0
    logp = logp_all.gather(1, targets.clamp_min(0).long()[:, None]).squeeze(1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return torch.where(valid, logp, 0.0), torch.where(valid, ent, 0.0)

"""Fused, chunked LM head -> log-softmax -> gather (+ entropy) for the learner.

A policy-gradient step needs only logp(target) and the entropy per token, yet the naive
`log_softmax(hidden @ weight.T)` materialises an [N x V] tensor (and autograd keeps it, plus
the softmax, for backward): for 64k tokens x 150k vocab in fp32 that is ~40 GB. Here the
forward walks over token chunks, keeping only per-token `logp`, `entropy` and the
log-partition `lse`; the backward recomputes each chunk's logits from (hidden, weight) and
turns them into gradients immediately, so peak extra memory is two [chunk x V] buffers.

On CPU the recompute (one extra GEMM) is paid for by never allocating fresh [N x V] tensors:
the naive path spends most of its time page-faulting and streaming ~10 of them through memory,
while here two [chunk x V] buffers are reused with in-place ops and per-token (not per-logit)
quantities are all that is saved between forward and backward.

Gradients flow to `hidden` and `weight` from both outputs: logp (the policy gradient) and
entropy (an entropy bonus). `targets` < 0 mark ignored tokens: logp and entropy are 0 there and
they contribute no gradient.

Sampling truncation (`top_k`, `top_p`) makes logp the log-probability under the same
renormalised distribution vLLM sampled from, so the importance ratio is not biased by the
truncated tail. The kept set is a per-token logit threshold chosen without gradient; the
target token is always kept, because the learner's logits differ from the actor's by rounding
and a sampled token that falls just outside would otherwise get logp = -inf and NaN the loss.

Backends: "torch" (portable, used on CPU) and "triton" (`kernels/triton_logprobs.py`, picked by
"auto" for CUDA tensors when Triton is installed). Both share the contract of `_torch_forward`
and `_torch_backward`.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from functools import cache

import torch
from torch import Tensor

from kernels.truncation import acc_dtype, grad_coefficients, keep_threshold

IGNORE_INDEX = -100
# Two [rows x V] accumulation buffers live at once; this bounds them when chunk_size is None.
# Every chunk streams the whole [V x H] weight through four GEMMs, so rows should be in the
# hundreds (672 at V=49k in fp32) for that traffic to stay small next to the FLOPs; the
# elementwise passes are memory-bound at any chunk size, so bigger costs no speed, only memory.
DEFAULT_CHUNK_BYTES = 256 << 20
# Dropped logits are written as (this far below the row's reference point) rather than -inf:
# exp() of it is exactly 0 in fp32 and fp64, and 0 * it stays 0 (0 * -inf would be NaN).
_DROPPED = -1e4


def auto_chunk_rows(n_vocab: int, dtype: torch.dtype, budget_bytes: int | None = None) -> int:
    """Token rows per chunk so that two [rows x V] accumulation buffers fit in the budget
    (default DEFAULT_CHUNK_BYTES, read at call time)."""
    budget = DEFAULT_CHUNK_BYTES if budget_bytes is None else budget_bytes
    per_row = 2 * n_vocab * torch.empty((), dtype=acc_dtype(dtype)).element_size()
    rows = max(1, budget // per_row)
    return rows if rows < 16 else rows // 16 * 16


def _logits_into(out: Tensor, h: Tensor, weight: Tensor, inv_t: float) -> Tensor:
    """out[:] = (h @ weight.T) * inv_t in the accumulation dtype, without a temporary."""
    if h.dtype == out.dtype and weight.dtype == out.dtype:
        # Scaling the [n x H] rows instead of the [n x V] product saves a full pass.
        return torch.mm(h * inv_t if inv_t != 1.0 else h, weight.T, out=out)
    out.copy_(h @ weight.T)  # low-precision GEMM, statistics in fp32
    return out.mul_(inv_t) if inv_t != 1.0 else out


def _dropped_mask(s: Tensor, thr: Tensor, tgt: Tensor) -> Tensor:
    mask = s < thr[:, None]
    # Recomputed logits can differ from the forward's in the last bit; pin the target as kept.
    mask[torch.arange(s.shape[0], device=s.device), tgt] = False
    return mask


def _torch_forward(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    chunk: int,
    inv_t: float,
    top_k: int,
    top_p: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """-> (logp, entropy, lse, thr): lse and thr (None = no truncation) are for backward."""
    acc = acc_dtype(hidden.dtype)
    n, v = hidden.shape[0], weight.shape[0]
    logp, ent, lse = (hidden.new_empty(n, dtype=acc) for _ in range(3))
    truncate = 0 < top_k < v or top_p < 1.0
    thr = hidden.new_empty(n, dtype=acc) if truncate else None
    rows = min(chunk, n)
    s_buf = hidden.new_empty((rows, v), dtype=acc)  # logits, then logits - rowmax
    e_buf = torch.empty_like(s_buf)  # exp(logits - rowmax)
    for i in range(0, n, rows):
        sl = slice(i, i + rows)
        k = min(rows, n - i)
        tgt = targets[sl].clamp_min(0)
        s = _logits_into(s_buf[:k], hidden[sl], weight, inv_t)
        s_t = s.gather(1, tgt[:, None]).squeeze(1)
        m = s.amax(1)  # the max is always kept, so it is the truncated max too
        mask = None
        if thr is not None:
            thr[sl] = keep_threshold(s, top_k, top_p)
            mask = _dropped_mask(s, thr[sl], tgt)
        s.sub_(m[:, None])
        if mask is not None:
            s.masked_fill_(mask, _DROPPED)
        e = torch.exp(s, out=e_buf[:k])
        z = e.sum(1)
        # H = log Z - sum(e * t) / Z with t = s - m; e is spent, so the product reuses it.
        et = e.mul_(s).sum(1)
        log_z = z.log()
        lse[sl] = m + log_z
        valid = targets[sl] >= 0
        logp[sl] = torch.where(valid, s_t - lse[sl], 0.0)
        ent[sl] = torch.where(valid, log_z - et / z, 0.0)
    return logp, ent, lse, thr


def _torch_backward(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    lse: Tensor,
    ent: Tensor,
    thr: Tensor | None,
    g_logp: Tensor | None,
    g_ent: Tensor | None,
    chunk: int,
    inv_t: float,
    need_hidden: bool,
    need_weight: bool,
) -> tuple[Tensor | None, Tensor | None]:
    acc = acc_dtype(hidden.dtype)
    n, v = hidden.shape[0], weight.shape[0]
    gl, c0, c1 = grad_coefficients(targets, ent, g_logp, g_ent, inv_t)

    grad_h = torch.empty_like(hidden) if need_hidden else None
    # dW accumulates over chunks in the accumulation dtype; cast once at the end.
    grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None
    rows = min(chunk, n)
    s_buf = hidden.new_empty((rows, v), dtype=acc)
    e_buf = torch.empty_like(s_buf) if c1 is not None else None
    same = hidden.dtype == acc and weight.dtype == acc
    for i in range(0, n, rows):
        sl = slice(i, i + rows)
        k = min(rows, n - i)
        tgt = targets[sl].clamp_min(0)
        s = _logits_into(s_buf[:k], hidden[sl], weight, inv_t)
        mask = _dropped_mask(s, thr[sl], tgt) if thr is not None else None
        s.sub_(lse[sl, None])  # log p
        if mask is not None:
            s.masked_fill_(mask, _DROPPED)
        if c1 is None:
            g = s.exp_().mul_(c0[sl, None])
        else:
            assert e_buf is not None  # allocated whenever c1 is
            g = torch.exp(s, out=e_buf[:k])
            g.mul_(torch.addcmul(c0[sl, None], s, c1[sl, None], out=s))
        if gl is not None:
            g.scatter_add_(1, tgt[:, None], gl[sl, None])
        g_mm = g if same else g.to(weight.dtype)
        if grad_h is not None:
            if same:
                torch.mm(g_mm, weight, out=grad_h[sl])
            else:
                grad_h[sl] = g_mm @ weight
        if grad_w is not None:
            h = hidden[sl]
            if same:
                grad_w.addmm_(g_mm.T, h)
            else:
                grad_w += g_mm.T @ h
    return grad_h, (grad_w.to(weight.dtype) if grad_w is not None else None)


Backend = tuple[Callable[..., tuple], Callable[..., tuple]]


@cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _backend(name: str) -> Backend:
    if name == "torch":
        return _torch_forward, _torch_backward
    # Imported lazily: Triton is optional, and tests reload it under TRITON_INTERPRET=1.
    mod = importlib.import_module("kernels.triton_logprobs")
    return mod.forward, mod.backward


def _pick_backend(name: str, hidden: Tensor) -> str:
    if name == "auto":
        return "triton" if hidden.is_cuda and triton_available() else "torch"
    if name not in ("torch", "triton"):
        raise ValueError(f"unknown logprob backend {name!r}; have ['torch', 'triton']")
    if name == "triton" and not triton_available():
        raise ValueError("backend 'triton' requested but triton is not installed")
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
        top_k: int,
        top_p: float,
    ) -> tuple[Tensor, Tensor]:
        fwd, _ = _backend(backend)
        logp, ent, lse, thr = fwd(hidden, weight, targets, chunk, inv_t, top_k, top_p)
        ctx.save_for_backward(hidden, weight, targets, lse, ent, thr)
        ctx.chunk, ctx.inv_t, ctx.backend = chunk, inv_t, backend
        # Unused outputs arrive as None, so e.g. no entropy-gradient work when H is only logged.
        ctx.set_materialize_grads(False)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp: Tensor | None, g_ent: Tensor | None):
        hidden, weight, targets, lse, ent, thr = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        none = (None,) * 6
        if (g_logp is None and g_ent is None) or not (need_h or need_w):
            return None, None, *none
        _, bwd = _backend(ctx.backend)
        grad_h, grad_w = bwd(
            hidden,
            weight,
            targets,
            lse,
            ent,
            thr,
            g_logp,
            g_ent,
            ctx.chunk,
            ctx.inv_t,
            need_h,
            need_w,
        )
        return grad_h, grad_w, *none


def token_logprobs_and_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    chunk_size: int | None = None,
    temperature: float = 1.0,
    backend: str = "auto",
    top_k: int = 0,
    top_p: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """logp[i] = log softmax(hidden[i] @ weight.T / T)[targets[i]] and the entropy of that softmax.

    hidden: [N, H]; weight: [V, H] (the LM head); targets: [N] int (negative = ignore).
    top_k (0 = off) / top_p (1.0 = off): truncate as vLLM does before sampling; logp and entropy
    are then those of the renormalised kept set (which always includes the target).
    chunk_size: token rows per chunk; None sizes it from DEFAULT_CHUNK_BYTES.
    Returns (logp[N], entropy[N]) in fp32 (fp64 if the inputs are fp64), both differentiable
    w.r.t. hidden and weight. Never holds more than two chunk x V buffers of logits at once.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"want hidden [N,H], weight [V,H]; got {hidden.shape}, {weight.shape}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets {tuple(targets.shape)} != [{hidden.shape[0]}]")
    if temperature <= 0:
        raise ValueError("temperature must be > 0 (greedy sampling has no logprobs to correct)")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    if top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"want top_k >= 0 and 0 < top_p <= 1; got {top_k}, {top_p}")
    name = _pick_backend(backend, hidden)
    if hidden.shape[0] == 0:
        z = hidden.new_zeros(0, dtype=acc_dtype(hidden.dtype))
        return z, z.clone()
    chunk = chunk_size or auto_chunk_rows(weight.shape[0], hidden.dtype)
    return _FusedLogprobs.apply(
        hidden,
        weight,
        targets.long().contiguous(),  # the Triton kernels index it with stride 1
        int(chunk),
        1.0 / float(temperature),
        name,
        int(top_k),
        float(top_p),
    )


def naive_token_logprobs_and_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Reference implementation (materialises [N x V]); for tests and benchmarks.

    Truncation follows vLLM's sampler literally (ascending sort, top-k cut, then mask while the
    ascending cumulative probability is <= 1 - top_p), plus the always-kept target.
    """
    s = (hidden @ weight.T).to(acc_dtype(hidden.dtype)) / temperature
    tgt = targets.clamp_min(0).long()[:, None]
    truncate = 0 < top_k < s.shape[1] or top_p < 1.0
    if truncate:
        with torch.no_grad():
            srt, idx = s.sort(dim=-1)
            if 0 < top_k < s.shape[1]:
                kth = srt[:, -top_k, None]
                srt = srt.masked_fill(srt < kth, -torch.inf)
            if top_p < 1.0:
                cum = srt.softmax(-1).cumsum(-1)
                drop = cum <= 1 - top_p
                drop[:, -1] = False
                srt = srt.masked_fill(drop, -torch.inf)
            dropped = torch.empty_like(srt, dtype=torch.bool).scatter_(1, idx, srt == -torch.inf)
            dropped.scatter_(1, tgt, False)
        s = s.masked_fill(dropped, -torch.inf)
    logp_all = torch.log_softmax(s, dim=-1)
    valid = targets >= 0
    logp = logp_all.gather(1, tgt).squeeze(1)
    # 0 * -inf would NaN the entropy; without truncation this stays the textbook expression.
    finite = torch.where(logp_all > -torch.inf, logp_all, 0.0) if truncate else logp_all
    ent = -(logp_all.exp() * finite).sum(-1)
    return torch.where(valid, logp, 0.0), torch.where(valid, ent, 0.0)

"""Triton backend for `kernels.logprobs.token_logprobs_and_entropy` (CUDA tensors).

Same chunked plan as the torch backend, but the per-chunk softmax work is one fused kernel
instead of ~8 full passes over the [chunk x V] logits:

* forward: cuBLAS writes a chunk's logits z = h @ W^T in the input dtype; `_stats_kernel` (one
  program per token) streams that row once in BLOCK_V tiles, keeping an online max, partition
  sum and entropy sum in fp32 registers, and emits lse, logp[target] and the entropy.
* backward: cuBLAS recomputes the chunk's logits; `_grad_kernel` overwrites them in place with
  d loss / d z (so no second buffer), and cuBLAS turns that into grad_h and grad_W.

The GEMMs stay in cuBLAS on purpose: they are nearly all of the FLOPs and tensor-core GEMMs are
hard to beat by hand, while the softmax/entropy passes are memory-bound and are exactly what
fusing saves. Sampling truncation reuses `keep_threshold` (torch) on the chunk's logits; the
kernels only apply the per-token threshold.

Precision: the logit buffer has the input dtype, so with bf16 inputs d loss / d z is rounded
to bf16 before the GEMMs (as autograd through a bf16 matmul would do); the statistics and dW
accumulate in fp32. fp64 inputs are computed in fp32 here; the torch backend keeps fp64.

Tested on CPU tensors with TRITON_INTERPRET=1 (tests/unit/kernels/test_kernels_triton.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.truncation import acc_dtype, grad_coefficients, keep_threshold


@triton.jit
def _stats_kernel(
    logits_ptr,  # [rows, V] unscaled logits z, any float dtype
    stride_row,
    tgt_ptr,  # [rows] int64, < 0 = ignored
    thr_ptr,  # [rows] lowest kept scaled logit (read only if HAS_THR)
    lse_ptr,  # out [rows] fp32: log-partition of the (truncated) distribution
    logp_ptr,  # out [rows] fp32
    ent_ptr,  # out [rows] fp32
    n_vocab,
    inv_t,
    HAS_THR: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    # int64 row offset: rows x V exceeds 2**31 elements for large chunks of a 150k vocab.
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    tgt = tl.load(tgt_ptr + row)
    tgt_col = tl.maximum(tgt, 0)
    if HAS_THR:
        thr = tl.load(thr_ptr + row)

    # Online softmax statistics relative to the running max m (all fp32):
    #   z_sum = sum exp(s - m),  a_sum = sum exp(s - m) * (s - m)
    # so that at the end lse = m + log z_sum and entropy = log z_sum - a_sum / z_sum.
    # Keeping a_sum relative to m (not sum p*s) avoids cancelling two large numbers.
    m = float("-inf")
    z_sum = 0.0
    a_sum = 0.0
    s_tgt = 0.0
    for start in range(0, n_vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < n_vocab
        s = tl.load(row_ptr + cols, mask=in_row, other=float("-inf")).to(tl.float32) * inv_t
        keep = in_row
        if HAS_THR:
            # The target is always kept (see keep_threshold); dropped logits act as -inf.
            keep = keep & ((s >= thr) | (cols == tgt_col))
        s = tl.where(keep, s, float("-inf"))
        s_tgt += tl.sum(tl.where(cols == tgt_col, s, 0.0), axis=0)

        m_new = tl.maximum(m, tl.max(s, axis=0))
        # Until something is kept m_new is -inf; shift by 0 then so no inf - inf NaNs appear.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        # Rescale the running sums from m to m_ref: exp(s-m_ref) = exp(s-m) exp(d), and
        # (s - m_ref) = (s - m) + d with d = m - m_ref. With z_sum == 0 there is nothing to move.
        d = tl.where(z_sum > 0.0, m - m_ref, 0.0)
        alpha = tl.exp(d)
        t = s - m_ref
        e = tl.exp(t)  # exactly 0 where dropped
        et = e * tl.where(keep, t, 0.0)  # not e * t: 0 * -inf is NaN
        a_sum = alpha * (a_sum + d * z_sum) + tl.sum(et, axis=0)
        z_sum = alpha * z_sum + tl.sum(e, axis=0)
        m = m_new

    log_z = tl.log(z_sum)
    lse = m + log_z
    valid = tgt >= 0
    tl.store(lse_ptr + row, lse)
    tl.store(logp_ptr + row, tl.where(valid, s_tgt - lse, 0.0))
    tl.store(ent_ptr + row, tl.where(valid, log_z - a_sum / z_sum, 0.0))


@triton.jit
def _grad_kernel(
    logits_ptr,  # [rows, V] in: unscaled logits z; out (in place): d loss / d z
    stride_row,
    tgt_ptr,
    thr_ptr,
    lse_ptr,  # [rows] fp32 from the forward
    c0_ptr,  # [rows] fp32 coefficients, see kernels.truncation.grad_coefficients
    c1_ptr,  # read only if HAS_C1 (entropy carries gradient)
    gl_ptr,  # read only if HAS_GL (logp carries gradient)
    n_vocab,
    inv_t,
    HAS_THR: tl.constexpr,
    HAS_C1: tl.constexpr,
    HAS_GL: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    tgt_col = tl.maximum(tl.load(tgt_ptr + row), 0)
    lse = tl.load(lse_ptr + row)
    c0 = tl.load(c0_ptr + row)
    if HAS_C1:
        c1 = tl.load(c1_ptr + row)
    if HAS_GL:
        gl = tl.load(gl_ptr + row)
    if HAS_THR:
        thr = tl.load(thr_ptr + row)
    for start in range(0, n_vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < n_vocab
        s = tl.load(row_ptr + cols, mask=in_row, other=0.0).to(tl.float32) * inv_t
        keep = in_row
        if HAS_THR:
            keep = keep & ((s >= thr) | (cols == tgt_col))
        logp = s - lse
        coef = c0
        if HAS_C1:
            coef = c0 + c1 * logp
        # Dropped tokens have p = 0 and no gradient (the kept set is a constant).
        g = tl.where(keep, tl.exp(logp) * coef, 0.0)
        if HAS_GL:
            g += tl.where(cols == tgt_col, gl, 0.0)
        tl.store(row_ptr + cols, g, mask=in_row)  # cast to the buffer's dtype on store


# Widest vocab tile. Wide tiles amortise the loop; a 4096-wide fp32 tile is 16 KiB of registers
# across 8 warps. Tests shrink it to get several tiles out of a small vocab.
MAX_BLOCK_V = 4096


def _launch_cfg(n_vocab: int) -> dict:
    block = min(MAX_BLOCK_V, triton.next_power_of_2(n_vocab))
    return {"BLOCK_V": block, "num_warps": 8 if block >= 2048 else 4}


def forward(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    chunk: int,
    inv_t: float,
    top_k: int,
    top_p: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    acc = acc_dtype(hidden.dtype)
    n, v = hidden.shape[0], weight.shape[0]
    logp, ent, lse = (hidden.new_empty(n, dtype=acc) for _ in range(3))
    thr = hidden.new_empty(n, dtype=acc) if (0 < top_k < v or top_p < 1.0) else None
    rows = min(chunk, n)
    buf = hidden.new_empty((rows, v))  # input dtype: bf16 logits halve the memory traffic
    cfg = _launch_cfg(v)
    for i in range(0, n, rows):
        sl = slice(i, i + rows)
        k = min(rows, n - i)
        z = torch.mm(hidden[sl], weight.T, out=buf[:k])
        if thr is not None:
            # Same fp32 arithmetic as the kernel's, so the threshold compares like with like.
            thr[sl] = keep_threshold(z.to(acc) * inv_t, top_k, top_p)
        _stats_kernel[(k,)](
            z,
            z.stride(0),
            targets[sl],
            thr[sl] if thr is not None else lse[sl],
            lse[sl],
            logp[sl],
            ent[sl],
            v,
            inv_t,
            HAS_THR=thr is not None,
            **cfg,
        )
    return logp, ent, lse, thr


def backward(
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
    n, v = hidden.shape[0], weight.shape[0]
    gl, c0, c1 = grad_coefficients(targets, ent, g_logp, g_ent, inv_t)
    grad_h = torch.empty_like(hidden) if need_hidden else None
    # dW sums over every chunk: keep it in fp32 even for bf16 weights.
    grad_w = (
        torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device) if need_weight else None
    )
    rows = min(chunk, n)
    buf = hidden.new_empty((rows, v))
    cfg = _launch_cfg(v)
    for i in range(0, n, rows):
        sl = slice(i, i + rows)
        k = min(rows, n - i)
        z = torch.mm(hidden[sl], weight.T, out=buf[:k])
        _grad_kernel[(k,)](
            z,
            z.stride(0),
            targets[sl],
            thr[sl] if thr is not None else lse[sl],
            lse[sl],
            c0[sl],
            c1[sl] if c1 is not None else c0[sl],
            gl[sl] if gl is not None else c0[sl],
            v,
            inv_t,
            HAS_THR=thr is not None,
            HAS_C1=c1 is not None,
            HAS_GL=gl is not None,
            **cfg,
        )
        if grad_h is not None:
            torch.mm(z, weight, out=grad_h[sl])
        if grad_w is not None:
            if z.dtype == grad_w.dtype:
                grad_w.addmm_(z.T, hidden[sl])
            else:
                grad_w += z.T @ hidden[sl]
    return grad_h, (grad_w.to(weight.dtype) if grad_w is not None else None)

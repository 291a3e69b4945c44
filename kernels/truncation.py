"""What both logprob backends share: the accumulation dtype, vLLM's sampling truncation as a
per-token logit threshold, and the per-token gradient coefficients of logp and entropy.

Its own module so that `kernels/logprobs.py` (which picks a backend) and
`kernels/triton_logprobs.py` (one backend) both import it and neither imports the other.
"""

from __future__ import annotations

import torch
from torch import Tensor

# top-p without top-k first looks at this many best logits per token; only tokens whose
# nucleus is wider fall back to sorting the whole vocabulary row.
_TOP_P_PROBE = 1024


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # Softmax statistics in bf16/fp16 lose ~3 digits; accumulate in fp32 (or fp64 if given).
    return torch.promote_types(dtype, torch.float32)


@torch.no_grad()
def keep_threshold(s: Tensor, top_k: int, top_p: float) -> Tensor:
    """Lowest kept (scaled) logit per row under vLLM's top-k then top-p truncation.

    s: [n, V] logits already divided by the temperature. vLLM applies top-p to the
    top-k-renormalised distribution and keeps the smallest prefix (by descending probability)
    whose mass reaches top_p; ties with the cut-off logit are kept too (a threshold cannot
    split them). Callers keep the target on top of this: one extra token, not everything
    above the target's logit.
    """
    v = s.shape[1]
    k = top_k if 0 < top_k < v else 0
    if top_p >= 1.0:
        if not k:
            return s.new_full(s.shape[:1], -torch.inf)
        return s.topk(k, dim=1, sorted=False).values.amin(1)
    probe = k or min(v, _TOP_P_PROBE)
    vals = s.topk(probe, dim=1).values  # descending
    log_z = torch.logsumexp(vals if k else s, dim=1)
    thr, spill = _nucleus_cut(vals, log_z, top_p)
    if not k and probe < v and bool(spill.any()):  # nucleus wider than the probe: sort fully
        rows = spill.nonzero().squeeze(1)
        full = s[rows].sort(dim=1, descending=True).values
        thr[rows] = _nucleus_cut(full, log_z[rows], top_p)[0]
    return thr


def _nucleus_cut(vals: Tensor, log_z: Tensor, top_p: float) -> tuple[Tensor, Tensor]:
    # Keep rank r iff the mass strictly before it is < top_p (vLLM masks ascending cumsum
    # <= 1 - top_p, which is the same set). `spill`: even all of `vals` is not enough.
    mass = torch.exp(vals - log_z[:, None]).cumsum(1)
    n_before = (mass < top_p).sum(1)
    spill = n_before >= vals.shape[1]
    idx = n_before.clamp_max(vals.shape[1] - 1)
    return vals.gather(1, idx[:, None]).squeeze(1), spill


def grad_coefficients(
    targets: Tensor, ent: Tensor, g_logp: Tensor | None, g_ent: Tensor | None, inv_t: float
) -> tuple[Tensor | None, Tensor, Tensor | None]:
    """Per-token (gl, c0, c1) with d loss / d z = p * (c0 + c1 * log p) + onehot(target) * gl.

    z are the unscaled logits h @ W^T. From d logp_t / ds = onehot(t) - p and
    dH / ds = -p (log p + H), times ds/dz = 1/T: gl = g_logp / T, c0 = -(gl + g_ent H / T),
    c1 = -g_ent / T (None when the entropy carries no gradient, so that pass is skipped).
    Ignored tokens get all-zero coefficients.
    """
    valid = (targets >= 0).to(ent.dtype)
    gl = g_logp.to(ent.dtype) * valid * inv_t if g_logp is not None else None
    ge = g_ent.to(ent.dtype) * valid * inv_t if g_ent is not None else None
    c0 = torch.zeros_like(ent)
    if gl is not None:
        c0 -= gl
    if ge is not None:
        c0 -= ge * ent
    return gl, c0, (-ge if ge is not None else None)

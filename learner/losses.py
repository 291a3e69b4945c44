"""Token-level clipped policy-gradient loss with an off-policy correction weight.

    loss_t = -tw_t * w_t * min(r_t A_t, clip(r_t, 1-eps_low, 1+eps_high) A_t),   r_t = pi / pi_prox

`w_t` comes from learner/correction.py (behaviour -> proximal; truncated, masked or traced per
mode) and `tw_t` is the token weight (ActFocus role weights times replay IS weights). Mode
"tis" replaces the clipped term by the truncated IS policy gradient min(pi/mu, c) A. With
eps_low = eps_high = eps it is PPO's clip; eps_high > eps_low is DAPO's "clip-higher", which
lets low-probability tokens with a positive advantage grow further before the clip cuts them.

The loss is a sum over tokens divided by `denom`: by default the number of masked tokens (each
token counts once, so long episodes are not down-weighted per token as with a per-sequence
mean); the trainer passes the sum of role weights so that, as in ActFocus, the loss is a
weighted token mean, and a micro-batch passes the whole minibatch's denominator so that
micro-batch losses add up to the minibatch loss.
"""

from __future__ import annotations

import torch
from torch import Tensor

from learner import correction as C
from shared.config import CorrectionConfig, CorrectionMode


def clipped_pg_loss(
    logp: Tensor,
    prox_logp: Tensor,
    behav_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    is_cap: float = 2.0,
    token_weights: Tensor | None = None,
    *,
    mode: CorrectionMode = "decoupled",
    is_weight: Tensor | None = None,
    denom: float | Tensor | None = None,
    full_diagnostics: bool = True,
    clip_low: float | None = None,
    clip_high: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Clipped surrogate with an off-policy weight; returns (loss, diagnostics).

    All inputs are per token and broadcast-compatible (e.g. [N] or [B, T]); `mask` selects the
    tokens that count (loss_mask & not padding). `is_weight` is the precomputed correction
    weight (`correction.behaviour_weights`); if None it is computed here token by token for
    `mode` with cap `is_cap` (sequence-level "mis" and "segment_trace" need the trajectory
    layout, so pass their weight). `token_weights` (default 1) scales each token's loss. The
    ratio is clamped to [1 - clip_low, 1 + clip_high]; either left None takes `clip_eps`.

    Diagnostics over masked tokens: loss, clip_fraction (tokens whose gradient the clip cuts),
    ratio_mean / ratio_p05 / p50 / p95 of pi/pi_prox, n_tokens, and with `full_diagnostics`
    those of `correction.diagnostics` (ess, kl_behaviour of KL(mu || pi) here, is_cap_fraction,
    masked_fraction, w_mean, is_ratio_*).
    """
    m = mask.to(logp.dtype)
    n = m.sum()
    d = n.clamp_min(1.0) if denom is None else torch.as_tensor(denom, dtype=logp.dtype)
    d = d.to(logp.device)
    d = torch.where(d > 0, d, torch.ones_like(d))  # all-zero weights: the sum is 0 anyway
    prox_logp = prox_logp.detach().to(logp.dtype)
    behav_logp = behav_logp.detach().to(logp.dtype)
    adv = advantages.detach().to(logp.dtype)
    cfg = CorrectionConfig(mode=mode, is_cap=is_cap)
    dropped = torch.zeros_like(logp, dtype=torch.bool)
    if is_weight is None and mode != "tis":
        is_weight, dropped = C.behaviour_weights(cfg, prox_logp, behav_logp)
    elif is_weight is not None:
        dropped = is_weight.detach() == 0
    w = torch.ones_like(logp) if is_weight is None else is_weight.detach().to(logp.dtype)

    ratio = torch.exp(logp - prox_logp)
    if mode == "tis":
        tis_ratio, factor = C.tis_factor(logp, behav_logp, is_cap)
        surrogate = factor * tis_ratio * adv
        clipped = torch.zeros_like(m, dtype=torch.bool)
    else:
        surr1 = ratio * adv
        low = clip_eps if clip_low is None else clip_low
        high = clip_eps if clip_high is None else clip_high
        surr2 = torch.clamp(ratio, 1.0 - low, 1.0 + high) * adv
        surrogate = w * torch.minimum(surr1, surr2)
        # The clip is active (zero gradient) where the clipped branch is strictly smaller:
        # A > 0 and r > 1 + high, or A < 0 and r < 1 - low, whatever the two bounds are.
        clipped = surr2.detach() < surr1.detach()
    per_token = -surrogate
    if token_weights is not None:
        per_token = per_token * token_weights.detach().to(logp.dtype)
    loss = (per_token * m).sum() / d

    with torch.no_grad():
        sel = m > 0
        r_sel = ratio.detach()[sel]
        p05, p50, p95 = C.quantiles(r_sel, (0.05, 0.5, 0.95))
        n_tok = max(float(n), 1.0)
        diag = {
            "loss": float(loss.detach()),
            "clip_fraction": float((clipped & sel).sum()) / n_tok,
            "ratio_mean": float(r_sel.sum()) / n_tok,
            "ratio_p05": p05,
            "ratio_p50": p50,
            "ratio_p95": p95,
            "n_tokens": float(n),
        }
        if full_diagnostics:
            shape = torch.broadcast_shapes(logp.shape, m.shape)
            pick = lambda x: x.expand(shape)[sel]  # noqa: E731
            # tis weighs by the current policy, the other modes by the proximal one.
            ref = logp.detach() if mode == "tis" else prox_logp
            diag.update(
                C.diagnostics(
                    cfg,
                    pick(ref),
                    pick(behav_logp),
                    pick(w),
                    pick(dropped),
                )
            )
            diag["kl_behaviour"] = float(C.k3(pick(logp.detach()) - pick(behav_logp)).sum()) / n_tok
    return loss, diag

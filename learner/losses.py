"""Off-policy-corrected, token-level clipped policy-gradient loss (decoupled PPO).

Three policies meet here: the behaviour policy `mu` that generated the tokens (the actor, maybe
several versions behind and sampling with vLLM kernels), the proximal policy `pi_prox` (the
learner's weights when the batch was fetched) and the current policy `pi` being optimised.
The trust region is taken around pi_prox, not around mu, so staleness does not shrink the step;
the mu -> pi_prox mismatch is corrected by a truncated importance weight instead:

    ratio_t = pi(a_t) / pi_prox(a_t)
    w_t     = min(pi_prox(a_t) / mu(a_t), is_cap)            (detached)
    loss_t  = -w_t * min(ratio_t * A_t, clip(ratio_t, 1-eps, 1+eps) * A_t)

aggregated as a mean over masked tokens (each token counts once, so long episodes are not
down-weighted per token as with a per-sequence mean).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _masked_mean(x: Tensor, mask: Tensor, denom: Tensor) -> Tensor:
    return (x * mask).sum() / denom


def _quantiles(x: Tensor, qs: tuple[float, ...]) -> list[float]:
    if x.numel() == 0:
        return [float("nan")] * len(qs)
    q = torch.quantile(x.double(), torch.tensor(qs, dtype=torch.float64, device=x.device))
    return [float(v) for v in q]


def clipped_pg_loss(
    logp: Tensor,
    prox_logp: Tensor,
    behav_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    is_cap: float = 2.0,
    token_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Token-mean clipped surrogate with truncated IS correction; returns (loss, diagnostics).

    All inputs are per token and broadcast-compatible (e.g. [N] or [B, T]); `mask` selects the
    tokens that count (loss_mask & not padding). `token_weights` (default 1) scales each
    token's loss — the hook for ActFocus-style token re-weighting and replay IS weights.

    Diagnostics (all over masked tokens): clip_fraction (tokens whose gradient the clip cuts),
    ess (normalised effective sample size of w, in (0, 1]), ratio_mean / ratio_p05 / p50 /
    p95, kl_behaviour (k3 estimate of KL(mu || pi)), is_cap_fraction (w truncated), w_mean,
    n_tokens.
    """
    m = mask.to(logp.dtype)
    n = m.sum()
    denom = n.clamp_min(1.0)
    prox_logp = prox_logp.detach().to(logp.dtype)
    behav_logp = behav_logp.detach().to(logp.dtype)
    adv = advantages.detach().to(logp.dtype)

    log_ratio = logp - prox_logp
    ratio = torch.exp(log_ratio)
    raw_w = torch.exp(prox_logp - behav_logp)
    w = raw_w.clamp(max=is_cap)
    surr1 = ratio * adv
    surr2 = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv
    per_token = -w * torch.minimum(surr1, surr2)
    if token_weights is not None:
        per_token = per_token * token_weights.detach().to(logp.dtype)
    loss = _masked_mean(per_token, m, denom)

    with torch.no_grad():
        sel = m > 0
        # The clip is active (zero gradient) where the clipped branch is strictly smaller.
        clipped = (surr2 < surr1) & sel
        w_sel = w[sel].double()
        ess = (w_sel.sum() ** 2 / (w_sel.numel() * (w_sel**2).sum())) if w_sel.numel() else 1.0
        # k3: E_mu[r - 1 - log r] with r = pi/mu is an unbiased, always >= 0 estimate of
        # KL(mu || pi) from samples of mu (Schulman, "Approximating KL divergence").
        log_r = logp.detach() - behav_logp
        k3 = torch.exp(log_r) - 1.0 - log_r
        p05, p50, p95 = _quantiles(ratio.detach()[sel], (0.05, 0.5, 0.95))
        diag = {
            "loss": float(loss.detach()),
            "clip_fraction": float(clipped.sum() / denom),
            "ess": float(ess),
            "ratio_mean": float(_masked_mean(ratio.detach(), m, denom)),
            "ratio_p05": p05,
            "ratio_p50": p50,
            "ratio_p95": p95,
            "kl_behaviour": float(_masked_mean(k3, m, denom)),
            "is_cap_fraction": float(((raw_w >= is_cap) & sel).sum() / denom),
            "w_mean": float(_masked_mean(w, m, denom)),
            "n_tokens": float(n),
        }
    return loss, diag

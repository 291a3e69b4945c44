"""Off-policy correction: per-token weights for tokens sampled by an older (or other) policy.

Three policies meet in the loss: the behaviour policy mu that sampled a token (an actor, maybe
several versions behind, sampling with vLLM's kernels), the proximal policy pi_prox (the
learner's weights when the batch was fetched; its logprobs are computed once, without grad)
and the current policy pi being optimised. Every mode fits one template (HPT's "mask x
reference denominator x advantage x likelihood gradient"):

    loss_t = -w_t * min(r_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t),   r_t = pi / pi_prox

with a detached weight w_t built from rho_t = pi_prox / mu:

- "none":      w = 1. The mismatch is ignored (fine when data is fresh).
- "decoupled": w = min(rho, c). Decoupled PPO (Hilton et al.): the trust region is around
               pi_prox, so staleness does not shrink the step; mu -> pi_prox is corrected by a
               truncated importance weight.
- "mis":       w = rho if rho lies in [1/thr, thr], else 0 (masked IS: the token is dropped).
               level "sequence" decides per trajectory on the geometric mean of its tokens'
               ratios (a product over hundreds of tokens is outside any fixed band) and weights
               all its tokens by that mean.
- "segment_trace": w = min(rho, rho_bar) * trace, a critic-free, segment-level trace
               heuristic (see below and `segment_traces`). Formerly called "vtrace".
- "tis":       truncated IS policy gradient against the behaviour policy, no proximal anchor
               and no clip: value -min(pi/mu, c) A, gradient -min(pi/mu, c) A grad log pi
               (IMPALA's policy-gradient term). The weight follows the current policy, so
               with several updates per batch the cap c is the only trust region. Computed in
               the loss (`tis_factor`); `behaviour_weights` returns 1 for it.

Masked tokens stay in the loss's denominator, so dropping tokens does not up-weight the rest.

What "segment_trace" computes, and why it is not V-trace. V-trace (Espeholt et al. 2018,
IMPALA) corrects a value target with per-token truncated ratios rho_t = min(rho_bar, pi/mu) and
c_i = min(c_bar, pi/mu) and a learned value function V:

    v_s = V(x_s) + sum_{t >= s} gamma^(t-s) (prod_{i=s}^{t-1} c_i) delta_t V,
    delta_t V = rho_t (r_t + gamma V(x_{t+1}) - V(x_t)),

and its policy gradient is rho_s (r_s + gamma v_{s+1} - V(x_s)) grad log pi(a_s | x_s). This
learner has no critic. "segment_trace" keeps only the shape of the trace: with V = 0, gamma = 1
and the reward R at the episode's last token T, v_s reduces to (prod_{i=s}^{T-1} c_i) rho_T R,
and the mode weights each token's clipped-surrogate term by

  w_t = min(rho_t, rho_bar) * prod_{k in S(t)} c_k,  c_k = min(c_bar, exp(mean_{j in k} log rho_j))

where rho = pi_prox / mu, k runs over the policy-version segments of the token's episode (runs
of tokens sampled by one version) and S(t) is the segments after t's own ("suffix") or before it
("prefix"). The differences from V-trace: one coefficient per segment (a geometric mean of its
tokens' ratios), not a product of per-token c_i, which decays towards 0 over hundreds of tokens
from logprob noise alone; the token's own segment is left out of the product; no value function,
no bootstrapping, no delta_t; the group-relative advantage stands in for R (so the baseline is
scaled with it); the weight multiplies a PPO surrogate clipped around pi_prox rather than a
plain policy gradient; and "prefix" (a truncated state-distribution correction) has no V-trace
counterpart at all.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from shared.config import AlertConfig, CorrectionConfig

log = logging.getLogger(__name__)


def k3(log_r: Tensor) -> Tensor:
    """Per-token k3 = r - 1 - log r, r = pi/mu: an unbiased, >= 0 estimate of KL(mu || pi)
    from samples of mu (Schulman, "Approximating KL divergence")."""
    return torch.exp(log_r) - 1.0 - log_r


def quantiles(x: Tensor, qs: tuple[float, ...]) -> list[float]:
    if x.numel() == 0:
        return [float("nan")] * len(qs)
    q = torch.quantile(x.double(), torch.tensor(qs, dtype=torch.float64, device=x.device))
    return [float(v) for v in q]


def _segment_starts(*keys: Tensor) -> Tensor:
    """Boolean [N]: token i starts a new run of equal keys (tokens of one run are contiguous)."""
    n = keys[0].numel()
    start = torch.zeros(n, dtype=torch.bool, device=keys[0].device)
    if n:
        start[0] = True
        for k in keys:
            start[1:] |= k[1:] != k[:-1]
    return start


def _segment_mean(x: Tensor, seg: Tensor, n_seg: int) -> Tensor:
    total = x.new_zeros(n_seg).index_add_(0, seg, x)
    count = x.new_zeros(n_seg).index_add_(0, seg, torch.ones_like(x))
    return total / count.clamp_min(1)


def segment_traces(
    log_rho: Tensor, seq: Tensor, version: Tensor, c_bar: float, direction: str = "suffix"
) -> Tensor:
    """Per-token product of the trace coefficients of the other version segments of its episode
    (the "segment_trace" mode; see the module docstring for how it relates to V-trace).

    Tokens of a trajectory must be contiguous and in order; a segment is a run of tokens
    sampled by one policy version. Each segment k gets c_k = min(c_bar, exp(mean log rho)) —
    one coefficient per segment, not per token, because a product of hundreds of per-token
    c's decays towards 0 from logprob noise alone, even fully on-policy.

    "suffix": the product of the segments after the token's own. This mimics the shape of
    V-trace's target without its critic: with V = 0 and the reward at the episode's end,
    v_s = V(x_s) + sum_t (prod_{i<t} c_i) delta_t reduces to (prod of the c's after s) x R, so
    a token's credit passes through the traces of the segments after it: a later segment the
    proximal policy would not have produced cuts the credit of everything before it. The
    advantage stands in for R, so the group baseline is scaled with it (an approximation that
    keeps a zero-advantage group at exactly 0).
    "prefix": the product of the segments before the token instead — a truncated
    state-distribution correction that down-weights tokens written after a stale prefix.
    Versions only grow along an episode, so the stalest segments come first: "suffix" cuts
    credit when a later (fresher) segment disagrees with pi_prox, "prefix" reacts to stale
    beginnings. A token's own segment is never in its product (its own rho_bar-weight covers it).
    """
    n = log_rho.numel()
    if n == 0:
        return log_rho.new_ones(0)
    lr = log_rho.double()
    seg = torch.cumsum(_segment_starts(seq, version).long(), 0) - 1
    n_seg = int(seg[-1]) + 1
    log_c = _segment_mean(lr, seg, n_seg).clamp(max=math.log(c_bar))
    seg_seq = torch.zeros(n_seg, dtype=seq.dtype, device=seq.device).index_copy_(0, seg, seq)
    first = _segment_starts(seg_seq)  # the first segment of each trajectory
    cs = torch.cumsum(log_c, 0)  # inclusive running sum over all segments
    # Exclusive sum of the segments before k in the same trajectory: cs[k-1] - cs[first-1].
    traj_of_seg = torch.cumsum(first.long(), 0) - 1
    base = (cs - log_c)[first][traj_of_seg]
    before = cs - log_c - base
    if direction == "prefix":
        log_trace = before
    elif direction == "suffix":
        last = torch.zeros_like(first)
        last[:-1] = first[1:]
        last[-1] = True
        after = cs[last][traj_of_seg] - cs
        log_trace = after
    else:
        raise ValueError(f"unknown trace direction {direction!r}")
    return torch.exp(log_trace)[seg].to(log_rho.dtype)


def behaviour_weights(
    cfg: CorrectionConfig,
    prox_logp: Tensor,
    behav_logp: Tensor,
    seq: Tensor | None = None,
    version: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(w, dropped): the detached per-token weight of the clipped surrogate and the tokens the
    correction drops. `seq` (trajectory of each token) and `version` (policy version that
    sampled it) are needed by mis level "sequence" and segment_trace; tokens of a trajectory must be
    contiguous and in order."""
    log_rho = (prox_logp.detach() - behav_logp.detach()).double()
    rho = torch.exp(log_rho)
    dropped = torch.zeros_like(log_rho, dtype=torch.bool)
    zeros = torch.zeros_like(log_rho, dtype=torch.long)
    seq = zeros if seq is None else seq
    if cfg.mode in ("none", "tis"):
        w = torch.ones_like(rho)
    elif cfg.mode == "decoupled":
        w = rho.clamp(max=cfg.is_cap)
    elif cfg.mode == "mis":
        if cfg.level == "sequence":
            seg = torch.cumsum(_segment_starts(seq).long(), 0) - 1
            n_seg = int(seg[-1]) + 1 if seg.numel() else 0
            log_rho = _segment_mean(log_rho, seg, n_seg)[seg]
            rho = torch.exp(log_rho)
        dropped = log_rho.abs() > math.log(cfg.mis_threshold)
        w = torch.where(dropped, 0.0, rho)
    elif cfg.mode == "segment_trace":
        version = zeros if version is None else version
        traces = segment_traces(log_rho, seq, version, cfg.c_bar, cfg.trace)
        w = rho.clamp(max=cfg.rho_bar) * traces
    else:
        raise ValueError(f"unknown correction mode {cfg.mode!r}")
    return w.to(prox_logp.dtype), dropped


def tis_factor(logp: Tensor, behav_logp: Tensor, cap: float) -> tuple[Tensor, Tensor]:
    """(ratio, factor) for "tis": ratio = pi/mu with grad, factor = min(ratio, c)/ratio
    detached, so factor * ratio has value min(pi/mu, c) and gradient min(pi/mu, c) grad log pi."""
    ratio = torch.exp(logp - behav_logp.detach())
    return ratio, (ratio.clamp(max=cap) / ratio).detach()


def cap_of(cfg: CorrectionConfig) -> float:
    """The truncation level whose hits `is_cap_fraction` counts (inf: the mode truncates none)."""
    return {"tis": cfg.is_cap, "decoupled": cfg.is_cap, "segment_trace": cfg.rho_bar}.get(
        cfg.mode, math.inf
    )


@torch.no_grad()
def diagnostics(
    cfg: CorrectionConfig,
    prox_logp: Tensor,
    behav_logp: Tensor,
    w: Tensor,
    dropped: Tensor,
    staleness: Tensor | None = None,
) -> dict[str, float]:
    """Health of the correction over the trained tokens (all arguments are per trained token).

    ess: normalised effective sample size (sum w)^2 / (n sum w^2) in (0, 1] (for "tis" the
    weight min(rho, c) of the first update); is_ratio_*: quantiles of rho = pi_prox/mu;
    kl_behaviour: mean k3 of KL(mu || pi_prox); masked_fraction: tokens dropped;
    is_cap_fraction: tokens whose weight the cap truncates; token_staleness_*: policy versions
    between the learner and the token's sampler.
    """
    log_rho = (prox_logp - behav_logp).double()
    rho = torch.exp(log_rho)
    w = rho.clamp(max=cfg.is_cap) if cfg.mode == "tis" else w.double()
    n = rho.numel()
    p05, p50, p95 = quantiles(rho, (0.05, 0.5, 0.95))
    sq = float((w**2).sum())
    diag = {
        "ess": float(w.sum() ** 2 / (n * sq)) if n and sq > 0 else (0.0 if n else 1.0),
        "kl_behaviour": float(k3(log_rho).mean()) if n else 0.0,
        "is_ratio_p05": p05,
        "is_ratio_p50": p50,
        "is_ratio_p95": p95,
        "masked_fraction": float(dropped.double().mean()) if n else 0.0,
        "is_cap_fraction": float((rho >= cap_of(cfg)).double().mean()) if n else 0.0,
        "w_mean": float(w.mean()) if n else 0.0,
    }
    if staleness is not None:
        s = staleness.double()
        diag["token_staleness_mean"] = float(s.mean()) if n else 0.0
        diag["token_staleness_max"] = float(s.max()) if n else 0.0
    return diag


@dataclass
class AlertMonitor:
    """Warns (by name) when a diagnostic leaves the bounds of `[learner.correction.alert]`: the
    off-policy health diagnostics, and `entropy_action` (mean proximal entropy of the action
    tokens) below `min_action_entropy`, the sign of an entropy collapse."""

    cfg: AlertConfig
    _since: dict[str, int] = field(default_factory=dict)  # name -> steps spent out of bounds

    def _crossed(self, diag: dict[str, float]) -> dict[str, str]:
        bounds = {
            "ess": (self.cfg.min_ess, "<"),
            "kl_behaviour": (self.cfg.max_kl_behaviour, ">"),
            "clip_fraction": (self.cfg.max_clip_fraction, ">"),
            "masked_fraction": (self.cfg.max_masked_fraction, ">"),
            "token_staleness_mean": (self.cfg.max_staleness, ">"),
            "entropy_action": (self.cfg.min_action_entropy, "<"),
        }
        out = {}
        for name, (bound, op) in bounds.items():
            v = diag.get(name)
            if bound <= 0 or v is None or not math.isfinite(v):
                continue
            if (op == "<" and v < bound) or (op == ">" and v > bound):
                out[name] = f"{name} = {v:.4g} {op} {bound:g}"
        return out

    def check(self, diag: dict[str, float]) -> list[str]:
        """Log this step's crossings; returns the names of the diagnostics out of bounds."""
        crossed = self._crossed(diag)
        for name, text in crossed.items():
            steps = self._since.get(name, 0)
            if steps % max(1, self.cfg.repeat_every) == 0:
                log.warning("learner alert: %s", text)
            self._since[name] = steps + 1
        for name in [n for n in self._since if n not in crossed]:
            log.info("learner alert cleared: %s = %.4g", name, diag.get(name, float("nan")))
            del self._since[name]
        return sorted(crossed)

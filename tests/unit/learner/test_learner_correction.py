"""Off-policy correction modes, their diagnostics and alerts, against hand-computed values."""

from __future__ import annotations

import logging
import math

import msgspec
import pytest
import torch

from learner import correction as C
from learner.losses import clipped_pg_loss
from shared.config import AlertConfig, CorrectionConfig

F64 = torch.float64


def _logps(rho: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(prox, behav) with pi_prox / mu = rho per token."""
    prox = torch.linspace(-2.0, -0.5, len(rho), dtype=F64)
    return prox, prox - torch.log(torch.tensor(rho, dtype=F64))


def test_none_and_decoupled() -> None:
    prox, behav = _logps([0.5, 1.0, 3.0])
    w, dropped = C.behaviour_weights(CorrectionConfig(mode="none"), prox, behav)
    torch.testing.assert_close(w, torch.ones(3, dtype=F64))
    w, dropped = C.behaviour_weights(CorrectionConfig(mode="decoupled", is_cap=2.0), prox, behav)
    torch.testing.assert_close(w, torch.tensor([0.5, 1.0, 2.0], dtype=F64))
    assert not dropped.any()


def test_mis_token_level() -> None:
    prox, behav = _logps([1.5, 3.0, 0.4, 0.6])
    cfg = CorrectionConfig(mode="mis", mis_threshold=2.0)
    w, dropped = C.behaviour_weights(cfg, prox, behav)
    # band [0.5, 2]: 3.0 and 0.4 are dropped, the rest keep their ratio as weight
    torch.testing.assert_close(w, torch.tensor([1.5, 0.0, 0.0, 0.6], dtype=F64))
    assert dropped.tolist() == [False, True, True, False]
    d = C.diagnostics(cfg, prox, behav, w, dropped)
    assert d["masked_fraction"] == pytest.approx(0.5)
    assert d["ess"] == pytest.approx(2.1**2 / (4 * (1.5**2 + 0.6**2)))


def test_mis_sequence_level_uses_the_geometric_mean() -> None:
    # trajectory 0: ratios 4, 4 -> mean 4, outside [1/2, 2]: both dropped;
    # trajectory 1: ratios 3, 1/3 -> mean 1: both kept with weight 1 although token 3 alone
    # (1/3) would be dropped at token level.
    prox, behav = _logps([4.0, 4.0, 3.0, 1 / 3])
    seq = torch.tensor([0, 0, 1, 1])
    cfg = CorrectionConfig(mode="mis", mis_threshold=2.0, level="sequence")
    w, dropped = C.behaviour_weights(cfg, prox, behav, seq)
    torch.testing.assert_close(w, torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=F64))
    assert dropped.tolist() == [True, True, False, False]


# Trajectory 0 spans versions 5, 6, 7 with per-token ratios
#   v5: 0.25, 1.0  -> geometric mean 0.5 -> c = 0.5
#   v6: 0.8, 0.8   -> c = 0.8
#   v7: 2.0        -> c = min(1, 2) = 1
# Trajectory 1 is one segment at version 7 (the same version as trajectory 0's last token,
# which must still start a new segment): ratios 0.5, 2 -> geometric mean 1 -> c = 1.
SEG_RHO = [0.25, 1.0, 0.8, 0.8, 2.0, 0.5, 2.0]
SEG_SEQ = torch.tensor([0, 0, 0, 0, 0, 1, 1])
SEG_VER = torch.tensor([5, 5, 6, 6, 7, 7, 7])


def test_segment_traces_hand_computed() -> None:
    log_rho = torch.log(torch.tensor(SEG_RHO, dtype=F64))
    suffix = C.segment_traces(log_rho, SEG_SEQ, SEG_VER, c_bar=1.0, direction="suffix")
    # v5 tokens: c(v6) * c(v7) = 0.8; v6 tokens: c(v7) = 1; v7: nothing after it
    torch.testing.assert_close(suffix, torch.tensor([0.8, 0.8, 1, 1, 1, 1, 1], dtype=F64))
    prefix = C.segment_traces(log_rho, SEG_SEQ, SEG_VER, c_bar=1.0, direction="prefix")
    # v6 tokens: c(v5) = 0.5; the v7 token: 0.5 * 0.8 = 0.4; trajectory 1 starts afresh
    torch.testing.assert_close(prefix, torch.tensor([1, 1, 0.5, 0.5, 0.4, 1, 1], dtype=F64))
    capped = C.segment_traces(log_rho, SEG_SEQ, SEG_VER, c_bar=0.6, direction="suffix")
    # c(v6) = min(0.6, 0.8), c(v7) = 0.6: v5 tokens 0.36, v6 tokens 0.6
    torch.testing.assert_close(capped, torch.tensor([0.36, 0.36, 0.6, 0.6, 1, 1, 1], dtype=F64))


def test_segment_trace_weights_hand_computed() -> None:
    prox, behav = _logps(SEG_RHO)
    cfg = CorrectionConfig(mode="segment_trace", rho_bar=1.0, c_bar=1.0, trace="suffix")
    w, _ = C.behaviour_weights(cfg, prox, behav, SEG_SEQ, SEG_VER)
    # min(rho, 1) x suffix trace
    expected = [0.25 * 0.8, 1.0 * 0.8, 0.8, 0.8, 1.0, 0.5, 1.0]
    torch.testing.assert_close(w, torch.tensor(expected, dtype=F64))
    d = C.diagnostics(cfg, prox, behav, w, torch.zeros(7, dtype=torch.bool))
    assert d["is_cap_fraction"] == pytest.approx(3 / 7)  # ratios >= rho_bar: 1.0, 2.0, 2.0


def test_tis_value_and_gradient() -> None:
    # pi/mu = 0.5, 1.5, 3 with cap 2: value -min(pi/mu, 2) A, gradient -min(pi/mu, 2) A / N
    behav = torch.tensor([-1.0, -2.0, -0.5], dtype=F64)
    ratio = torch.tensor([0.5, 1.5, 3.0], dtype=F64)
    logp = (behav + torch.log(ratio)).requires_grad_(True)
    adv = torch.tensor([1.0, -2.0, 1.0], dtype=F64)
    loss, d = clipped_pg_loss(
        logp, logp.detach() - 1.0, behav, adv, torch.ones(3), is_cap=2.0, mode="tis"
    )
    capped = torch.tensor([0.5, 1.5, 2.0], dtype=F64)
    assert loss.item() == pytest.approx(float(-(capped * adv).sum() / 3))
    (g,) = torch.autograd.grad(loss, (logp,))
    torch.testing.assert_close(g, -capped * adv / 3)
    assert d["clip_fraction"] == 0.0  # no PPO clip in tis mode
    assert d["is_cap_fraction"] == pytest.approx(1 / 3)


def test_none_mode_in_the_loss_ignores_the_behaviour_policy() -> None:
    logp = torch.tensor([-1.0, -2.0], dtype=F64, requires_grad=True)
    adv = torch.tensor([1.0, -1.0], dtype=F64)
    far = logp.detach() - 3.0  # a behaviour policy far away must not matter
    loss, d = clipped_pg_loss(logp, logp.detach(), far, adv, torch.ones(2), mode="none")
    assert loss.item() == pytest.approx(0.0) and d["ess"] == pytest.approx(1.0)
    (g,) = torch.autograd.grad(loss, (logp,))
    torch.testing.assert_close(g, -adv / 2)


def test_diagnostics_staleness_kl_quantiles() -> None:
    prox, behav = _logps([1.0, 1.0, 1.0, 2.0])
    cfg = CorrectionConfig(mode="decoupled", is_cap=2.0)
    w, dropped = C.behaviour_weights(cfg, prox, behav)
    d = C.diagnostics(cfg, prox, behav, w, dropped, torch.tensor([0, 1, 1, 4]))
    assert d["token_staleness_mean"] == pytest.approx(1.5) and d["token_staleness_max"] == 4
    assert d["kl_behaviour"] == pytest.approx((2 - 1 - math.log(2)) / 4)
    assert d["is_ratio_p50"] == pytest.approx(1.0)
    assert d["is_cap_fraction"] == pytest.approx(0.25) and d["masked_fraction"] == 0


def test_alert_names_the_diagnostic_repeats_and_clears(caplog: pytest.LogCaptureFixture) -> None:
    mon = C.AlertMonitor(AlertConfig(min_ess=0.5, max_kl_behaviour=0.1, repeat_every=2))
    caplog.set_level(logging.INFO, logger="learner.correction")
    low = {"ess": 0.2, "kl_behaviour": 0.01, "clip_fraction": 0.9}
    assert mon.check(low) == ["ess"]  # max_clip_fraction is 0: off
    assert mon.check(low) == ["ess"]
    assert mon.check(low) == ["ess"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all("ess" in r.getMessage() for r in warnings)
    assert mon.check({"ess": 0.9, "kl_behaviour": 0.5}) == ["kl_behaviour"]
    assert any("cleared: ess" in r.getMessage() for r in caplog.records)
    assert any("kl_behaviour = 0.5 > 0.1" in r.getMessage() for r in caplog.records)


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="mode"):  # a Literal: checked when decoded
        msgspec.convert({"mode": "ppo"}, CorrectionConfig)
    with pytest.raises(ValueError, match="mis_threshold"):
        CorrectionConfig(mis_threshold=1.0)


def test_action_entropy_alert_fires_below_the_bound(caplog: pytest.LogCaptureFixture) -> None:
    mon = C.AlertMonitor(AlertConfig(min_action_entropy=0.05, min_ess=0.0))
    caplog.set_level(logging.INFO, logger="learner.correction")
    assert mon.check({"entropy_action": 0.5}) == []
    assert mon.check({"entropy_action": 0.01}) == ["entropy_action"]
    assert any("entropy_action = 0.01 < 0.05" in r.getMessage() for r in caplog.records)
    assert mon.check({}) == []  # a step without action tokens: nothing to judge, cleared
    assert any("cleared: entropy_action" in r.getMessage() for r in caplog.records)
    off = C.AlertMonitor(AlertConfig(min_action_entropy=0.0))
    assert off.check({"entropy_action": 0.0, "ess": 1.0}) == []


def test_vtrace_is_rejected_with_the_rename() -> None:
    with pytest.raises(ValueError, match='renamed to "segment_trace".*not V-trace proper'):
        CorrectionConfig(mode="vtrace")
    assert CorrectionConfig(mode="segment_trace", rho_bar=0.5).rho_bar == 0.5

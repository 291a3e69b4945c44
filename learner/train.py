"""One optimisation step on a batch of trajectories, independent of any broker or socket.

`collate` (learner/batch.py) turns wire `Trajectory`s into right-padded token tensors plus a
flat list of the trained tokens, and `plan_micro_batches` the forward passes over them, padded
or (`packing`) packed without padding; `Trainer.step` forms advantages (`[learner.advantage]`),
computes the proximal logprobs and entropies with the fused kernel, derives the off-policy
correction (`[learner.correction]`) and token weights (`[learner.weighting]`) from them once,
and then runs `ppo_epochs` x `minibatches` clipped updates against those fixed proximal
logprobs. The token at position t is predicted from the hidden state at t-1, so token 0 of an
episode is never trained (it is prompt anyway) and `behav_logprob[t]` is compared with the
hidden state at t-1.

Stability controls (`[learner]`, `stability_settings`): asymmetric clip bounds
(ratio in [1 - eps_low, 1 + eps_high]), an entropy bonus on the tokens of `entropy_roles`
(subtracted from each micro-batch loss, over a whole-minibatch denominator like the loss), and
a linear lr warm-up stepped once per optimiser step. The step's diagnostics, including entropy
by role and the ActFocus monitor, come from learner/diagnostics.py and learner/monitor.py.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kernels.logprobs import token_logprobs_and_entropy
from learner import correction as C
from learner import weighting as W
from learner.advantages import compute_advantages
from learner.batch import Micro, Proximal, TrainBatch, collate, plan_micro_batches
from learner.diagnostics import UpdateStats, per_trajectory_advantage, step_diagnostics
from learner.lora import unwrap
from learner.losses import clipped_pg_loss
from shared.config import AdvantageConfig, CorrectionConfig, LearnerConfig, WeightingConfig
from shared.protocol import Role, Trajectory

log = logging.getLogger(__name__)


def _role_ids(roles: Sequence[str]) -> Tensor:
    return torch.tensor([int(Role[r.upper()]) for r in roles], dtype=torch.long)


def lr_scheduler(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    decay: str = "constant",
    decay_steps: int = 0,
    min_lr_ratio: float = 0.1,
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Linear warm-up, then a constant lr or a cosine decay.

    Warm-up: optimiser step k (1-based) uses lr * min(1, k / warmup_steps), so the first uses
    lr / warmup_steps and step warmup_steps the full lr. "cosine": from the end of the
    warm-up the factor falls along a half cosine to `min_lr_ratio` at optimiser step
    `decay_steps` (the run's last) and stays there. None when neither is asked for.
    """
    if warmup_steps <= 0 and (decay == "constant" or decay_steps <= 0):
        return None

    def factor(s: int) -> float:  # s: optimiser steps taken so far
        k = s + 1
        if warmup_steps > 0 and k < warmup_steps:
            return k / warmup_steps
        if decay != "cosine" or decay_steps <= warmup_steps:
            return 1.0
        t = min(1.0, (k - warmup_steps) / (decay_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def stability_settings(lc: LearnerConfig, optimizer: torch.optim.Optimizer) -> dict:
    """`Trainer` keyword arguments from `[learner]`: clip bounds, entropy bonus, and a fresh lr
    schedule on `optimizer` (a checkpoint loaded afterwards restores its position)."""
    low, high = lc.clip_bounds()
    # the schedule counts optimiser steps: ppo_epochs x minibatches per learner step
    updates = lc.steps * lc.ppo_epochs * lc.minibatches
    schedule = lr_scheduler(optimizer, lc.warmup_steps, lc.lr_decay, updates, lc.min_lr_ratio)
    return {
        "clip_eps": lc.clip_eps,
        "clip_low": low,
        "clip_high": high,
        "entropy_coef": lc.entropy_coef,
        "entropy_roles": lc.entropy_roles,
        "scheduler": schedule,
    }


class Trainer:
    """Holds model + optimiser and the loss settings; `step()` trains on one batch."""

    # Many settings, all keyword-only with defaults: build_trainer passes them from the config.
    def __init__(  # noqa: PLR0913
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        clip_eps: float = 0.2,
        clip_low: float | None = None,  # None: clip_eps (see `clipped_pg_loss`)
        clip_high: float | None = None,
        entropy_coef: float = 0.0,  # entropy bonus of the tokens of `entropy_roles`
        entropy_roles: Sequence[str] = ("action",),
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,  # stepped per update
        grad_clip: float = 1.0,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        pad_id: int = 0,
        chunk_size: int | None = None,  # None: sized from a memory budget by the kernel
        micro_batch_tokens: int = 16384,
        packing: bool = True,  # trajectories concatenated per row, no padding (learner/batch.py)
        ppo_epochs: int = 1,
        minibatches: int = 1,
        correction: CorrectionConfig | None = None,
        advantage: AdvantageConfig | None = None,
        weighting: WeightingConfig | None = None,
        autocast_dtype: torch.dtype | None = None,  # None: the weights' own dtype
    ) -> None:
        self.model = model
        self.autocast_dtype = autocast_dtype
        self.optimizer = optimizer
        self.clip_eps, self.grad_clip = clip_eps, grad_clip
        self.clip_low = clip_eps if clip_low is None else clip_low
        self.clip_high = clip_eps if clip_high is None else clip_high
        self.entropy_coef = entropy_coef
        self.entropy_roles = _role_ids(entropy_roles)
        self.scheduler = scheduler
        self.temperature = temperature
        self.top_k, self.top_p = top_k, top_p  # the actors' sampling truncation
        self.pad_id = pad_id
        self.chunk_size = chunk_size
        self.micro_batch_tokens = micro_batch_tokens
        self.packing = packing
        # Flash attention unpacks a packed batch of one row only (its varlen path); sdpa, eager
        # and flex take several rows, each with a block-diagonal mask.
        impl = getattr(getattr(unwrap(model), "config", None), "_attn_implementation", None)
        self.one_row = "flash" in str(impl)
        self.ppo_epochs, self.minibatches = max(1, ppo_epochs), max(1, minibatches)
        self.correction = correction or CorrectionConfig()
        self.advantage = advantage or AdvantageConfig()
        self.weighting = weighting or WeightingConfig()
        self.alerts = C.AlertMonitor(self.correction.alert)
        self.device = next(model.parameters()).device

    def token_logprobs(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        row: Tensor,
        pos: Tensor,
        position_ids: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(logp, entropy) of input_ids[row, pos] under the current weights, via the kernel.

        With `position_ids` (packed rows, restarting at 0 per sequence) the decoder gets no
        attention mask: transformers separates the sequences at the restarts."""
        # The bare decoder returns final (post-norm) hidden states without the [B, L, V] logits.
        # Under LoRA, peft's wrapper would answer `.model` with the whole causal LM; its LoRA
        # layers live inside the HF model, so its decoder runs with the adapters.
        m: Any = unwrap(self.model)  # an HF causal LM: nn.Module's types know no decoder
        decoder = m.model if hasattr(m, "model") else m.get_decoder()
        dev = self.device
        # The decoder in `[model] dtype` like the actors' engines; the LM head and the
        # logprobs (the kernel) in float32, whatever the decoder ran in.
        with torch.autocast(
            dev.type,
            dtype=self.autocast_dtype or torch.float32,
            enabled=self.autocast_dtype is not None,
        ):
            masks: dict[str, Tensor | None]
            if position_ids is None:
                masks = {"attention_mask": attention_mask.to(dev)}
            else:
                masks = {"attention_mask": None, "position_ids": position_ids.to(dev)}
            hidden = decoder(
                input_ids=input_ids.to(dev), use_cache=False, **masks
            ).last_hidden_state
        h = hidden[row.to(dev), pos.to(dev) - 1]  # only the trained tokens reach the LM head
        head = m.get_output_embeddings().weight
        h = h.to(head.dtype)
        targets = input_ids[row, pos].to(dev)
        return token_logprobs_and_entropy(
            h,
            head,
            targets,
            self.chunk_size,
            self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
        )

    def _micro_batches(self, batch: TrainBatch, rows: Tensor | None = None) -> list[Micro]:
        return plan_micro_batches(
            batch, self.micro_batch_tokens, rows, packing=self.packing, one_row=self.one_row
        )

    def _micro_logprobs(self, m: Micro) -> tuple[Tensor, Tensor, Tensor]:
        """(sel, logp, entropy) for the trained tokens `sel` of the micro-batch `m`."""
        if m.sel.numel() == 0:
            return m.sel, torch.zeros(0), torch.zeros(0)
        logp, ent = self.token_logprobs(m.input_ids, m.attention_mask, m.row, m.pos, m.position_ids)
        return m.sel, logp, ent

    @torch.no_grad()
    def _fill_proximal(
        self, batch: TrainBatch, sel: Tensor, logp: Tensor, ent: Tensor, prox: Proximal
    ) -> None:
        """Correction and token weights of the tokens `sel` (whole trajectories) from the
        proximal logp / entropy."""
        logp, ent = logp.detach().double().cpu(), ent.detach().double().cpu()
        row, turn = batch.row[sel], batch.turn[sel]
        is_w, dropped = C.behaviour_weights(
            self.correction, logp, batch.behav_logp[sel].double(), row, batch.version[sel]
        )
        turn_id = row * (int(batch.turn.max()) + 1) + turn  # ActFocus redistributes per turn
        tok_w = W.token_weights(self.weighting, batch.role[sel], turn_id, ent, logp)
        prox.logp[sel], prox.ent[sel] = logp, ent
        prox.is_w[sel], prox.dropped[sel] = is_w, dropped
        prox.tok_w[sel] = tok_w * batch.token_weights[sel].double()

    def _update(
        self, batch: TrainBatch, rows: Tensor, role_w: Tensor, prox: Proximal, fill: bool
    ) -> UpdateStats:
        """One optimiser step on the trajectories `rows`. With `fill` (a single update per
        batch) the proximal values come from this same forward: ratio 1, no extra pass."""
        in_minibatch = torch.isin(batch.row, rows)
        if not bool(in_minibatch.any()):  # nothing to train: no step, and nothing to warn about
            return UpdateStats(lr=self.lr)
        # The loss is a role-weighted token mean over the minibatch; ActFocus conserves each
        # turn's action weight, so the sum of role weights is the sum of final weights.
        denom = float(role_w[in_minibatch].sum())
        in_roles = torch.isin(batch.role, self.entropy_roles)
        ent_denom = float(role_w[in_minibatch & in_roles].sum())
        cfg = self.correction
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, bonus_sum, n_clipped, ratios = 0.0, 0.0, 0.0, []
        for micro in self._micro_batches(batch, rows):
            sel, logp, ent = self._micro_logprobs(micro)
            if sel.numel() == 0:
                continue
            if fill:
                self._fill_proximal(batch, sel, logp, ent, prox)
            dev = logp.device
            prox_logp = prox.logp[sel].to(dev, logp.dtype)
            loss, d = clipped_pg_loss(
                logp,
                prox_logp,
                batch.behav_logp[sel].to(dev),
                batch.advantages[sel].to(dev),
                torch.ones_like(logp),
                self.clip_eps,
                cfg.is_cap,
                prox.tok_w[sel].to(dev),
                mode=cfg.mode,
                is_weight=prox.is_w[sel].to(dev),
                denom=denom,
                full_diagnostics=False,
                clip_low=self.clip_low,
                clip_high=self.clip_high,
            )
            if self.entropy_coef > 0 and ent_denom > 0:
                # The bonus's weighted mean also divides by a whole-minibatch sum: micro-batch
                # bonuses add up to the minibatch's, like the losses.
                w = (prox.tok_w[sel] * in_roles[sel]).to(dev, ent.dtype)
                bonus = self.entropy_coef * (w * ent).sum() / ent_denom
                loss = loss - bonus
                bonus_sum += float(bonus.detach())
            loss.backward()
            loss_sum += float(loss.detach())
            n_clipped += d["clip_fraction"] * d["n_tokens"]
            ratios.append(torch.exp(logp.detach() - prox_logp).double().cpu())
        lr = self.lr
        grad_norm, skipped = self._optimiser_step()
        return UpdateStats(
            lr=lr,
            loss=loss_sum,
            bonus=bonus_sum,
            n_clipped=n_clipped,
            ratio=torch.cat(ratios) if ratios else torch.zeros(0, dtype=torch.float64),
            grad_norm=grad_norm,
            skipped=float(skipped),
        )

    @property
    def lr(self) -> float:
        """The learning rate the next optimiser step uses."""
        return float(self.optimizer.param_groups[0]["lr"])

    def _optimiser_step(self) -> tuple[float, bool]:
        """Clip the gradient and step (then the lr schedule), unless the gradient is missing or
        not finite; returns (grad_norm, skipped)."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = float("nan")
        if params:
            max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        skipped = not params or not math.isfinite(grad_norm)
        if skipped:
            log.warning(
                "skipping optimiser step: %d params with grads, grad_norm=%s",
                len(params),
                grad_norm,
            )
        else:
            self.optimizer.step()
            if self.scheduler is not None:  # the warm-up counts optimiser steps taken
                self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, skipped

    def step(
        self,
        trajs: Sequence[Trajectory],
        is_weights: Sequence[float] | None = None,
        policy_version: int | None = None,
    ) -> tuple[dict[str, float], np.ndarray]:
        """Train on `trajs`; returns (diagnostics, per-trajectory advantage).

        `policy_version` is the learner's version when the batch was fetched (staleness is
        measured against it; default: the newest version in the batch). The per-trajectory
        advantage is the mean over its trained tokens (0 for a masked trajectory).
        """
        adv = compute_advantages(trajs, self.advantage)
        idx = np.flatnonzero(adv.keep)
        weights = np.ones(len(trajs))
        if is_weights and len(is_weights) == len(trajs) and max(is_weights) > 0:
            # Prioritised-replay IS weights, normalised by their max as in PER (Schaul et al.)
            weights = np.asarray(is_weights, dtype=np.float64) / max(is_weights)
        kept = [trajs[i] for i in idx]
        batch = collate(kept, [adv.per_turn[i] for i in idx], self.pad_id, weights[idx])
        n = batch.n_tokens
        role_w = W.role_weights(batch.role, self.weighting)
        prox = Proximal.empty(n)

        self.model.train()
        n_rows = len(kept)
        n_mb = max(1, min(self.minibatches, n_rows))
        single = self.ppo_epochs * n_mb == 1
        if not single and n:
            with torch.no_grad():  # pi_prox: the weights as fetched, before any update
                for micro in self._micro_batches(batch):
                    sel, logp, ent = self._micro_logprobs(micro)
                    if sel.numel():
                        self._fill_proximal(batch, sel, logp, ent, prox)
        updates = []
        if n:
            all_rows = torch.arange(n_rows)
            for _ in range(self.ppo_epochs):
                order = all_rows if single else torch.randperm(n_rows)
                for rows in torch.tensor_split(order, n_mb):
                    updates.append(self._update(batch, rows, role_w, prox, fill=single))

        diag = step_diagnostics(
            self.correction, kept, batch, prox, updates, policy_version, self.lr
        )
        traj_adv = per_trajectory_advantage(len(trajs), adv.per_turn, idx, batch)
        rewards = np.array([t.outcome_reward for t in trajs], dtype=np.float64)
        diag.update(
            reward_mean=float(rewards.mean()) if len(rewards) else 0.0,
            pass_rate=float(np.mean([t.success for t in trajs])) if trajs else 0.0,
            adv_abs_mean=float(np.abs(traj_adv).mean()) if len(traj_adv) else 0.0,
            adv_token_abs_mean=float(batch.advantages.abs().mean()) if n else 0.0,
            n_trajectories=float(len(trajs)),
            n_masked_trajectories=float(len(trajs) - len(idx)),
        )
        crossed = self.alerts.check(diag)
        diag["alerts"] = float(len(crossed))
        diag.update({f"alert_{name}": 1.0 for name in crossed})
        return diag, traj_adv

"""One optimisation step on a batch of trajectories, independent of any broker or socket.

`collate` turns wire `Trajectory`s into right-padded token tensors plus a flat list of the
trained tokens; `Trainer.step` recomputes their logprobs with the fused kernel, forms GRPO
advantages, applies the off-policy-corrected clipped loss and steps the optimiser. The token at
position t is predicted from the hidden state at t-1, so token 0 of an episode is never trained
(it is prompt anyway) and `behav_logprob[t]` is compared with the hidden state at t-1.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from kernels.logprobs import token_logprobs_and_entropy
from learner.advantages import grpo_advantages
from learner.losses import clipped_pg_loss
from shared.protocol import Trajectory

log = logging.getLogger(__name__)


@dataclass
class TrainBatch:
    input_ids: Tensor  # [B, L] right-padded
    attention_mask: Tensor  # [B, L]
    row: Tensor  # [N] batch row of each trained token
    pos: Tensor  # [N] its position (>= 1); the logit comes from position pos - 1
    targets: Tensor  # [N] its token id
    behav_logp: Tensor  # [N] behaviour-policy logprob from the actor
    advantages: Tensor  # [N]
    token_weights: Tensor  # [N]

    @property
    def n_tokens(self) -> int:
        return int(self.targets.numel())


def collate(
    trajs: Sequence[Trajectory],
    advantages: np.ndarray,
    pad_id: int = 0,
    traj_weights: Sequence[float] | None = None,
) -> TrainBatch:
    """Pad trajectories into [B, L] and list every loss-masked token with its per-token data."""
    lengths = [t.n_tokens for t in trajs]
    width = max(lengths, default=1)
    input_ids = np.full((len(trajs), width), pad_id, dtype=np.int64)
    attention = np.zeros((len(trajs), width), dtype=np.int64)
    rows, poss, behav, adv, tw = [], [], [], [], []
    for i, t in enumerate(trajs):
        ids = t.array("token_ids")
        input_ids[i, : len(ids)] = ids
        attention[i, : len(ids)] = 1
        pos = np.flatnonzero(t.array("loss_mask"))
        pos = pos[pos >= 1]  # token 0 has no preceding context to be predicted from
        rows.append(np.full(pos.size, i))
        poss.append(pos)
        behav.append(t.array("behav_logprob")[pos])
        adv.append(np.full(pos.size, advantages[i], dtype=np.float32))
        w = 1.0 if traj_weights is None else float(traj_weights[i])
        tw.append(np.full(pos.size, w, dtype=np.float32))

    def cat(parts: list[np.ndarray], dtype: torch.dtype) -> Tensor:
        arr = np.concatenate(parts) if parts else np.zeros(0)
        return torch.as_tensor(arr).to(dtype)

    row, pos_t = cat(rows, torch.long), cat(poss, torch.long)
    ids_t = torch.from_numpy(input_ids)
    return TrainBatch(
        input_ids=ids_t,
        attention_mask=torch.from_numpy(attention),
        row=row,
        pos=pos_t,
        targets=ids_t[row, pos_t],
        behav_logp=cat(behav, torch.float32),
        advantages=cat(adv, torch.float32),
        token_weights=cat(tw, torch.float32),
    )


def _micro_batches(batch: TrainBatch, max_tokens: int) -> list[Tensor]:
    """Row groups whose padded size (rows x longest row) stays under `max_tokens`."""
    lengths = batch.attention_mask.sum(1).tolist()
    groups: list[list[int]] = [[]]
    longest = 0
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        longest_if = max(longest, lengths[i])
        if groups[-1] and longest_if * (len(groups[-1]) + 1) > max_tokens:
            groups.append([])
            longest_if = lengths[i]
        groups[-1].append(i)
        longest = longest_if
    return [torch.tensor(g, dtype=torch.long) for g in groups if g]


class Trainer:
    """Holds model + optimiser and the loss hyperparameters; `step()` is one update."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        clip_eps: float = 0.2,
        is_cap: float = 2.0,
        grad_clip: float = 1.0,
        temperature: float = 1.0,
        pad_id: int = 0,
        chunk_size: int = 1024,
        micro_batch_tokens: int = 16384,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.clip_eps, self.is_cap, self.grad_clip = clip_eps, is_cap, grad_clip
        self.temperature = temperature
        self.pad_id = pad_id
        self.chunk_size = chunk_size
        self.micro_batch_tokens = micro_batch_tokens
        self.device = next(model.parameters()).device

    def token_logprobs(
        self, input_ids: Tensor, attention_mask: Tensor, row: Tensor, pos: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(logp, entropy) of input_ids[row, pos] under the current weights, via the kernel."""
        # The bare decoder returns final (post-norm) hidden states without the [B, L, V] logits.
        m = self.model
        decoder = m.model if hasattr(m, "model") else m.get_decoder()
        dev = self.device
        hidden = decoder(
            input_ids=input_ids.to(dev), attention_mask=attention_mask.to(dev), use_cache=False
        ).last_hidden_state
        h = hidden[row.to(dev), pos.to(dev) - 1]  # only the trained tokens reach the LM head
        head = self.model.get_output_embeddings().weight
        targets = input_ids[row, pos].to(dev)
        return token_logprobs_and_entropy(h, head, targets, self.chunk_size, self.temperature)

    def step(
        self, trajs: Sequence[Trajectory], is_weights: Sequence[float] | None = None
    ) -> tuple[dict[str, float], np.ndarray]:
        """One update on `trajs`; returns (diagnostics, per-trajectory advantages)."""
        rewards = np.array([t.outcome_reward for t in trajs], dtype=np.float64)
        adv = np.asarray(grpo_advantages(rewards, [t.group_id for t in trajs]))
        weights = None
        if is_weights and len(is_weights) == len(trajs) and max(is_weights) > 0:
            # Prioritised-replay IS weights, normalised by their max as in PER (Schaul et al.)
            weights = np.asarray(is_weights, dtype=np.float64) / max(is_weights)
        batch = collate(trajs, adv, self.pad_id, weights)
        n_total = max(batch.n_tokens, 1)

        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        kept: dict[str, list[Tensor]] = {"logp": [], "ent": [], "sel": []}
        for rows in _micro_batches(batch, self.micro_batch_tokens):
            sel = torch.isin(batch.row, rows).nonzero().squeeze(1)
            if sel.numel() == 0:
                continue
            # Re-index the selected rows to 0..len(rows)-1 within the micro-batch.
            remap = torch.full((batch.input_ids.shape[0],), -1, dtype=torch.long)
            remap[rows] = torch.arange(rows.numel())
            width = int(batch.attention_mask[rows].sum(1).max())
            logp, ent = self.token_logprobs(
                batch.input_ids[rows, :width],
                batch.attention_mask[rows, :width],
                remap[batch.row[sel]],
                batch.pos[sel],
            )
            dev = logp.device
            # One update per batch, so the proximal policy is the current one before the
            # update: prox = logp detached from this same forward (ratio starts at 1).
            loss, _ = clipped_pg_loss(
                logp,
                logp.detach(),
                batch.behav_logp[sel].to(dev),
                batch.advantages[sel].to(dev),
                torch.ones_like(logp),
                self.clip_eps,
                self.is_cap,
                batch.token_weights[sel].to(dev),
            )
            (loss * (sel.numel() / n_total)).backward()
            kept["logp"].append(logp.detach().cpu())
            kept["ent"].append(ent.detach().cpu())
            kept["sel"].append(sel)

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
        self.optimizer.zero_grad(set_to_none=True)

        diag = self._diagnostics(batch, kept)
        diag.update(
            grad_norm=grad_norm,
            skipped=float(skipped),
            reward_mean=float(rewards.mean()) if len(rewards) else 0.0,
            pass_rate=float(np.mean([t.success for t in trajs])) if trajs else 0.0,
            adv_abs_mean=float(np.abs(adv).mean()) if len(adv) else 0.0,
            n_trajectories=float(len(trajs)),
        )
        return diag, adv

    def _diagnostics(self, batch: TrainBatch, kept: dict[str, list[Tensor]]) -> dict[str, float]:
        if not kept["sel"]:
            return {"loss": 0.0, "n_tokens": 0.0, "entropy_mean": 0.0}
        sel = torch.cat(kept["sel"])
        logp = torch.cat(kept["logp"])
        # The loss over the whole batch from the pre-update logprobs, with all diagnostics.
        _, diag = clipped_pg_loss(
            logp,
            logp,
            batch.behav_logp[sel],
            batch.advantages[sel],
            torch.ones_like(logp),
            self.clip_eps,
            self.is_cap,
            batch.token_weights[sel],
        )
        diag["entropy_mean"] = float(torch.cat(kept["ent"]).mean())
        diag["logp_mean"] = float(logp.mean())
        return diag

"""What a learner step trains on: trajectories collated into right-padded tensors with a flat
list of the trained tokens, the micro-batches a forward pass takes, and the proximal policy's
values per trained token, fixed for the step (learner/train.py uses them; learner/diagnostics.py
reads them)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from shared.protocol import Trajectory


@dataclass
class TrainBatch:
    input_ids: Tensor  # [B, L] right-padded
    attention_mask: Tensor  # [B, L]
    row: Tensor  # [N] batch row of each trained token (tokens of a row contiguous, in order)
    pos: Tensor  # [N] its position (>= 1); the logit comes from position pos - 1
    targets: Tensor  # [N] its token id
    behav_logp: Tensor  # [N] behaviour-policy logprob from the actor
    advantages: Tensor  # [N]
    token_weights: Tensor  # [N] replay IS weight of the token's trajectory
    role: Tensor  # [N] `Role` of the token
    turn: Tensor  # [N] turn index
    version: Tensor  # [N] policy version that sampled the token

    @property
    def n_tokens(self) -> int:
        return int(self.targets.numel())


def collate(
    trajs: Sequence[Trajectory],
    advantages: Sequence[float | np.ndarray],
    pad_id: int = 0,
    traj_weights: Sequence[float] | np.ndarray | None = None,
) -> TrainBatch:
    """Pad trajectories into [B, L] and list every loss-masked token with its per-token data.

    `advantages[i]` is trajectory i's advantage, or an array of per-turn advantages that its
    tokens index by `turn_idx` (clamped to the last turn).
    """
    lengths = [t.n_tokens for t in trajs]
    width = max(lengths, default=1)
    input_ids = np.full((len(trajs), width), pad_id, dtype=np.int64)
    attention = np.zeros((len(trajs), width), dtype=np.int64)
    parts: dict[str, list[np.ndarray]] = {
        k: [] for k in ("row", "pos", "behav", "adv", "tw", "role", "turn", "version")
    }
    for i, t in enumerate(trajs):
        ids = t.array("token_ids")
        input_ids[i, : len(ids)] = ids
        attention[i, : len(ids)] = 1
        pos = np.flatnonzero(t.array("loss_mask"))
        pos = pos[pos >= 1]  # token 0 has no preceding context to be predicted from
        turn = t.array("turn_idx")[pos].astype(np.int64)
        a = np.atleast_1d(np.asarray(advantages[i], dtype=np.float32))
        w = 1.0 if traj_weights is None else float(traj_weights[i])
        parts["row"].append(np.full(pos.size, i))
        parts["pos"].append(pos)
        parts["behav"].append(t.array("behav_logprob")[pos])
        parts["adv"].append(a[np.clip(turn, 0, a.size - 1)])
        parts["tw"].append(np.full(pos.size, w, dtype=np.float32))
        parts["role"].append(t.array("role")[pos].astype(np.int64))
        parts["turn"].append(turn)
        parts["version"].append(t.array("policy_version")[pos].astype(np.int64))

    def cat(name: str, dtype: torch.dtype) -> Tensor:
        arr = np.concatenate(parts[name]) if parts[name] else np.zeros(0)
        return torch.as_tensor(arr).to(dtype)

    row, pos_t = cat("row", torch.long), cat("pos", torch.long)
    ids_t = torch.from_numpy(input_ids)
    return TrainBatch(
        input_ids=ids_t,
        attention_mask=torch.from_numpy(attention),
        row=row,
        pos=pos_t,
        targets=ids_t[row, pos_t],
        behav_logp=cat("behav", torch.float32),
        advantages=cat("adv", torch.float32),
        token_weights=cat("tw", torch.float32),
        role=cat("role", torch.long),
        turn=cat("turn", torch.long),
        version=cat("version", torch.long),
    )


def micro_batches(batch: TrainBatch, max_tokens: int, rows: Tensor | None = None) -> list[Tensor]:
    """Groups of `rows` (default all) whose padded size (rows x longest row) stays under
    `max_tokens`."""
    lengths = batch.attention_mask.sum(1).tolist()
    order = range(len(lengths)) if rows is None else rows.tolist()
    groups: list[list[int]] = [[]]
    longest = 0
    for i in sorted(order, key=lengths.__getitem__):
        longest_if = max(longest, lengths[i])
        if groups[-1] and longest_if * (len(groups[-1]) + 1) > max_tokens:
            groups.append([])
            longest_if = lengths[i]
        groups[-1].append(i)
        longest = longest_if
    return [torch.tensor(g, dtype=torch.long) for g in groups if g]


@dataclass
class Proximal:
    """Per trained token, fixed for the whole step (float64, CPU): the proximal policy's logp
    and entropy, the correction weight and the token weight derived from them."""

    logp: Tensor
    ent: Tensor
    is_w: Tensor
    dropped: Tensor
    tok_w: Tensor  # role / ActFocus weight x replay IS weight

    @classmethod
    def empty(cls, n: int) -> Proximal:
        z = torch.zeros(n, dtype=torch.float64)
        return cls(z, z.clone(), z.clone(), torch.zeros(n, dtype=torch.bool), z.clone())

"""What a learner step trains on: trajectories collated into right-padded tensors with a flat
list of the trained tokens, the micro-batches a forward pass takes, and the proximal policy's
values per trained token, fixed for the step (learner/train.py uses them; learner/diagnostics.py
reads them).

A micro-batch (`Micro`) is either padded (one trajectory per row, right-padded to the longest)
or packed (`[learner] packing`): trajectories concatenated into rows, first-fit decreasing, each
with `position_ids` restarting at 0. The decoder then gets no 2D attention mask, and transformers
(`masking_utils.find_packed_sequence_indices`) turns every restart of the positions into a
sequence boundary: a block-diagonal causal mask under sdpa / eager / flex attention, the varlen
kernel under flash attention (one row per micro-batch there: it only unpacks a batch of one).
A row's unused tail restarts at 0 too, so it is a segment of its own that nothing attends to."""

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
class Micro:
    """One forward pass: `sel` indexes the batch's trained tokens it holds; `row`, `pos` locate
    them in its own tensors (the logit of token (row, pos) comes from (row, pos - 1))."""

    sel: Tensor  # [n] ascending indices into the batch's trained tokens
    input_ids: Tensor  # [R, W]
    attention_mask: Tensor  # [R, W] 1 on real tokens (a prefix of each row)
    row: Tensor  # [n]
    pos: Tensor  # [n]
    position_ids: Tensor | None = None  # [R, W] packed: restarting at 0 per trajectory


def _selected(batch: TrainBatch, rows: Tensor) -> Tensor:
    return torch.isin(batch.row, rows).nonzero().squeeze(1)


def padded_micro(batch: TrainBatch, rows: Tensor) -> Micro:
    """The trajectories `rows`, one per row, right-padded to the longest of them."""
    sel = _selected(batch, rows)
    remap = torch.full((batch.input_ids.shape[0],), -1, dtype=torch.long)
    remap[rows] = torch.arange(rows.numel())  # batch row -> row of the micro-batch
    width = int(batch.attention_mask[rows].sum(1).max())
    ids, mask = batch.input_ids[rows, :width], batch.attention_mask[rows, :width]
    return Micro(sel, ids, mask, remap[batch.row[sel]], batch.pos[sel])


def pack_rows(lengths: Sequence[int], order: Sequence[int], width: int) -> list[list[int]]:
    """First-fit decreasing: the trajectories `order` (their `lengths`) into rows of at most
    `width` tokens (a longer one gets a row of its own)."""
    bins: list[list[int]] = []
    fill: list[int] = []
    for i in sorted(order, key=lambda j: -lengths[j]):
        n = lengths[i]
        k = next((k for k, f in enumerate(fill) if f + n <= width), len(bins))
        if k == len(bins):
            bins.append([])
            fill.append(0)
        bins[k].append(i)
        fill[k] += n
    return bins


def packed_micro(batch: TrainBatch, bins: Sequence[Sequence[int]]) -> Micro:
    """The trajectories of `bins` concatenated row by row, positions restarting at 0."""
    lengths = batch.attention_mask.sum(1)
    width = max(int(lengths[b].sum()) for b in bins)
    ids = torch.zeros((len(bins), width), dtype=batch.input_ids.dtype)
    mask = torch.zeros((len(bins), width), dtype=batch.attention_mask.dtype)
    position_ids = torch.zeros((len(bins), width), dtype=torch.long)
    where_row = torch.full((batch.input_ids.shape[0],), -1, dtype=torch.long)
    where_off = torch.zeros(batch.input_ids.shape[0], dtype=torch.long)
    for r, members in enumerate(bins):
        off = 0
        for i in members:
            n = int(lengths[i])
            ids[r, off : off + n] = batch.input_ids[i, :n]
            mask[r, off : off + n] = 1
            position_ids[r, off : off + n] = torch.arange(n)
            where_row[i], where_off[i] = r, off
            off += n
        position_ids[r, off:] = torch.arange(width - off)  # the tail: a segment of its own
    sel = _selected(batch, torch.tensor([i for b in bins for i in b], dtype=torch.long))
    owner = batch.row[sel]
    return Micro(sel, ids, mask, where_row[owner], where_off[owner] + batch.pos[sel], position_ids)


def plan_micro_batches(
    batch: TrainBatch,
    max_tokens: int,
    rows: Tensor | None = None,
    packing: bool = False,
    one_row: bool = False,
) -> list[Micro]:
    """The forward passes over the trajectories `rows` (default all), each under `max_tokens`
    tokens (rows x width, padding included; one trajectory longer than that is a pass alone).

    Padded: `micro_batches`. Packed: rows as wide as the longest trajectory (`one_row`: as wide
    as `max_tokens`, one row per pass), filled first-fit decreasing; passes of up to
    max_tokens // width rows.
    """
    if not packing:
        return [padded_micro(batch, g) for g in micro_batches(batch, max_tokens, rows)]
    lengths = batch.attention_mask.sum(1).tolist()
    order = list(range(len(lengths))) if rows is None else rows.tolist()
    if not order:
        return []
    width = max(max(lengths[i] for i in order), max_tokens if one_row else 0)
    bins = pack_rows(lengths, order, width)
    per_pass = 1 if one_row else max(1, max_tokens // width)
    return [packed_micro(batch, bins[k : k + per_pass]) for k in range(0, len(bins), per_pass)]


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

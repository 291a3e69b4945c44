"""Multi-process training with FSDP2 (`torch.distributed.fsdp.fully_shard`) under torchrun.

`torchrun --nproc_per_node N -m learner ...` starts N ranks; with WORLD_SIZE > 1,
`init_distributed()` joins the process group (nccl with one GPU per LOCAL_RANK, gloo on CPU)
and `shard_model()` makes every decoder layer an FSDP unit, then the root (embeddings, final
norm, LM head). A single process (no torchrun, or WORLD_SIZE = 1) runs exactly as before: every
helper here is then a no-op or a plain call.

Design:

* Only rank 0 is a learner to the outside world: it talks to the broker, serves weights, writes
  checkpoints and summaries. The other ranks ("followers") run `ShardedTrainer.follow()`, a
  loop over commands that rank 0 broadcasts as msgspec-encoded bytes in a uint8 tensor:
  `step` (carrying the whole batch), `weights` (publish), `checkpoint` and `stop`. Rank 0
  sends a command right before it enters the matching collective, so the loop in `learner.loop`
  does not need to know about followers.
* Every rank runs the step's bookkeeping on the whole batch: group advantages, IS-weight
  normalisation, the minibatch permutation, loss denominators and diagnostics. That costs
  O(tokens) and keeps control flow and RNG draws identical on all ranks, so every collective
  is matched, whatever the batch. Only the model compute is split: inside each micro-batch
  rank r runs forward and backward for rows r, r+N, r+2N, ... (padded micro-batches are sorted
  by length, packed rows filled first-fit decreasing, so the deal is balanced) and the
  per-token (logp, entropy) are all-gathered, so each rank evaluates the same
  whole-micro-batch loss with the whole-batch token denominator. The gather's backward hands
  each rank the gradient of its own tokens times N, and FSDP's reduce-scatter averages over N,
  so the summed gradient is the single-process gradient of the whole-batch token-mean loss (up
  to float summation order).
* The trainer feeds the LM head's weight to the fused logprob kernel instead of calling the
  head module, so no root `forward` would ever all-gather the root's parameters; the logprob
  method is registered as an FSDP forward method instead.
* Publishing and checkpoints gather a full state dict (`get_model_state_dict(...,
  full_state_dict=True, cpu_offload=True)`), which leaves the CPU tensors on rank 0 only;
  checkpoints store the optimizer state keyed by parameter name, so a run resumes under any
  world size. On resume every rank reads the checkpoint (one node, one filesystem) and
  restores the same RNG state.

Limits: the model must not draw from the global RNG in `forward` (no dropout; RL fine-tuning of
decoder-only LLMs runs with dropout 0), since ranks compute different rows; rank 0 re-syncs
the torch RNG at each step anyway. One node only.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from datetime import timedelta
from functools import partial
from typing import Any, NoReturn, cast

import msgspec
import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from learner.train import Trainer
from shared.protocol import Trajectory

log = logging.getLogger(__name__)

# Followers wait in a broadcast while rank 0 waits for the broker, which can legitimately take
# long (actors starting, vLLM compiling): the default 30 min collective timeout is too short.
COLLECTIVE_TIMEOUT = timedelta(hours=24)
_LOGPROB_METHOD = "headrace_token_logprobs"


# ---------------------------------------------------------------- process group


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """True on the rank that talks to the outside world (and in a single process)."""
    return rank() == 0


def launched_distributed() -> bool:
    """Started by torchrun with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed() -> None:
    """Join the torchrun process group (nccl on CUDA, gloo on CPU); no-op for one process."""
    if not launched_distributed() or dist.is_initialized():
        return
    if torch.cuda.is_available():
        # Before anything touches CUDA, so "cuda" means this rank's GPU everywhere.
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    log.info("rank %d of %d (%s)", rank(), world_size(), backend)


def shutdown() -> None:
    """Leave the process group (rank 0 calls `stop_followers()` first on an orderly end)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_rank(code: int) -> NoReturn:
    """End a torchrun rank, after `shutdown()`, without the interpreter's teardown.

    `fully_shard` leaves references to the gloo group in torch's C++ state that
    `destroy_process_group` does not drop: its worker threads outlive it (seen in
    /proc/self/task). The group is then destroyed during interpreter finalization, where about
    one run in fifteen here aborted with "terminate called without an active exception"
    (SIGABRT), so torchrun reported a finished training as failed. Ours is all flushed first.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe has nothing left to lose
            pass
    os._exit(code)


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_model(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2-wrap a HF decoder-only model (each decoder layer, then the root) when distributed.

    Call it before building the optimizer: sharding replaces the parameters.
    """
    if world_size() == 1:
        return model
    from torch.distributed.fsdp import fully_shard

    for layer in cast(Any, model).get_decoder().layers:  # an HF causal LM
        fully_shard(layer)
    fully_shard(model)
    return model


# ---------------------------------------------------------------- commands from rank 0


class _Command(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    op: str  # "step" | "weights" | "checkpoint" | "stop"
    items: list[Trajectory] = []
    is_weights: list[float] | None = None
    policy_version: int | None = None
    torch_rng: bytes = b""


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(_Command)


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _broadcast_bytes(data: bytes | None) -> bytes:
    """Rank 0's `data` on every rank: length first, then the bytes as a uint8 tensor."""
    dev = _comm_device()
    n = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64, device=dev)
    dist.broadcast(n, src=0)
    if data is not None:
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(dev)
    else:
        buf = torch.empty(int(n.item()), dtype=torch.uint8, device=dev)
    dist.broadcast(buf, src=0)
    return data if data is not None else buf.cpu().numpy().tobytes()


def broadcast_from_main(data: bytes | None) -> bytes:
    """Rank 0's non-empty `data` on every rank (the others pass None)."""
    return _broadcast_bytes(data)


def _send(cmd: _Command) -> None:
    _broadcast_bytes(_encoder.encode(cmd))


def _recv() -> _Command:
    return _decoder.decode(_broadcast_bytes(None))


def stop_followers() -> None:
    """Rank 0: end the followers' `follow()` loops."""
    if world_size() > 1 and is_main():
        _send(_Command(op="stop"))


# ---------------------------------------------------------------- full state on rank 0


def _full_options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state_dict(model: torch.nn.Module) -> dict[str, Tensor]:
    """The model's weights, whole and on CPU, on rank 0 ({} on followers); a plain
    `state_dict()` when not sharded. Collective: rank 0 calls it, followers join via `follow`."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    if is_main():
        _send(_Command(op="weights"))
    return cast(dict[str, Tensor], get_model_state_dict(model, options=_full_options()))


def full_training_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """(model state, optimizer state keyed by parameter name), whole, on rank 0 of a sharded
    model. Collective like `full_state_dict`."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    if is_main():
        _send(_Command(op="checkpoint"))
    opts = _full_options()
    msd = get_model_state_dict(model, options=opts)
    osd = None if optimizer is None else get_optimizer_state_dict(model, optimizer, options=opts)
    return cast(dict[str, Tensor], msd), cast(dict[str, Any] | None, osd)


def load_full_state(
    model: torch.nn.Module,
    model_state: dict[str, Tensor],
    optimizer: torch.optim.Optimizer | None,
    optimizer_state: dict[str, Any] | None,
) -> None:
    """Load whole (unsharded) states, present on every rank, into a sharded model/optimizer."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, cast(dict[str, Any], model_state), options=opts)
    if optimizer is not None and optimizer_state is not None:
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=opts)


# ---------------------------------------------------------------- the split forward


class _GatherTokens(torch.autograd.Function):
    """Concatenate every rank's [n_r, ...] rows (rank order). Backward keeps this rank's slice
    times the world size: all ranks back-propagate the same loss, and FSDP divides the sum of
    their gradients by the world size."""

    @staticmethod
    def forward(ctx: Any, local: Tensor, counts: list[int]) -> Tensor:
        ctx.counts = counts
        padded = local.new_zeros((max(counts), *local.shape[1:]))
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded)
        return torch.cat([p[:n] for p, n in zip(parts, counts, strict=True)])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        r, counts = rank(), ctx.counts
        start = sum(counts[:r])
        return grad[start : start + counts[r]] * len(counts), None


class ShardedTrainer(Trainer):
    """`Trainer` whose model may be FSDP-sharded across ranks; identical to `Trainer` in a
    single process. Rank 0 calls `step()` as usual; the other ranks call `follow()`."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, **kw: Any):
        super().__init__(model, optimizer, **kw)
        if is_sharded(model):
            from torch.distributed.fsdp import register_fsdp_forward_method

            setattr(model, _LOGPROB_METHOD, partial(Trainer.token_logprobs, self))
            register_fsdp_forward_method(model, _LOGPROB_METHOD)

    def step(
        self,
        trajs: Sequence[Trajectory],
        is_weights: Sequence[float] | None = None,
        policy_version: int | None = None,
    ) -> tuple[dict[str, float], np.ndarray]:
        if is_sharded(self.model) and is_main():
            rng = torch.get_rng_state().numpy().tobytes()
            ws = None if is_weights is None else [float(w) for w in is_weights]
            _send(_Command("step", list(trajs), ws, policy_version, rng))
        return super().step(trajs, is_weights, policy_version)

    def follow(self) -> None:
        """A follower's loop: mirror rank 0's steps and collectives until it says stop."""
        while True:
            cmd = _recv()
            if cmd.op == "step":
                torch.set_rng_state(torch.frombuffer(bytearray(cmd.torch_rng), dtype=torch.uint8))
                super().step(cmd.items, cmd.is_weights, cmd.policy_version)
            elif cmd.op == "weights":
                full_state_dict(self.model)
            elif cmd.op == "checkpoint":
                full_training_state(self.model, self.optimizer)
            elif cmd.op == "stop":
                return
            else:
                raise RuntimeError(f"unknown command from rank 0: {cmd.op!r}")

    def token_logprobs(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        row: Tensor,
        pos: Tensor,
        position_ids: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        if not is_sharded(self.model):
            return super().token_logprobs(input_ids, attention_mask, row, pos, position_ids)
        n_ranks, r = world_size(), rank()
        owner = row % n_ranks  # rows (packed or padded) are dealt round-robin
        counts = torch.bincount(owner, minlength=n_ranks).tolist()
        mine = owner == r
        if counts[r]:
            rows = torch.arange(r, input_ids.shape[0], n_ranks)
            lrow, lpos = row[mine] // n_ranks, pos[mine]
        else:
            # Nothing of ours here, but FSDP's all-gathers and reduce-scatters must still be
            # matched: run one token of the micro-batch and keep none of it (zero gradient).
            rows, lrow, lpos = row[:1], row[:1] * 0, pos[:1]
        ids, mask = input_ids[rows], attention_mask[rows]
        width = int(mask.sum(1).max())  # real tokens are a prefix of every row
        pids = None if position_ids is None else position_ids[rows, :width]
        logp, ent = getattr(self.model, _LOGPROB_METHOD)(
            ids[:, :width], mask[:, :width], lrow, lpos, pids
        )
        local = torch.stack([logp, ent], 1)[: counts[r]]
        gathered = _GatherTokens.apply(local, counts)
        # `gathered` is in rank-major order; put each token back at its place in `row`.
        inverse = torch.argsort(torch.argsort(owner, stable=True))
        out = gathered.index_select(0, inverse.to(gathered.device))
        return out[:, 0], out[:, 1]

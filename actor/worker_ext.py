"""Methods vLLM mixes into its worker (`worker_extension_cls`); they run in the engine process.

Called through `AsyncLLM.collective_rpc` while the engine is paused.

A full-weight reload takes the direct path (`plan_direct` / `load_direct`) where the model is
one this code understands completely: unquantized, not tensor-parallel, on the CPU, made of
linear layers, embeddings and plain parameters (Llama, Qwen, Mistral ...). Every linear layer's
weight is handed to vLLM's own `process_weights_after_loading` as a view over the blob (q/k/v
and gate/up are adjacent in a published blob, so their stacked weight is one view too), which
packs it into the layer's kernel (oneDNN copies and reorders it); embeddings and norms are
copied into their parameters in place. vLLM's generic `reload_weights` instead materialises
every layer in fresh memory, copies each tensor there through per-parameter loaders and only
then packs it: about twice the bytes moved and a page fault per 4 KiB (1.2-2.2 s against
0.5 s for SmolLM2-135M here). Anything else (a tensor this plan cannot place, a quantised or
sharded layer) goes through `reload_weights`, decided before a single weight is touched.
"""

from __future__ import annotations

import json
import mmap
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def safetensors_views(buf: Any) -> Iterator[tuple[str, Any]]:
    """(name, tensor) for every tensor of the safetensors blob `buf`, as views over `buf`:
    nothing is copied (the tensors live as long as `buf` stays mapped). Aligned tensors (all
    of a published blob's) share one storage, so adjacent ones can be viewed as one."""
    import torch

    n = int.from_bytes(buf[:8], "little")
    header = json.loads(bytes(buf[8 : 8 + n]))
    base = 8 + n
    with warnings.catch_warnings():  # a read-only mapping: we only ever read it
        warnings.simplefilter("ignore", UserWarning)
        whole = torch.frombuffer(buf, dtype=torch.uint8) if len(buf) else None
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = getattr(torch, _DTYPES[info["dtype"]])
            start, end = info["data_offsets"]
            count = (end - start) // dtype.itemsize
            if count == 0 or whole is None:
                yield name, torch.empty(info["shape"], dtype=dtype)
            elif (base + start) % dtype.itemsize == 0:
                yield name, whole[base + start : base + end].view(dtype).view(info["shape"])
            else:
                flat = torch.frombuffer(buf, dtype=dtype, count=count, offset=base + start)
                yield name, flat.view(info["shape"])


def stacked(parts: list[Any]) -> Any:
    """`parts` (2-D tensors, equal columns) concatenated along rows: a view when they lie
    back to back in one buffer (a published blob keeps q/k/v and gate/up adjacent), else a
    new tensor."""
    import torch

    first = parts[0]
    if len(parts) == 1:
        return first
    rows = sum(p.shape[0] for p in parts)
    cols = first.shape[1]
    storage = first.untyped_storage().data_ptr()
    end = first.data_ptr()
    for p in parts:
        if p.dtype != first.dtype or not p.is_contiguous() or p.shape[1] != cols:
            return torch.cat(parts)
        if p.data_ptr() != end or p.untyped_storage().data_ptr() != storage:
            return torch.cat(parts)
        end += p.numel() * p.element_size()
    return first.as_strided((rows, cols), (cols, 1))


@dataclass
class DirectPlan:
    """Where every tensor of a blob goes, checked against the model before anything is
    written: linear layers (module, checkpoint names stacked into its weight, in order), and
    parameters copied in place (parameter, checkpoint name; embeddings then repacked)."""

    linears: list[tuple[Any, list[str]]] = field(default_factory=list)
    copies: list[tuple[Any, str]] = field(default_factory=list)
    repack: list[Any] = field(default_factory=list)  # embeddings whose kernel reads `weight`


def plan_direct(model: Any, shapes: dict[str, tuple[int, ...]], tied: bool) -> DirectPlan | None:
    """The direct reload of a blob whose tensors have `shapes` into `model`, or None when some
    part is outside what it handles (vLLM's loader then). `tied`: the model ties its output
    embedding to the input one (a blob's `lm_head.*` is then the same tensor again)."""
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    packed: dict[str, list[str]] = dict(getattr(model, "packed_modules_mapping", {}) or {})
    plan = DirectPlan()
    used: set[str] = set()
    for mname, module in model.named_modules():
        own = dict(module.named_parameters(recurse=False))
        if not own:
            continue
        if isinstance(module, LinearBase):
            names = _linear_sources(module, mname, own, shapes, packed)
            if names is None:
                return None
            plan.linears.append((module, names))
            used.update(names)
            continue
        embedding = isinstance(module, VocabParallelEmbedding)
        if embedding and not _plain_embedding(module, own):
            return None
        copies = _param_sources(f"{mname}." if mname else "", own, shapes, padded=embedding)
        if copies is None:
            return None
        plan.copies.extend(copies)
        used.update(name for _, name in copies)
        if embedding:
            plan.repack.append(module)
    extra = set(shapes) - used
    if extra and not (tied and all(n.startswith("lm_head.") for n in extra)):
        return None  # a tensor vLLM would place and this plan would not
    return plan


def _linear_sources(
    module: Any,
    mname: str,
    own: dict[str, Any],
    shapes: dict[str, tuple[int, ...]],
    packed: dict[str, list[str]],
) -> list[str] | None:
    """The blob's tensors that, stacked by rows, make this linear layer's weight (its own
    name, or the parts `packed_modules_mapping` names: q/k/v, gate/up), or None."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    if set(own) != {"weight"} or getattr(module, "tp_size", 1) != 1:
        return None  # a bias, or a shard: vLLM's loader
    if type(module.quant_method) is not UnquantizedLinearMethod:
        return None
    parent, _, leaf = mname.rpartition(".")
    names = [f"{mname}.weight"]
    if names[0] not in shapes:
        names = [f"{parent}.{p}.weight" if parent else f"{p}.weight" for p in packed.get(leaf, [])]
    cols = (module.input_size_per_partition,)
    if not names or any(shapes.get(n, (0,))[1:] != cols for n in names):
        return None
    if sum(shapes[n][0] for n in names) != module.output_size_per_partition:
        return None
    return names


def _plain_embedding(module: Any, own: dict[str, Any]) -> bool:
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    return (
        type(module.quant_method) is UnquantizedEmbeddingMethod
        and set(own) == {"weight"}
        and getattr(module, "tp_size", 1) == 1
    )


def _param_sources(
    prefix: str, own: dict[str, Any], shapes: dict[str, tuple[int, ...]], padded: bool
) -> list[tuple[Any, str]] | None:
    """(parameter, blob name) for every parameter of a module copied in place, or None when
    one has no tensor of its shape (`padded`: an embedding, whose rows may be padded)."""
    out = []
    for pname, param in own.items():
        name = prefix + pname
        want = tuple(param.shape)
        got = shapes.get(name)
        if got is None or got[1:] != want[1:] or not got[:1] <= want[:1]:
            return None
        if got[:1] != want[:1] and not padded:
            return None
        out.append((param, name))
    return out


def _holds(obj: Any, lo: int, hi: int) -> bool:
    """Whether `obj` (a module's tensors and its kernel closure) points into [lo, hi)."""
    import torch

    tensors: list[Any] = [*obj.parameters(recurse=False), *obj.buffers(recurse=False)]
    fn = getattr(obj, "cpu_linear", None)
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            tensors.append(cell.cell_contents)
        except ValueError:  # an empty cell
            continue
    tensors.extend(getattr(fn, "__defaults__", None) or ())
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel() and lo <= t.data_ptr() < hi:
            return True
    return False


def load_direct(plan: DirectPlan, views: dict[str, Any], lo: int, hi: int) -> None:
    """Apply `plan` from `views` (tensors over the blob mapped at [lo, hi)). Every layer's
    kernel ends up owning its memory: one still pointing into the blob (a kernel that keeps
    the weight it was given) is packed again from a copy."""
    import torch

    with torch.no_grad():
        for param, name in plan.copies:
            src = views[name]
            param.data[: src.shape[0]].copy_(src)
        for module in plan.repack:
            module.quant_method.process_weights_after_loading(module)
        for module, names in plan.linears:
            dtype = module.weight.dtype
            weight = stacked([views[n] for n in names]).to(dtype)
            module.weight = torch.nn.Parameter(weight, requires_grad=False)
            module.quant_method.process_weights_after_loading(module)
            if _holds(module, lo, hi):
                module.weight = torch.nn.Parameter(weight.clone(), requires_grad=False)
                module.quant_method.process_weights_after_loading(module)


class WeightSyncExtension:
    model_runner: Any  # provided by the vLLM worker this class is mixed into

    def sampled_counts(self) -> dict[str, int]:
        """Tokens sampled so far by every request the worker holds (engine paused)."""
        requests = getattr(self.model_runner, "requests", {})
        return {rid: len(state.output_token_ids) for rid, state in requests.items()}

    def load_safetensors(self, path: str) -> int:
        """Reload all weights in place from a safetensors file with HF parameter names.

        The file (a shared-memory buffer, actor/weights.py) is mapped, not read: the direct
        path (module docstring) packs each layer from the mapping, vLLM's loader otherwise
        copies every tensor from it into its parameter.
        """
        with open(path, "rb") as f:
            m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            tensors = list(safetensors_views(m))
            count = len(tensors)
            if not self._load_direct(m, tensors):
                self.model_runner.reload_weights(weights_iterator=iter(tensors))
            del tensors
        finally:
            try:
                m.close()
            except BufferError:  # vLLM kept a view: the mapping goes when that does
                pass
        return count

    def _load_direct(self, m: mmap.mmap, tensors: list[tuple[str, Any]]) -> bool:
        """The direct path, if the model allows it (False: nothing was touched)."""
        import torch
        from vllm.platforms import current_platform

        runner = self.model_runner
        config = runner.vllm_config
        if not current_platform.is_cpu() or config.lora_config is not None:
            return False
        if config.model_config.quantization is not None:
            return False
        model = runner.get_model()
        hf = config.model_config.hf_config
        tied = bool(getattr(hf, "tie_word_embeddings", False))
        views = dict(tensors)
        plan = plan_direct(model, {n: tuple(t.shape) for n, t in views.items()}, tied)
        if plan is None:
            return False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            lo = torch.frombuffer(m, dtype=torch.uint8).data_ptr()
        load_direct(plan, views, lo, lo + len(m))
        for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):
            fn = getattr(runner, reset, None)
            if callable(fn):
                fn()
        return True

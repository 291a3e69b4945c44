"""Methods vLLM mixes into its worker (`worker_extension_cls`); they run in the engine process.

Called through `AsyncLLM.collective_rpc` while the engine is paused.
"""

from __future__ import annotations

import json
import mmap
import warnings
from collections.abc import Iterator
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
    nothing is copied (the tensors live as long as `buf` stays mapped)."""
    import torch

    n = int.from_bytes(buf[:8], "little")
    header = json.loads(bytes(buf[8 : 8 + n]))
    base = 8 + n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = getattr(torch, _DTYPES[info["dtype"]])
        start, end = info["data_offsets"]
        count = (end - start) // dtype.itemsize
        if count == 0:
            yield name, torch.empty(info["shape"], dtype=dtype)
            continue
        with warnings.catch_warnings():  # a read-only mapping: we only ever read it
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(buf, dtype=dtype, count=count, offset=base + start)
        yield name, flat.view(info["shape"])


class WeightSyncExtension:
    model_runner: Any  # provided by the vLLM worker this class is mixed into

    def sampled_counts(self) -> dict[str, int]:
        """Tokens sampled so far by every request the worker holds (engine paused)."""
        requests = getattr(self.model_runner, "requests", {})
        return {rid: len(state.output_token_ids) for rid, state in requests.items()}

    def load_safetensors(self, path: str) -> int:
        """Reload all weights in place from a safetensors file with HF parameter names.

        The file (a shared-memory buffer, actor/weights.py) is mapped, not read: vLLM's loader
        copies every tensor from the mapping straight into its parameter.
        """
        with open(path, "rb") as f:
            m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            tensors = list(safetensors_views(m))
            count = len(tensors)
            self.model_runner.reload_weights(weights_iterator=iter(tensors))
            del tensors
        finally:
            try:
                m.close()
            except BufferError:  # vLLM kept a view: the mapping goes when that does
                pass
        return count

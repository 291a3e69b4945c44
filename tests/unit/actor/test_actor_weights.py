"""The actor's reusable shared-memory weight buffer (actor/weights.py) and the engine-side
views over it (actor/worker_ext.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from actor.weights import WeightBuffer
from actor.worker_ext import _holds, safetensors_views, stacked


def test_the_buffer_is_reused_resized_and_leaves_nothing_behind(tmp_path: Path) -> None:
    with WeightBuffer(str(tmp_path)) as buf:
        assert list(tmp_path.iterdir()) == []  # unlinked at once: a killed actor leaks nothing
        for size, fill in ((1000, b"a"), (1000, b"b"), (300, b"c")):
            view = buf.view(size)
            view[:] = fill * size
            view.release()
            assert Path(buf.path).read_bytes() == fill * size  # what another process opens
            assert os.stat(buf.path).st_size == size
    assert not os.path.exists(buf.path)
    buf.close()  # idempotent


def test_close_while_a_view_is_alive_still_closes_and_deletes(tmp_path: Path) -> None:
    # An exiting actor may still hold a view of the last version it loaded.
    buf = WeightBuffer(str(tmp_path))
    view = buf.view(64)
    view[:4] = b"abcd"
    buf.close()
    assert not list(tmp_path.iterdir())
    buf.close()  # idempotent
    del view


def _blob(tensors: dict[str, torch.Tensor]) -> bytearray:
    from learner.publish import serialize_state_dict

    return bytearray(serialize_state_dict(tensors))


def test_views_over_a_published_blob_share_one_storage_and_read_every_tensor() -> None:
    g = torch.Generator().manual_seed(0)
    sd = {
        "q": torch.randn(4, 3, generator=g),
        "k": torch.randn(2, 3, generator=g),
        "n": torch.randn(3, generator=g).bfloat16(),
        "e": torch.zeros(0, 3),
    }
    buf = _blob(sd)
    views = dict(safetensors_views(buf))
    assert set(views) == set(sd)
    for name, t in sd.items():
        assert views[name].dtype == t.dtype and torch.equal(views[name], t), name
    storages = {v.untyped_storage().data_ptr() for n, v in views.items() if v.numel()}
    assert len(storages) == 1  # one storage: adjacent tensors can be viewed as one
    views["q"][0, 0] = 7.0  # a view, not a copy
    assert dict(safetensors_views(buf))["q"][0, 0] == 7.0


def test_views_read_a_blob_whose_tensors_are_not_aligned() -> None:
    t = torch.arange(3, dtype=torch.float32)
    header = json.dumps(
        {
            "b": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
            "f": {"dtype": "F32", "shape": [3], "data_offsets": [1, 13]},
        }
    ).encode()
    header += b" " * (-len(header) % 8)
    buf = bytearray(len(header).to_bytes(8, "little") + header + b"\x05" + t.numpy().tobytes())
    views = dict(safetensors_views(buf))
    assert views["b"].tolist() == [5] and torch.equal(views["f"], t)


def test_stacked_is_a_view_when_the_parts_are_adjacent_else_a_copy() -> None:
    g = torch.Generator().manual_seed(1)
    sd = {n: torch.randn(r, 4, generator=g) for n, r in (("q", 3), ("k", 1), ("v", 1))}
    views = dict(safetensors_views(_blob(sd)))
    qkv = stacked([views["q"], views["k"], views["v"]])
    assert torch.equal(qkv, torch.cat([sd["q"], sd["k"], sd["v"]]))
    assert qkv.data_ptr() == views["q"].data_ptr()  # no copy
    vk = stacked([views["v"], views["k"]])  # out of order: a new tensor
    assert torch.equal(vk, torch.cat([sd["v"], sd["k"]]))
    assert vk.data_ptr() != views["v"].data_ptr()
    apart = stacked([views["q"], views["v"]])  # k lies between them
    assert torch.equal(apart, torch.cat([sd["q"], sd["v"]]))
    assert stacked([views["k"]]) is views["k"]


def test_a_kernel_holding_the_blob_is_detected() -> None:
    buf = bytearray(64)
    inside = torch.frombuffer(buf, dtype=torch.float32)
    lo = inside.data_ptr()
    layer = torch.nn.Linear(4, 4)
    assert not _holds(layer, lo, lo + len(buf))
    layer.cpu_linear = lambda x, _w=None: torch.nn.functional.linear(x, inside[:16].view(4, 4))
    assert _holds(layer, lo, lo + len(buf))  # a closure over a view of the blob
    layer.cpu_linear = lambda x, w=inside[:4]: x  # a default argument
    assert _holds(layer, lo, lo + len(buf))
    layer.cpu_linear = lambda x: x
    layer.weight = torch.nn.Parameter(inside[:16].view(4, 4), requires_grad=False)
    assert _holds(layer, lo, lo + len(buf))  # a parameter

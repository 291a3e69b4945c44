"""The actor's reusable shared-memory weight buffer (actor/weights.py)."""

from __future__ import annotations

import os
from pathlib import Path

from actor.weights import WeightBuffer


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

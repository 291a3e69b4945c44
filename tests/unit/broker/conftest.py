from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker.store import Store


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    """An open, durable store for the broker's parts driven without a server."""
    s = Store(tmp_path / "data")
    await s.open()
    yield s
    await s.close()

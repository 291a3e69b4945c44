"""`--log-level`: a root level, then per-logger levels (`INFO,broker.store.maintenance=DEBUG`)."""

from __future__ import annotations

import logging

import pytest

from shared.logs import parse_levels, setup_logging


def test_root_level_and_named_loggers() -> None:
    assert parse_levels("warning") == ("WARNING", {})
    assert parse_levels("INFO,broker.store.maintenance=debug, actor = ERROR") == (
        "INFO",
        {"broker.store.maintenance": "DEBUG", "actor": "ERROR"},
    )
    assert parse_levels("broker=DEBUG") == ("INFO", {"broker": "DEBUG"})


def test_unknown_level_is_named() -> None:
    with pytest.raises(ValueError, match="'LOUD'"):
        parse_levels("INFO,broker=loud")


def test_setup_applies_named_levels() -> None:
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    try:
        setup_logging("WARNING,headrace.test.audit=DEBUG", role="t")
        assert root.level == logging.WARNING
        assert logging.getLogger("headrace.test.audit.child").isEnabledFor(logging.DEBUG)
        assert not logging.getLogger("headrace.test.other").isEnabledFor(logging.INFO)
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
        logging.getLogger("headrace.test.audit").setLevel(logging.NOTSET)

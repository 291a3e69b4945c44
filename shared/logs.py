"""Logging setup shared by every role: plain lines, or one JSON object per line."""

from __future__ import annotations

import json
import logging
import os
import sys
import time


class JsonFormatter(logging.Formatter):
    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(time.time(), 3),
            "role": self.role,
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def parse_levels(spec: str) -> tuple[str, dict[str, str]]:
    """`"INFO"` or `"INFO,broker.store.maintenance=DEBUG"`: the root level, then a level for
    each named logger (and its children). Raises ValueError naming an unknown level."""
    root, named = "INFO", {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, lvl = part.rpartition("=")
        lvl = lvl.strip().upper()
        if not isinstance(logging.getLevelName(lvl), int):
            raise ValueError(f"unknown log level {lvl!r} in {spec!r}")
        if name:
            named[name.strip()] = lvl
        else:
            root = lvl
    return root, named


def setup_logging(level: str = "INFO", role: str = "", json_lines: bool | None = None) -> None:
    """`level`: see `parse_levels`. `HEADRACE_LOG_JSON=1` switches every role to JSON lines
    on stderr."""
    root_level, named = parse_levels(level)
    if json_lines is None:
        json_lines = os.environ.get("HEADRACE_LOG_JSON", "") == "1"
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(JsonFormatter(role))
    else:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s {role} %(levelname)s %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(root_level)
    for name, lvl in named.items():
        logging.getLogger(name).setLevel(lvl)

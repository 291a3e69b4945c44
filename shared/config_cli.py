"""`headrace config show [--config FILE] [--set ...]`: the resolved config as TOML.

Every field is printed, defaults included, so the output is the whole configuration a run with
the same flags would use; fed back as `--config` it loads to an equal config. The stdlib reads
TOML but does not write it: `to_toml` covers what a config holds (tables, scalars, lists and
inline tables; None, which TOML cannot say, is left out, i.e. left at its default).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from typing import Any

import msgspec

from shared.config import Config, load_config
from shared.overrides import add_set_argument

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def add_config_parser(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("config", help="show the resolved config")
    csub = c.add_subparsers(dest="config_cmd", required=True)
    show = csub.add_parser("show", help="print the config with defaults and --set applied")
    show.add_argument("--config", help="TOML config (default: built-in defaults)")
    add_set_argument(show)


def cmd_config(args: argparse.Namespace) -> int:
    print(to_toml(load_config(args.config, args.overrides)), end="")
    return 0


def to_toml(cfg: Config) -> str:
    lines: list[str] = []
    _table(msgspec.to_builtins(cfg), [], lines)
    return "\n".join(lines).rstrip("\n") + "\n"


def _table(table: dict[str, Any], path: list[str], lines: list[str]) -> None:
    """`[path]` with its values, then each sub-table as `[path.name]` (TOML wants the values
    of a table before any of its sub-tables)."""
    if path:
        lines.append(f"[{'.'.join(_key(k) for k in path)}]")
    for k, v in table.items():
        if v is not None and not isinstance(v, dict):
            lines.append(f"{_key(k)} = {_value(v)}")
    if path:
        lines.append("")
    for k, v in table.items():
        if isinstance(v, dict):
            _table(v, [*path, k], lines)


def _key(k: str) -> str:
    return k if _BARE_KEY.match(k) else _string(k)


def _string(s: str) -> str:
    # JSON's escapes are a subset of TOML's basic-string escapes; TOML also bans raw DEL
    return json.dumps(s).replace("\x7f", "\\u007f")


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return _string(v)
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        items = (f"{_key(k)} = {_value(x)}" for k, x in v.items() if x is not None)
        return "{" + ", ".join(items) + "}"
    raise TypeError(f"no TOML for {type(v).__name__}")

"""`--set SECTION.KEY=VALUE`: one config setting from the command line, typed by the schema.

Every command that reads a config takes `--set` (repeatable); `load_config(path, overrides)`
applies them to the file's TOML table before it is validated, so an override is checked exactly
like the same line in the file. Values are TOML (`8`, `1e-5`, `true`, `[1, 2]`,
`{rank = 8}`); a string field also takes a bare word or path (`--set model.path=/x`). Keys
nest (`learner.lora.rank=8`, `learner.weighting.role_weights.reasoning=0.5`).

The `--resume | --fresh` pair of `headrace run` and the learner is registered here too.
"""

from __future__ import annotations

import argparse
import copy
import re
import tomllib
from collections.abc import Sequence
from typing import Any

import msgspec
from msgspec import inspect as mi

from shared.config_base import MOVED_KEYS, ConfigError, moved_message

SET_HELP = "one config setting, typed as in the TOML file (repeatable; e.g. learner.lr=1e-4)"


def add_set_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        dest="overrides",
        metavar="SECTION.KEY=VALUE",
        help=SET_HELP,
    )


def add_resume_arguments(parser: argparse.ArgumentParser) -> None:
    """`--resume | --fresh` (`args.resume`: None, "resume" or "fresh"): what the learner does
    with a checkpoint of another run (learner/resume.py); `headrace run` hands it on."""
    once = parser.add_mutually_exclusive_group()
    once.add_argument(
        "--resume",
        action="store_const",
        const="resume",
        help="resume the newest checkpoint even if another run or config wrote it",
    )
    once.add_argument(
        "--fresh",
        action="store_const",
        const="fresh",
        dest="resume",
        help="start from the model; existing checkpoints are moved aside",
    )


def set_argv(overrides: Sequence[str]) -> list[str]:
    """The `--set` flags that hand `overrides` on to a child process."""
    return [arg for item in overrides for arg in ("--set", item)]


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str], schema: type) -> dict[str, Any]:
    """A copy of the TOML table `raw` with each `SECTION.KEY=VALUE` set (later ones win)."""
    raw = copy.deepcopy(raw)
    root = mi.type_info(schema)
    for item in overrides:
        parts, text = _split(item)
        value = _typed(text, _field_type(root, parts, item), item)
        node = raw
        for name in parts[:-1]:
            if not isinstance(node.get(name), dict):
                node[name] = {}  # the schema has a table here: another value was wrong anyway
            node = node[name]
        node[parts[-1]] = value
    return raw


def explain(
    e: msgspec.ValidationError, source: str, overrides: Sequence[str], schema: type | None = None
) -> str:
    """A validation error as one line, naming the `--set` it comes from when it is that one.

    With `schema`, a value outside a `Literal`'s choices is said with the choices.
    """
    text = _with_choices(str(e), schema) if schema is not None else str(e)
    m = re.search(r"at `\$\.([^`]*)`", str(e))
    path = re.sub(r"\[\d+\]", "", m.group(1)) if m else None  # a list item: its key's
    for item in reversed(overrides):  # the last one of a key is the one that counted
        if path is not None and _split(item)[0] == path.split("."):
            return f"--set {item}: {text}"
    if overrides:
        return f"{source} with {' '.join(set_argv(overrides))}: {text}"
    return f"{source}: {text}"


# msgspec's words for a value outside a Literal (a dict key: "at `key` in `$.path`")
_ENUM = re.compile(
    r"Invalid enum value (?P<value>.+) - at (?P<key>`key` in )?`\$\.(?P<path>[^`]*)`$"
)


def _with_choices(text: str, schema: type) -> str:
    """msgspec's "Invalid enum value 'x' - at `$.a.b`" as "b must be one of c, d, not 'x'",
    keeping the path (it names the key too)."""
    m = _ENUM.fullmatch(text)
    if m is None:
        return text
    names = re.sub(r"\[\d+\]", "", m["path"]).split(".")
    t: mi.Type = mi.type_info(schema)
    for name in names:
        t = _unwrap(t)
        if isinstance(t, mi.ListType):  # the path named an item of it: `[i]`, stripped
            t = _unwrap(t.item_type)
        if isinstance(t, mi.StructType):
            t = next((f.type for f in t.fields if f.encode_name == name), mi.AnyType())
        elif isinstance(t, mi.DictType):
            t = t.value_type
    t = _unwrap(t)
    what = names[-1]
    if m["key"] and isinstance(t, mi.DictType):
        t, what = _unwrap(t.key_type), f"{what} keys"
    elif isinstance(t, mi.ListType):
        t = _unwrap(t.item_type)
    literals = t.types if isinstance(t, mi.UnionType) else (t,)
    choices = [v for lt in literals if isinstance(lt, mi.LiteralType) for v in lt.values]
    if not choices:
        return text
    where = text[m.end("value") + len(" - at ") :]
    return f"{what} must be one of {', '.join(map(str, choices))}, not {m['value']} - at {where}"


def _split(item: str) -> tuple[list[str], str]:
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise ConfigError(f"--set {item}: expected SECTION.KEY=VALUE, e.g. learner.lr=1e-4")
    return parts, text.strip()


def _field_type(t: mi.Type, parts: list[str], item: str) -> mi.Type:
    """The schema type at `parts`; an unknown name is an error listing the valid ones."""
    for i, name in enumerate(parts):
        t = _unwrap(t)
        if isinstance(t, mi.StructType):
            fields = {f.encode_name: f.type for f in t.fields}
            if name not in fields:
                moved = MOVED_KEYS.get(tuple(parts[: i + 1]))
                if moved is not None:
                    raise ConfigError(
                        f"--set {item}: {moved_message(tuple(parts[: i + 1]), moved)}"
                    )
                if i == 0:
                    where, kind = f"no section {name!r}", "sections"
                else:
                    where, kind = f"no key {name!r} in [{'.'.join(parts[:i])}]", "its keys"
                raise ConfigError(f"--set {item}: {where}; {kind}: {', '.join(fields)}")
            t = fields[name]
        elif isinstance(t, mi.DictType):
            t = t.value_type
        else:
            table = ".".join(parts[:i])
            raise ConfigError(f"--set {item}: {table} is a single value, not a table")
    return t


def _unwrap(t: mi.Type) -> mi.Type:
    """`X | None` -> X (TOML has no null, so an override can only mean X)."""
    if isinstance(t, mi.UnionType):
        types = [u for u in t.types if not isinstance(u, mi.NoneType)]
        if len(types) == 1:
            return types[0]
    return t


def _is_str(t: mi.Type) -> bool:
    if isinstance(t, mi.UnionType):
        return any(_is_str(u) for u in t.types)
    if isinstance(t, mi.LiteralType):  # a choice of names
        return all(isinstance(v, str) for v in t.values)
    return isinstance(t, mi.StrType)


def _typed(text: str, t: mi.Type, item: str) -> Any:
    if _is_str(t) and text[:1] not in ('"', "'"):
        return text  # a bare string: a path, a name
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        if isinstance(t, mi.AnyType):
            return text
        raise ConfigError(f"--set {item}: {text!r} is not {_describe(_unwrap(t))}") from None


def _describe(t: mi.Type) -> str:
    if isinstance(t, mi.BoolType):
        return "true or false"
    if isinstance(t, mi.IntType):
        return "an integer"
    if isinstance(t, mi.FloatType):
        return "a number"
    if isinstance(t, mi.ListType):
        return 'a TOML list, e.g. [1, 2] or ["a", "b"]'
    if isinstance(t, mi.StructType | mi.DictType):
        return "a TOML inline table, e.g. {key = 1}"
    return "a TOML value"

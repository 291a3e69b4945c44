"""What every config section shares: the error type, the base struct, moved keys.

Its own module so that the section modules (shared/config_*.py, env_config.py,
lora_config.py, logging_config.py) and shared/config.py, which assembles them, import it
without a cycle.

String choices are `Literal` types: msgspec refuses any other value while decoding, naming the
key, and `shared.overrides.explain` adds the allowed values. `__post_init__` checks what a type
cannot say (ranges, relations between keys); it runs on decoding and on direct construction.
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec


class ConfigError(ValueError):
    pass


class Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


# Keys that moved, by their old path (a section path and the key): the new section and key.
# Filled by the section modules that own them. An old key is refused with its new place
# rather than as merely unknown, so an old config tells its owner what to write instead.
MOVED_KEYS: dict[tuple[str, ...], tuple[str, ...]] = {}


def moved_message(old: tuple[str, ...], new: tuple[str, ...]) -> str:
    """`[env] rg_datasets moved to [env.reasoning_gym] datasets`."""
    return f"[{'.'.join(old[:-1])}] {old[-1]} moved to [{'.'.join(new[:-1])}] {new[-1]}"


# Choices that were renamed, by key path: {old value: why and what to write instead}. The
# Literal leaves the old value out; this turns its refusal into the rename.
RENAMED_VALUES: dict[tuple[str, ...], dict[str, str]] = {}


def _at(raw: Mapping[str, object], path: tuple[str, ...]) -> Mapping[str, object] | None:
    node: object = raw
    for name in path:
        node = node.get(name) if isinstance(node, Mapping) else None
    return node if isinstance(node, Mapping) else None


def find_moved(raw: Mapping[str, object]) -> str | None:
    """The message for the first moved key or renamed value in the TOML table `raw`, if any."""
    for old, new in MOVED_KEYS.items():
        node = _at(raw, old[:-1])
        if node is not None and old[-1] in node:
            return moved_message(old, new)
    for path, renamed in RENAMED_VALUES.items():
        node = _at(raw, path[:-1])
        value = node.get(path[-1]) if node is not None else None
        if isinstance(value, str) and value in renamed:
            return f"[{'.'.join(path[:-1])}] {path[-1]}: {renamed[value]}"
    return None

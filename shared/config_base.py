"""What every config section shares: the error type, the base struct, the choice check.
Its own module so that sections kept in files of their own (shared/env_config.py) and
shared/config.py, which gathers them, import it without a cycle."""

from __future__ import annotations

import msgspec


class ConfigError(ValueError):
    pass


class Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


def check_choice(section: msgspec.Struct, name: str, allowed: tuple[str, ...]) -> None:
    if getattr(section, name) not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}")

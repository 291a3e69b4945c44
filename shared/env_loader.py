"""Loading user code by name: environments and the dataset env's reward / step functions.

`[env] name` is a built-in name, `"pkg.module:Name"` (an import path), or the name of an
entry point in the `headrace.envs` group, which an installed package declares with

    [project.entry-points."headrace.envs"]
    myenv = "mypkg.envs:MyEnv"

Both the broker (for the env's tasks) and the actor (for its episodes) load the same class.
Import paths resolve against the current directory too, as the config's other relative paths
(`[model] path`, `[env] path`) do, so `examples.my_task.task:MyTask` works from the checkout.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from collections.abc import Callable
from importlib import metadata
from typing import Any

from shared.env_api import Env

ENTRY_POINT_GROUP = "headrace.envs"


class EnvLoadError(ValueError):
    """A user's environment or function could not be loaded (named in the message)."""


def is_import_path(name: str) -> bool:
    return ":" in name


def _cwd_on_path() -> None:
    # Console scripts (`headrace run`, `headrace-actor`) do not put the working directory on
    # sys.path the way `python -m` does; the user's module usually lives there.
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)


def load_object(path: str, what: str = "object") -> Any:
    """`"pkg.module:attr"` (or `"pkg.module:Class.attr"`) -> the object."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise EnvLoadError(f"{what} {path!r}: expected 'pkg.module:name'")
    _cwd_on_path()
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise EnvLoadError(f"{what} {path!r}: cannot import {module_name!r}: {e}") from e
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise EnvLoadError(f"{what} {path!r}: {module_name} has no {attr!r}") from None
    return obj


def entry_point_names() -> list[str]:
    return sorted({ep.name for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)})


def _entry_point(name: str) -> Any:
    eps = [ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if not eps:
        return None
    try:
        return eps[0].load()
    except Exception as e:  # the package's import failed: say which entry point
        raise EnvLoadError(f"entry point {name!r} ({eps[0].value}): {e!r}") from e


@functools.cache
def load_env_class(name: str) -> type[Env]:
    """The environment class `name` names (an import path or an entry point). Cached: every
    episode of a run builds its env from the same class."""
    obj = load_object(name, "env") if is_import_path(name) else _entry_point(name)
    if obj is None:
        known = ", ".join(entry_point_names()) or "none installed"
        raise EnvLoadError(
            f"env {name!r}: not a built-in environment, not 'pkg.module:Name', and no "
            f"{ENTRY_POINT_GROUP!r} entry point of that name ({known})"
        )
    if not (isinstance(obj, type) and issubclass(obj, Env)):
        raise EnvLoadError(f"env {name!r}: {obj!r} is not a subclass of shared.env_api.Env")
    return obj


@functools.cache
def load_function(path: str, what: str = "function") -> Callable[..., Any]:
    fn = load_object(path, what)
    if not callable(fn):
        raise EnvLoadError(f"{what} {path!r} is not callable")
    return fn

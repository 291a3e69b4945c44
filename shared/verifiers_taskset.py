"""A `verifiers` (0.4) taskset, as the broker (its tasks) and the actor (its scoring) load it.

`[env] name = "verifiers"` with `[env.options] taskset` naming the taskset: a verifiers
taskset id (an installed package exporting its `Taskset` subclass in `__all__`, as
`verifiers` itself resolves them) or `"pkg.module:MyTaskset"`; `taskset_config` (a table)
is validated into the taskset's own config class. Every task's data travels to the actors as
JSON (`TaskData.model_dump_json`), so actors rebuild the task without iterating the taskset.

verifiers is imported lazily, when a taskset is loaded: it pulls in pydantic, openai and
friends (not torch or vLLM), which nothing else here needs.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from shared.env_loader import EnvLoadError, load_object


@functools.cache
def taskset_class(spec: str) -> Any:
    try:
        import verifiers.v1 as vf
        from verifiers.v1.utils.loaders import taskset_class as vf_taskset_class
    except ImportError as e:
        raise EnvLoadError(
            f"the verifiers environment needs `verifiers` (ops/requirements-verifiers.txt): {e}"
        ) from e
    if ":" in spec:
        cls = load_object(spec, "verifiers taskset")
    else:
        try:
            cls = vf_taskset_class(spec)
        except (ImportError, AttributeError, TypeError, ValueError) as e:
            raise EnvLoadError(f"verifiers taskset {spec!r}: {e}") from e
    if not (isinstance(cls, type) and issubclass(cls, vf.Taskset)):
        raise EnvLoadError(f"verifiers taskset {spec!r}: {cls!r} is not a verifiers Taskset")
    return cls


def load_taskset(spec: str, config_json: str) -> Any:
    """The taskset `spec` names, built with its config from `config_json` (a JSON object)."""
    import verifiers.v1 as vf
    from verifiers.v1.utils.generic import concrete_type

    cls = taskset_class(spec)
    config_cls = concrete_type(cls, vf.TasksetConfig, origin=vf.Taskset) or vf.TasksetConfig
    raw = json.loads(config_json or "{}")
    try:
        config = config_cls.model_validate({**raw, "id": spec})
    except Exception as e:  # pydantic's ValidationError: name the taskset
        raise EnvLoadError(f"verifiers taskset {spec!r}: bad taskset_config: {e}") from e
    return cls(config)


def opening_messages(data: Any) -> list[dict[str, str]]:
    """A task's opening conversation: its system prompt, then its prompt (text or messages)."""
    from verifiers.v1.types import content_text

    msgs = [{"role": "system", "content": data.system_prompt}] if data.system_prompt else []
    if isinstance(data.prompt, str):
        msgs.append({"role": "user", "content": data.prompt})
    else:
        for m in data.prompt or []:
            msgs.append({"role": str(m.role), "content": content_text(m.content) or ""})
    return msgs

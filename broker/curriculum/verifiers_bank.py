"""`[env] name = "verifiers"`: a verifiers taskset's tasks as a bank (shared/verifiers_taskset.py).

Every task of the (finite) taskset is one task here, all in family "default" unless
`[env.options] family_field` names a field of the task data to group them by. Held out:
`[env] eval_fraction` of the tasks by a hash of their data and `[env] seed`. A task whose
prompt cannot open an episode (neither text nor messages) is skipped and named in the log.
"""

from __future__ import annotations

import json
import logging
from itertools import islice

from broker.curriculum.user_banks import ListBank, hash_split, task_key
from shared.config import ConfigError, EnvConfig
from shared.env_api import Task
from shared.env_loader import EnvLoadError
from shared.verifiers_taskset import load_taskset

log = logging.getLogger(__name__)

MAX_TASKS = 1_000_000  # an infinite taskset is read this far


class VerifiersBank(ListBank):
    def __init__(self, env: EnvConfig) -> None:
        spec = env.options.get("taskset")
        if not isinstance(spec, str) or not spec:
            raise ConfigError("env.options.taskset: name the verifiers taskset to train on")
        config_json = json.dumps(env.options.get("taskset_config", {}), sort_keys=True)
        try:
            taskset = load_taskset(spec, config_json)
        except EnvLoadError as e:
            raise ConfigError(f"env: {e}") from None
        field = str(env.options.get("family_field", ""))
        tasks = []
        for task in islice(taskset, MAX_TASKS):
            data = task.data
            if data.prompt is None:
                log.warning("verifiers task %s skipped: it has no prompt", data.idx)
                continue
            payload: dict[str, str | int | float] = {
                "taskset": spec,
                "config": config_json,
                "data": data.model_dump_json(exclude_none=True),
                "max_tokens": env.max_tokens,
            }
            value = getattr(data, field, None) if field else None
            family = "default" if value is None or value == "" else str(value)
            tasks.append(Task(payload=payload, family=family))
        train, held = hash_split(tasks, task_key, env.eval_fraction, env.seed)
        super().__init__("vf", "verifiers", train, held, env.seed)

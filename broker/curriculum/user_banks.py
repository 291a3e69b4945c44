"""Task banks of tasks listed up front: users' environments, datasets, verifiers tasksets.

A procedural bank generates task i of a family from a seed; these banks instead hold their
tasks, grouped by family in the order they came, and serve them by the same ids
(`<prefix>-<family>-<i>`). Their held-out tasks are given (a user's `heldout_tasks`, a
dataset's `eval_path`) or a deterministic share of the tasks (`[env] eval_fraction`: by a
hash of each task's payload and `[env] seed`, so every process splits alike and a task is
never on both sides).

`user_env_bank(name, env)` builds the bank of a user's environment class ("pkg.module:Name"
or a `headrace.envs` entry point), whose `tasks(options)` are loaded here on the broker;
broker/curriculum/factory.py decides which bank a config names.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import TypeVar

from broker.curriculum.banks import Family, Part, ProceduralBank
from shared import protocol as P
from shared.config import ConfigError, EnvConfig
from shared.env_api import Task
from shared.env_loader import EnvLoadError, load_env_class

log = logging.getLogger(__name__)

T = TypeVar("T")


def hash_split(
    items: Sequence[T], key: Callable[[T], str], fraction: float, seed: int
) -> tuple[list[T], list[T]]:
    """(kept, held out): an item is held out when the hash of (seed, key) falls below
    `fraction`. Deterministic, order-free, and equal items land on the same side."""
    train: list[T] = []
    held: list[T] = []
    for item in items:
        h = hashlib.blake2b(f"{seed}\0{key(item)}".encode(), digest_size=8).digest()
        (held if int.from_bytes(h, "little") / 2**64 < fraction else train).append(item)
    return train, held


def task_key(task: Task) -> str:
    return json.dumps([task.family, task.payload], sort_keys=True)


def by_family(tasks: Iterable[Task]) -> dict[str, list[Task]]:
    out: dict[str, list[Task]] = {}
    for t in tasks:
        out.setdefault(t.family, []).append(t)
    return out


class ListBank(ProceduralBank):
    """Given tasks as a bank: family f's task i is the i-th task of f in `train`."""

    def __init__(
        self, prefix: str, env_name: str, train: Sequence[Task], held: Sequence[Task], seed: int
    ) -> None:
        if not train:
            raise ConfigError(f"env {env_name!r}: no training tasks")
        self.prefix, self.env_name = prefix, env_name
        self._train = by_family(train)
        self._held = by_family(held)
        parts = []
        for fam, tasks in self._train.items():
            family = Family(fam, sum(t.difficulty for t in tasks) / len(tasks), len(tasks))
            parts.append(Part(prefix, family, partial(self._make, fam)))
        super().__init__(parts, seed)

    def _spec(self, task: Task, index: int) -> P.TaskSpec:
        return P.TaskSpec(
            task_id=f"{self.prefix}-{task.family}-{index}",
            env=self.env_name,
            family=task.family,
            difficulty=task.difficulty,
            payload=task.payload,
        )

    def _make(self, family: str, index: int) -> P.TaskSpec:
        return self._spec(self._train[family][index], index)

    def heldout(self, n: int) -> dict[str, list[P.TaskSpec]]:
        """Up to `n` held-out tasks per family, numbered after the family's training tasks
        (`<prefix>-<family>-<size + j>`: ids `task()` does not serve)."""
        out = {}
        for fam, tasks in self._held.items():
            start = len(self._train.get(fam, ()))
            out[fam] = [self._spec(t, start + j) for j, t in enumerate(tasks[: max(0, n)])]
        return out


def as_task(item: object, where: str) -> Task:
    """A user's task (a `Task` or a bare payload dict) checked for the wire."""
    task = item if isinstance(item, Task) else Task(payload=item)  # type: ignore[arg-type]
    if not isinstance(task.payload, dict):
        raise ConfigError(f"{where}: a task's payload must be a dict, not {task.payload!r}")
    for k, v in task.payload.items():
        if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, str | int | float):
            raise ConfigError(
                f"{where}: payload field {k!r} = {v!r}: payloads are flat str / int / float "
                "values (put JSON text in one field for structured data)"
            )
    if not isinstance(task.family, str) or not task.family:
        raise ConfigError(f"{where}: a task's family must be a non-empty string")
    return task


def user_env_bank(name: str, env: EnvConfig) -> ListBank:
    """The bank of a user's environment class: its `tasks(options)`, and held out its
    `heldout_tasks(options)` or `[env] eval_fraction` of the tasks."""
    try:
        cls = load_env_class(name)
    except EnvLoadError as e:
        raise ConfigError(f"env.name: {e}") from None
    try:
        tasks = [as_task(t, f"{name} task {i}") for i, t in enumerate(cls.tasks(env.options))]
        given = cls.heldout_tasks(env.options)
    except NotImplementedError as e:
        raise ConfigError(f"env {name!r}: {e} (define the classmethod tasks(options))") from None
    if given is None:
        train, held = hash_split(tasks, task_key, env.eval_fraction, env.seed)
    else:
        train, held = tasks, [as_task(t, f"{name} held-out task {i}") for i, t in enumerate(given)]
    # Task ids split at the first "-": the prefix must not contain one.
    return ListBank(name.replace("-", "_"), name, train, held, env.seed)

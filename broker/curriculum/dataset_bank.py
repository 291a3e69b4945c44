"""`[env] name = "dataset"`: a file of rows as a task bank, scored on the actor by a function.

The file is JSONL, parquet, or a directory a Hugging Face `datasets.Dataset` was saved to
(`save_to_disk`; a `DatasetDict` gives its "train" split). Each row has `prompt` (text) or
`messages` (a chat: `{"role", "content"}` dicts), optionally `family` (rows group into
families by it, else one family "default") and `difficulty` (a number), and any other fields
the reward function reads. A row that cannot be used (unparsable line, neither prompt nor
messages, wrong types) is skipped, never fatal: it is named (row number and reason) in the log,
counted in one warning line and in `headrace_broker_dataset_bad_rows_total{reason}`.

The whole row travels in the task's payload as JSON text (`row`), with the reward and step
functions' import paths: actors may run on machines that do not have the file, so a task
carries its data rather than an index into it. Held out (`heldout`): the rows of
`[env] eval_path`, or `eval_fraction` of the rows by a hash of their content and `[env] seed`.

Reading parquet and `datasets` directories imports pyarrow / datasets, here only, when such a
file is read: the broker stays light otherwise.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from broker import metrics as M
from broker.curriculum.user_banks import ListBank, hash_split, task_key
from shared.config import ConfigError, EnvConfig
from shared.env_api import Task

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")
NAMED_BAD_ROWS = 20  # bad rows logged one by one; the rest only counted


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open(encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                yield n, ValueError(f"unparsable JSON: {e.msg} at column {e.colno}")


def _table_rows(path: Path) -> Iterator[tuple[int, Any]]:
    if path.is_dir():
        try:
            import datasets  # lazy: only a broker that reads such a directory pays for it
        except ImportError as e:
            raise ConfigError(f"env.path {path}: reading it needs `datasets` ({e})") from None
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise ConfigError(f"env.path {path}: a DatasetDict without a 'train' split")
            ds = ds["train"]
        rows = iter(ds)
    else:
        try:
            import pyarrow.parquet as pq  # lazy, as above
        except ImportError as e:
            raise ConfigError(f"env.path {path}: reading parquet needs `pyarrow` ({e})") from None
        rows = iter(pq.read_table(path).to_pylist())
    yield from enumerate(rows, 1)


def read_rows(path: str) -> Iterator[tuple[int, Any]]:
    """(row number, row) for every row of `path`; a row that could not be read is the
    exception saying why. Row numbers count from 1 (JSONL: the line number)."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"env.path: no file or directory {p}")
    if p.is_dir() or p.suffix == ".parquet":
        return _table_rows(p)
    return _jsonl_rows(p)


def check_row(row: Any) -> tuple[str, str] | None:
    """(reason, detail) when the row cannot be a task, else None."""
    if isinstance(row, Exception):
        return "unparsable", str(row)
    if not isinstance(row, dict):
        return "not_an_object", f"a row must be an object, not {type(row).__name__}"
    prompt, messages = row.get("prompt"), row.get("messages")
    if prompt is not None:
        if not isinstance(prompt, str) or not prompt.strip():
            return "bad_prompt", "`prompt` must be a non-empty string"
    elif messages is not None:
        if not isinstance(messages, list) or not messages:
            return "bad_messages", "`messages` must be a non-empty list"
        for i, m in enumerate(messages):
            ok = isinstance(m, dict) and m.get("role") in ROLES
            if not ok or not isinstance(m.get("content"), str):
                return "bad_messages", f"message {i} needs a role in {ROLES} and text content"
    else:
        return "no_prompt", "neither `prompt` nor `messages`"
    family = row.get("family", "default")
    if not isinstance(family, str | int) or isinstance(family, bool) or str(family) == "":
        return "bad_family", "`family` must be a non-empty string"
    difficulty = row.get("difficulty", 0.0)
    if not isinstance(difficulty, int | float) or isinstance(difficulty, bool):
        return "bad_difficulty", "`difficulty` must be a number"
    return None


class DatasetBank(ListBank):
    """Rows of `[env] path` as tasks of the `dataset` environment (actor/envs/dataset_env.py)."""

    def __init__(self, env: EnvConfig) -> None:
        if not env.path:
            raise ConfigError("env.path: the dataset environment needs a file of rows")
        if ":" not in env.reward:
            raise ConfigError(
                f"env.reward = {env.reward!r}: the dataset environment needs its reward "
                "function's import path, 'pkg.module:score'"
            )
        if env.step and ":" not in env.step:
            raise ConfigError(f"env.step = {env.step!r}: expected 'pkg.module:fn'")
        self.env = env
        self.bad_rows: list[tuple[str, int, str]] = []  # (file, row number, reason)
        tasks = self._load(env.path)
        if env.eval_path:
            train, held = tasks, self._load(env.eval_path)
        else:
            train, held = hash_split(tasks, task_key, env.eval_fraction, env.seed)
        self._report()
        super().__init__("ds", "dataset", train, held, env.seed)

    def _load(self, path: str) -> list[Task]:
        tasks = []
        for n, row in read_rows(path):
            bad = check_row(row)
            if bad is not None:
                M.DATASET_BAD_ROWS.labels(reason=bad[0]).inc()
                self.bad_rows.append((path, n, bad[1]))
                if len(self.bad_rows) <= NAMED_BAD_ROWS:
                    log.warning("dataset %s row %d skipped: %s", path, n, bad[1])
                continue
            tasks.append(self._task(row))
        return tasks

    def _task(self, row: dict[str, Any]) -> Task:
        env = self.env
        payload: dict[str, str | int | float] = {
            # default=str: parquet / datasets rows may hold dates or bytes; the reward
            # function sees them as text
            "row": json.dumps(row, ensure_ascii=False, default=str),
            "reward": env.reward,
            "step": env.step,
            "max_turns": env.max_turns,
            "max_tokens": env.max_tokens,
            "fixed_length": int(env.fixed_length),
        }
        family = str(row.get("family", "default"))
        return Task(payload=payload, family=family, difficulty=float(row.get("difficulty", 0.0)))

    def _report(self) -> None:
        if self.bad_rows:
            first = self.bad_rows[0]
            log.warning(
                "dataset: %d bad rows skipped (first: %s row %d: %s)",
                len(self.bad_rows),
                *first,
            )

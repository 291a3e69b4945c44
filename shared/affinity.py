"""Per-role CPU cores: `[actor] cpus` and `[learner] cpus`.

On a machine whose CPUs the roles share, giving each its own cores keeps the engine's and the
trainer's threads from contending for the same ones (as each role has its own device in a GPU
deployment). An empty list keeps today's behaviour: the process runs wherever the OS puts it.
The config checks the list's form when it is decoded (`check_cpus`); whether the cores exist is
checked by the process that pins itself (`pin_process`), on its own machine.
"""

from __future__ import annotations

import os
from collections.abc import Sequence


def check_cpus(cpus: Sequence[int], key: str) -> None:
    """Raise ValueError unless `cpus` are distinct core ids >= 0."""
    bad = [c for c in cpus if c < 0]
    if bad:
        raise ValueError(f"{key}: core ids must be >= 0, got {bad}")
    dupes = sorted({c for c in cpus if list(cpus).count(c) > 1})
    if dupes:
        raise ValueError(f"{key}: core ids listed more than once: {dupes}")


def pin_process(cpus: Sequence[int], key: str) -> None:
    """Restrict this process (and the processes and threads it starts later) to `cpus`.

    Raises ValueError naming `key` when a core is not one this process may run on here, or
    when the platform has no CPU affinity. Empty `cpus`: nothing changes."""
    if not cpus:
        return
    if not hasattr(os, "sched_setaffinity"):
        raise ValueError(f"{key}: CPU affinity is not supported on this platform")
    allowed = os.sched_getaffinity(0)
    missing = sorted(set(cpus) - allowed)
    if missing:
        raise ValueError(
            f"{key}: cores {missing} are not available to this process "
            f"(it may run on {sorted(allowed)})"
        )
    os.sched_setaffinity(0, set(cpus))


def cpu_list(cpus: Sequence[int]) -> str:
    """`cpus` in the kernel's and vLLM's list format: runs as ranges, e.g. "0-3,6"."""
    parts: list[str] = []
    ids = sorted(cpus)
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        parts.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(parts)


def omp_threads_bind(cpus: Sequence[int], ranks: int = 1) -> str:
    """`VLLM_CPU_OMP_THREADS_BIND` for an engine of `ranks` workers on `cpus`: "nobind" for no
    cores, else the cores in order split into `ranks` consecutive shares (the first ones one
    core larger when they do not divide evenly), one list per rank, separated by "|" (vLLM's
    format, e.g. "0-1|2-3"). ValueError if there are fewer cores than ranks."""
    if not cpus:
        return "nobind"
    if len(cpus) < ranks:
        raise ValueError(f"{len(cpus)} cores for {ranks} engine workers: want one each at least")
    ids = sorted(cpus)
    share, extra = divmod(len(ids), ranks)
    lists, start = [], 0
    for r in range(ranks):
        end = start + share + (1 if r < extra else 0)
        lists.append(cpu_list(ids[start:end]))
        start = end
    return "|".join(lists)

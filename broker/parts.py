"""What the server hands every part of the broker (admission, intake, sampling, relay): the
in-memory state they share, a way to answer a peer, a way to run a store write in the
background, and a hook to refresh the gauges. The parts never touch a socket themselves, so
tests drive them with plain callables.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from broker.batches import BatchBook
from broker.curriculum.banks import TaskBank
from broker.curriculum.factory import make_bank
from broker.curriculum.service import Curriculum
from broker.evaluation import EvalRounds
from broker.groups import GroupAssembler, Retirement
from broker.leases import LeaseBook
from broker.replay import build_table
from broker.replay.table import Table
from broker.store import Store
from shared import protocol as P
from shared.config import Config

Send = Callable[[bytes, P.Base], Awaitable[None]]
Spawn = Callable[[Coroutine[Any, Any, None]], None]


def _nothing() -> None:
    return None


@dataclass(slots=True, frozen=True)
class Wiring:
    send: Send  # to one peer, by routing id
    # Store writes and claims go through this: a slow disk must never stall the loop that
    # answers heartbeats, task requests and status (the server keeps the tasks for `stop`).
    spawn: Spawn
    changed: Callable[[], None] = _nothing  # sizes changed: refresh the gauges


@dataclass(slots=True, frozen=True)
class Books:
    """The broker's state, shared by its parts. One event loop owns all of it: no locks."""

    store: Store
    table: Table  # complete groups, ready to sample
    groups: GroupAssembler  # stored trajectories waiting for the rest of their group
    retirement: Retirement  # groups leaving unsampled, counted and marked in the store
    leases: LeaseBook  # training leases
    bank: TaskBank
    curriculum: Curriculum
    evals: EvalRounds  # evaluation rounds, with their own lease book
    batches: BatchBook  # handed to the learner, kept until checkpointed


def build_books(cfg: Config, store: Store, spawn: Spawn, clock: Callable[[], float]) -> Books:
    """The state `cfg` describes, empty: the server then restores it from `store`."""
    b = cfg.broker
    bank = make_bank(cfg.env)  # ConfigError: e.g. an env this machine cannot load
    return Books(
        store=store,
        table=build_table(  # [broker.replay]: sampler, rate limiter; [broker]: removers
            b.replay,
            capacity=b.replay_capacity,
            max_times_sampled=b.max_times_sampled,
            min_size_to_sample=b.min_size_to_sample,
        ),
        groups=GroupAssembler(),
        retirement=Retirement(store, spawn),
        leases=LeaseBook(
            b.lease_deadline_s, b.heartbeat_timeout_s, clock, timeout_s=b.episode_timeout_s
        ),
        bank=bank,
        curriculum=Curriculum(bank, b.curriculum),
        # Its own book: an expired eval lease is played again for its round, never as a
        # training task (broker/evaluation.py).
        evals=EvalRounds(
            bank, LeaseBook(b.lease_deadline_s, b.heartbeat_timeout_s, clock, requeue=False)
        ),
        batches=BatchBook(),
    )

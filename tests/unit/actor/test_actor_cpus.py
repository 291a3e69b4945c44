"""`[actor] cpus`: the actor pins its process before the engine starts, and the engine binds
vLLM-CPU's OpenMP threads to those cores unless VLLM_CPU_OMP_THREADS_BIND is already set."""

from __future__ import annotations

import os

import pytest

import actor.build as B
from actor.engine import Engine
from shared.config import load_config

pytest.importorskip("vllm")

BIND = "VLLM_CPU_OMP_THREADS_BIND"


class Started(Exception):
    """Raised where the engine's arguments are built, before vLLM starts anything."""


@pytest.fixture
def no_engine(monkeypatch):
    """Engine() up to vLLM's engine arguments; BIND as it is when vLLM gets to read it."""
    import vllm.engine.arg_utils

    seen: dict[str, str | None] = {}

    def args(**kw):
        seen["bind"] = os.environ.get(BIND)
        raise Started

    monkeypatch.setattr(vllm.engine.arg_utils, "AsyncEngineArgs", args)
    monkeypatch.setenv(BIND, "restored-at-teardown")
    monkeypatch.delenv(BIND)
    return seen


@pytest.mark.parametrize(
    ("cpus", "tp", "want"),
    [(None, 1, "nobind"), ([], 1, "nobind"), ([0], 1, "0"), ([3, 0, 2], 1, "0,2-3")],
)
def test_the_engine_binds_its_threads_to_the_cores(no_engine, cpus, tp, want):
    with pytest.raises(Started):
        Engine("no-model", cpus=cpus, tensor_parallel_size=tp)
    assert no_engine["bind"] == want


def test_a_bind_set_in_the_environment_wins(no_engine, monkeypatch):
    monkeypatch.setenv(BIND, "1")
    with pytest.raises(Started):
        Engine("no-model", cpus=[0])
    assert no_engine["bind"] == "1"


def test_start_engine_pins_the_actor_before_the_engine(monkeypatch):
    order: list[tuple] = []
    monkeypatch.setattr(B, "pin_process", lambda cpus, key: order.append(("pin", cpus, key)))
    monkeypatch.setattr(B, "Engine", lambda path, **kw: order.append(("engine", kw["cpus"])))
    cfg = load_config(None, ["actor.cpus=[0]"])
    B.start_engine(cfg, "no-model", max_num_seqs=4)
    assert order == [("pin", [0], "[actor] cpus"), ("engine", [0])]

"""`[learner] cpus`: the learner pins itself before anything else and takes one torch thread
per core listed when `--torch-threads` is auto."""

from __future__ import annotations

import os

import pytest
import torch

import learner.__main__ as L


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_auto_threads_follow_the_cores_listed(threads):
    L._set_threads(0, [3, 1])
    assert torch.get_num_threads() == 2
    L._set_threads(0, [1])
    assert torch.get_num_threads() == 1


def test_explicit_threads_win_over_the_cores(threads):
    L._set_threads(3, [1])
    assert torch.get_num_threads() == 3


def test_auto_threads_without_cores_take_half_the_machine(threads, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    L._set_threads(0, [])
    assert torch.get_num_threads() == 4


def test_the_learner_pins_itself_to_its_cores_first(monkeypatch):
    pinned = []

    def pin(cpus, key):
        pinned.append((list(cpus), key))
        raise ValueError("stop here")

    monkeypatch.setattr(L, "pin_process", pin)
    assert L.main(["--set", "learner.cpus=[1]"]) == 2
    assert pinned == [([1], "[learner] cpus")]


def test_a_core_not_on_this_machine_is_one_line_and_exit_2(capsys):
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no CPU affinity on this platform")
    before = os.sched_getaffinity(0)
    assert L.main(["--set", "learner.cpus=[100000]"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("headrace-learner: [learner] cpus: cores [100000] are not available")
    assert os.sched_getaffinity(0) == before

"""The thread count on a CPU shared with other work (a busy core makes OpenMP threads crawl)."""

from __future__ import annotations

import pytest
import torch

from ancre_lightning import hardware
from ancre_lightning.errors import UserInputError


@pytest.fixture
def threads_restored():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_threads_leave_the_busy_cores():
    assert hardware.cpu_threads_for_load(cores=2, load=0.0, requested=2) == 2
    assert hardware.cpu_threads_for_load(cores=2, load=0.2, requested=2) == 2  # noise, not a busy core
    assert hardware.cpu_threads_for_load(cores=2, load=1.0, requested=2) == 1
    assert hardware.cpu_threads_for_load(cores=2, load=3.0, requested=2) == 1  # never fewer than one
    assert hardware.cpu_threads_for_load(cores=16, load=4.0, requested=16) == 12
    assert hardware.cpu_threads_for_load(cores=16, load=4.0, requested=8) == 8  # fewer asked: kept


def test_a_busy_machine_lowers_the_threads_and_says_so(monkeypatch, threads_restored, capsys):
    for name in hardware.THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    torch.set_num_threads(2)
    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(hardware, "busy_elsewhere", lambda: 1.0)
    assert hardware.limit_threads_to_free_cores() == 1 and torch.get_num_threads() == 1
    assert "torch uses 1 thread" in capsys.readouterr().err
    torch.set_num_threads(2)
    monkeypatch.setattr(hardware, "busy_elsewhere", lambda: 0.0)
    assert hardware.limit_threads_to_free_cores() is None and torch.get_num_threads() == 2


def test_the_users_thread_setting_wins(monkeypatch, threads_restored):
    monkeypatch.setattr(hardware, "busy_elsewhere", lambda: 8.0)
    torch.set_num_threads(2)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert hardware.limit_threads_to_free_cores() is None and torch.get_num_threads() == 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv("ANCRE_NUM_THREADS", "3")
    assert hardware.limit_threads_to_free_cores() == 3 and torch.get_num_threads() == 3
    monkeypatch.setenv("ANCRE_NUM_THREADS", "many")
    with pytest.raises(UserInputError, match="ANCRE_NUM_THREADS must be a positive integer"):
        hardware.limit_threads_to_free_cores()


def test_the_count_of_other_running_processes_is_a_number():
    assert hardware.busy_elsewhere(samples=3, interval_s=0.0) >= 0

"""The stall gauge reports the time a process that only sleeps was kept from running."""

from __future__ import annotations

import os
import signal
import time

import pytest

from integration.stall_gauge import STALL_MS, Stall, StallGauge, summary


def test_a_process_held_still_is_reported_as_one_stall_of_about_that_long():
    with StallGauge() as gauge:
        time.sleep(0.5)  # the child is up and ticking
        began = time.time_ns()
        os.kill(gauge.pid, signal.SIGSTOP)  # what a preempted VM does to everyone
        time.sleep(0.2)
        os.kill(gauge.pid, signal.SIGCONT)
        time.sleep(0.3)
        stalls = gauge.between(began - 10**9, time.time_ns())
        assert stalls, "the held-still child reported no stall"
        held = max(stalls, key=lambda stall: stall.ms)
        later = gauge.between(held.start_ns + 1, time.time_ns())
    assert held.ms >= 150, stalls
    assert all(stall.ms > STALL_MS for stall in stalls)
    assert held not in later  # a window counts the stalls that began in it


def test_a_gauge_whose_child_died_says_so_rather_than_report_no_stalls():
    with StallGauge() as gauge:
        os.kill(gauge.pid, signal.SIGKILL)
        time.sleep(0.2)
        with pytest.raises(RuntimeError, match="exited"):
            gauge.between(0, time.time_ns())


def test_the_summary_gives_count_longest_and_time_lost_per_minute():
    stalls = [Stall(0, 20.0), Stall(1, 100.0)]
    assert summary(stalls, 30.0) == {"count": 2, "max_ms": 100.0, "ms_per_minute": 240.0}
    assert summary([], 30.0) == {"count": 0, "max_ms": 0.0, "ms_per_minute": 0.0}

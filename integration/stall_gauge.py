"""How long this machine keeps a ready process from running: the noise in a benchmark's means.

A child process sleeps 1 ms at a time and reports every wake-up that came more
than STALL_MS late. It does nothing else, so its stalls are the machine's (CPU
starvation, the host preempting this VM), not any server's: while a bench runs,
they say which of its ways lost time to the box and how much. On this project's
2-core VMs, under a bench's load, such a process was held up to 515 ms, 53 times
in 45 s, at the same moments as PD's event stream (one E + PD, --overlap).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from dataclasses import dataclass

STALL_MS = 15.0
TICK_S = 0.001


@dataclass(frozen=True)
class Stall:
    start_ns: int  # wall clock, when the sleep began
    ms: float  # how long it took to wake up


class StallGauge:
    """`with StallGauge() as gauge:`, then `gauge.between(start_ns, end_ns)`."""

    def __enter__(self) -> StallGauge:
        self._stalls: list[Stall] = []
        self._lock = threading.Lock()
        self._child = subprocess.Popen(
            [sys.executable, "-m", "integration.stall_gauge"], stdout=subprocess.PIPE, text=True
        )
        threading.Thread(target=self._collect, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._child.kill()
        self._child.wait()

    @property
    def pid(self) -> int:
        return self._child.pid

    def _collect(self) -> None:
        for line in self._child.stdout:
            start_ns, ms = line.split()
            with self._lock:
                self._stalls.append(Stall(int(start_ns), float(ms)))

    def between(self, start_ns: int, end_ns: int) -> list[Stall]:
        """Stalls that began in [start_ns, end_ns); an error once the child is gone, whose
        silence would read as a machine that never stalled."""
        if self._child.poll() is not None:
            raise RuntimeError(f"the stall gauge's child exited ({self._child.returncode})")
        with self._lock:
            return [s for s in self._stalls if start_ns <= s.start_ns < end_ns]


def summary(stalls: list[Stall], seconds: float) -> dict[str, float]:
    """Count, longest, and time lost per minute of `seconds` measured."""
    lost = sum(s.ms for s in stalls)
    return {
        "count": len(stalls),
        "max_ms": round(max((s.ms for s in stalls), default=0.0), 1),
        "ms_per_minute": round(lost * 60 / seconds, 1) if seconds else 0.0,
    }


def watch() -> None:
    """The child: one line, `start_ns ms`, per late wake-up, until killed."""
    while True:
        start = time.time_ns()
        time.sleep(TICK_S)
        late_ms = (time.time_ns() - start) / 1e6 - TICK_S * 1000
        if late_ms > STALL_MS:
            print(start, f"{late_ms:.1f}", flush=True)


if __name__ == "__main__":
    watch()

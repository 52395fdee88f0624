"""Fan-out of the pool's events to watch streams, on the export service's event loop.

A watch stream is a coroutine, not a thread, so an encoder serves many PDs and
routers with a fixed number of threads. The exporter's thread hands each event
over once (`publish`: one hop onto the loop), and the loop appends it to every
watcher's backlog.

A watcher is judged by its lag, not by how much waits for it: it acknowledges
what it has taken, and one whose oldest unacknowledged event is STALL_S old is
cut off, its claims taken back at once, so a PD that stopped reading cannot pin
the pool. (gRPC would buffer megabytes for a watcher that stopped: its flow
control says nothing in time.) A watcher that keeps up is never cut off by a
burst; while it is behind, ENCODING events, which are hints, are dropped for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import time
from collections import deque
from dataclasses import dataclass, field

from ec_nixl.config import DEFAULT_MAX_WATCHERS
from ec_nixl.control.messages import EventKind
from ec_nixl.metrics import Stats
from ec_nixl.producer.pool import PoolEvent

logger = logging.getLogger(__name__)

# How long an event may go unacknowledged before its watcher is cut off. Not less: on a
# busy 2-core host a healthy PD's scheduler process went 2 s without running (while its
# ranks busy-polled both cores), and was cut off (its claims taken back mid-pull).
STALL_S = 5.0
BEHIND_S = 1.0  # ... and that has hints dropped for it (acks come every 0.5 s)
SWEEP_S = 0.25  # how often lags are looked at


@dataclass(eq=False)
class Watcher:
    """One watch stream: what waits to be sent to it, and what it has not acknowledged."""

    consumer: str
    claim: bool
    readers: int
    since: int  # the first event id published after it subscribed
    watch_id: int = field(default_factory=lambda: secrets.randbits(63) | 1)
    seq: int = 0  # of the last event sent
    backlog: deque[tuple[PoolEvent, float]] = field(default_factory=deque)  # and when queued
    unacked: deque[tuple[int, float]] = field(default_factory=deque)  # (seq, when sent)
    claims: deque[tuple[int, float]] = field(default_factory=deque)  # (lease id, expires at)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    cut: asyncio.Event = field(default_factory=asyncio.Event)

    def lag(self, now: float) -> float:
        """How long the oldest event it has not acknowledged has waited since it was sent
        (or, if it is not sent yet, since it was queued: a stream that gRPC no longer
        takes from lags too)."""
        oldest = self.unacked or self.backlog
        return now - oldest[0][1] if oldest else 0.0

    async def next(self) -> PoolEvent:
        while not self.backlog:
            self.wake.clear()
            await self.wake.wait()
        return self.backlog.popleft()[0]

    def sent(self) -> int:
        self.seq += 1
        self.unacked.append((self.seq, time.monotonic()))
        return self.seq

    def acknowledge(self, seq: int) -> None:
        while self.unacked and self.unacked[0][0] <= seq:
            self.unacked.popleft()

    def claimed(self, lease_id: int, expires_at: float) -> None:
        """Keep the claims it was given while they may be live (to take back if cut off)."""
        while self.claims and self.claims[0][1] <= time.monotonic():
            self.claims.popleft()
        self.claims.append((lease_id, expires_at))


class EventHub:
    """Watchers of one exporter. `publish` may be called from any thread; everything
    else runs on `loop`."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        stats: Stats,
        max_watchers: int = DEFAULT_MAX_WATCHERS,
    ) -> None:
        self.max_watchers = max_watchers
        self._loop = loop
        self._stats = stats
        self._ids = itertools.count()  # next() is atomic: publishers need no lock
        self._watchers: dict[int, Watcher] = {}  # by watch id

    def __len__(self) -> int:
        return len(self._watchers)

    def publish(self, event: PoolEvent) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: the service has stopped
            self._loop.call_soon_threadsafe(self._deliver, next(self._ids), event, time.monotonic())

    def subscribe(self, consumer: str, claim: bool, readers: int) -> Watcher | None:
        """A new watcher, or None at `max_watchers`. Called together with the pool's
        snapshot (under its lock): every later event reaches the watcher, no earlier one."""
        if len(self._watchers) >= self.max_watchers:
            return None
        watcher = Watcher(consumer, claim, readers, since=next(self._ids))
        self._watchers[watcher.watch_id] = watcher
        self._stats.set("watchers", len(self._watchers))
        return watcher

    def unsubscribe(self, watcher: Watcher) -> None:
        self._watchers.pop(watcher.watch_id, None)
        self._stats.set("watchers", len(self._watchers))

    def acknowledge(self, watch_id: int, seq: int) -> bool:
        watcher = self._watchers.get(watch_id)
        if watcher is None:
            return False
        watcher.acknowledge(seq)
        return True

    def lagging(self, now: float) -> list[Watcher]:
        """Watchers to cut off: their oldest unacknowledged event is STALL_S old."""
        return [w for w in self._watchers.values() if w.lag(now) >= STALL_S]

    def _deliver(self, event_id: int, event: PoolEvent, queued_at: float) -> None:
        for watcher in self._watchers.values():
            if event_id < watcher.since or watcher.cut.is_set():
                continue
            if event.kind is EventKind.ENCODING and watcher.lag(queued_at) >= BEHIND_S:
                self._stats.count("hints_dropped")
                continue
            watcher.backlog.append((event, queued_at))
            watcher.wake.set()

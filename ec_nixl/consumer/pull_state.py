"""One pull of PD's scheduler and the states it goes through: a table of transitions,
kept apart from the item table that drives them so that it reads (and is tested) alone.

What a transition orders the workers to do follows from the table: entering RUNNING
sends every rank its READ; READY to LOADED lends each rank's copy to vLLM's encoder
cache; leaving RUNNING or READY for FAILED or DROPPED has the ranks drop their copies
(once the READs are over), so a pull's copies are dropped exactly once, by its id."""

from __future__ import annotations

import itertools
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import Enum

from ec_nixl.errors import ECNixlError

# Pull ids, unique in this process: what a worker keeps a pull's copy under.
_pull_ids = itertools.count(1)


class PullState(Enum):
    """Where a pull is. It moves only along TRANSITIONS (`PullJob.move`), under the
    table's lock; LOADED and DROPPED end it."""

    AWAITING = "awaiting"  # no encoder has announced the item yet
    RUNNING = "running"  # leasing, and reading on every worker
    READY = "ready"  # held by every worker, waiting to be loaded
    FAILED = "failed"  # not coming: the requests relying on it fall back
    LOADED = "loaded"  # lent to vLLM's encoder cache: the job's work is done
    DROPPED = "dropped"  # no request relies on it any more: the workers free its copies


TRANSITIONS: dict[PullState, frozenset[PullState]] = {
    PullState.AWAITING: frozenset({PullState.RUNNING, PullState.FAILED, PullState.DROPPED}),
    PullState.RUNNING: frozenset({PullState.READY, PullState.FAILED, PullState.DROPPED}),
    PullState.READY: frozenset({PullState.LOADED, PullState.FAILED, PullState.DROPPED}),
    PullState.FAILED: frozenset({PullState.DROPPED}),
    PullState.LOADED: frozenset(),
    PullState.DROPPED: frozenset(),
}
# A request relying on a pull in these waits for it.
WAITING = frozenset({PullState.AWAITING, PullState.RUNNING})
# The workers may hold copies of a pull in these; ending it from them drops the copies.
HOLDING = frozenset({PullState.RUNNING, PullState.READY})


@dataclass
class PullJob:
    mm_hash: str
    encoder_id: str | None  # None: waiting for an encoder to announce the item
    num_embeds: int  # the rows the model expects (0: a prefetch, no request yet)
    pull_id: int = field(default_factory=lambda: next(_pull_ids))
    started_at: float = field(default_factory=time.monotonic)
    # When a request first asked for the item: a prefetch is asked for later, or never.
    asked_at: float | None = None
    # The requests that rely on the pulled item: the job ends (its copies dropped)
    # once none does, unless vLLM's encoder cache took it first.
    users: set[str] = field(default_factory=set)
    expected: bool = False  # asked for before any encoder announced it
    state: PullState = PullState.AWAITING
    future: Future | None = None  # the pull's run on the pool, once submitted
    error: ECNixlError | None = None
    rows: int = 0  # what was pulled
    ready_at: float | None = None
    nbytes: int = 0  # a prefetch's size, from its announcement

    def move(self, new: PullState) -> bool:
        """Take the transition to `new` if the table allows it from here. An event that
        comes too late for the job (a READ ending after the job was dropped) finds no
        transition and changes nothing: False."""
        if new not in TRANSITIONS[self.state]:
            return False
        self.state = new
        return True

    @property
    def awaiting(self) -> bool:
        return self.state is PullState.AWAITING

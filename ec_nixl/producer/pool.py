"""The export pool: a cache of encoder outputs in a registered arena for consumers to pull.

An exported item stays in its arena slot after it was read, so a second PD (or
the same PD after vLLM evicted it) can still pull it; it leaves only when the
arena needs its room for a newer export, and never while leased: items read by
all their readers first, then the least recently used. A lease is a promise
that the bytes stay put until it ends: it covers `readers` READs (one per
tensor-parallel rank of one consumer) and ends when each of them has reported
completion (`finish_reads`, from the READ's notification), when the consumer
gives it up (`release`) or when it expires.
Expiry protects the exporter from consumers that died; the consumer detects an
expired lease on its side and throws the bytes away (see `Puller`).

A lease only keeps an item in place; what proves a READ good is the item's
guard: a random value in the 8 bytes after the item's own, set once the bytes
are in place and cleared before its room is given to anything else. A consumer
READs the guard after the bytes. So an item may leave while a claim on it is
unread (`revoke`, and a full arena, take claims back): a READ that raced it
fails its guard check, and never returns another item's bytes.
"""

from __future__ import annotations

import ctypes
import heapq
import secrets
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from ec_nixl.arena import Arena, Slot
from ec_nixl.config import DEFAULT_LEASE_S
from ec_nixl.control.messages import EventKind
from ec_nixl.errors import NotFoundError, PoolFullError
from ec_nixl.region import GUARD_BYTES

T = TypeVar("T")

# Bounds on lease bookkeeping (a lease costs memory here and pins its item; a token
# holder could otherwise grow it without end, naming itself anew with each call).
# Live leases one consumer may hold: a PD needs one per item in flight per request; a
# caller asking for more is flooding.
MAX_LEASES_PER_CONSUMER = 4096
# Consumers holding live leases at once: each PD leases under one name (its scheduler's),
# and so does the proxy's watcher; more than this many on one encoder is a flood.
MAX_CONSUMERS = 64
# Live leases over all consumers: four consumers at their own bound (under 5 MiB of
# bookkeeping here).
MAX_LIVE_LEASES = 4 * MAX_LEASES_PER_CONSUMER


@dataclass(frozen=True)
class PoolEvent:
    kind: EventKind
    mm_hash: str
    length: int
    target: str = ""  # EXPORTED for this consumer: its watcher gets a claim with it
    again: bool = False  # EXPORTED: an item already held, announced again for `target`
    published_unix_ns: int = field(default_factory=time.time_ns, compare=False)


@dataclass
class ExportedItem:
    mm_hash: str
    slot: Slot
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    guard: int = field(default_factory=lambda: secrets.randbits(63) | 1)
    leases: set[int] = field(default_factory=set)

    @property
    def guard_offset(self) -> int:
        return self.slot.offset + _guard_offset(self.nbytes)


@dataclass
class Lease:
    lease_id: int
    item: ExportedItem
    expires_at: float
    readers: int  # READs still to report before the lease ends by itself
    consumer: str = ""  # who asked for it, as it named itself
    claim: bool = False  # sent with an announcement, unasked: it may be taken back


class ExportPool:
    """Items by mm_hash over an arena, with reader-counted leases, expiry and LRU eviction."""

    def __init__(
        self,
        arena: Arena,
        *,
        lease_s: float = DEFAULT_LEASE_S,
        on_event: Callable[[PoolEvent], None] | None = None,
        on_lease_end: Callable[[Lease, str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.arena = arena
        self.lease_s = lease_s
        self._on_event = on_event or (lambda event: None)
        # with how it ended: "read" (by its last reader), "released" or "expired"
        self._on_lease_end = on_lease_end or (lambda lease, how: None)
        self._clock = clock
        self._lock = threading.Lock()
        self._items: OrderedDict[str, ExportedItem] = OrderedDict()  # LRU first
        self._leases: dict[int, Lease] = {}
        # (expires_at, lease_id), earliest first
        self._expiries: list[tuple[float, int]] = []
        self._held_by: Counter[str] = Counter()  # consumer -> its live leases

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, mm_hash: str) -> bool:
        return mm_hash in self._items

    @property
    def live_leases(self) -> int:
        return len(self._leases)

    def export(self, mm_hash: str, tensor: torch.Tensor, target: str = "") -> ExportedItem:
        """Copy `tensor` into a slot and publish it under `mm_hash`, for `target` (a
        consumer id) if given, once the copy is complete.

        Exporting a hash already held keeps the held bytes (a consumer may be
        reading them, and equal hashes mean equal content); with a target it is
        announced again, for that consumer.
        """
        if (held := self._announce_held(mm_hash, target)) is not None:
            return held
        nbytes = tensor.numel() * tensor.element_size()
        with self._lock:
            slot = self._allocate_locked(mm_hash, _guard_offset(nbytes) + GUARD_BYTES)
        item = ExportedItem(mm_hash, slot, tensor.dtype, tuple(tensor.shape), nbytes)
        try:  # outside the lock: on a GPU this waits for the kernels that made `tensor`
            _copy_completely(
                self.arena.view(slot, tensor.dtype, item.shape),
                tensor,
                self._guard(item),
                item.guard,
            )
        except BaseException:
            self.arena.free(slot)
            raise
        with self._lock:
            if (held := self._items.get(mm_hash)) is not None:  # exported meanwhile
                self.arena.free(slot)
                return held
            self._items[mm_hash] = item
            self._on_event(PoolEvent(EventKind.EXPORTED, mm_hash, nbytes, target))
            return item

    def _announce_held(self, mm_hash: str, target: str) -> ExportedItem | None:
        with self._lock:
            self._expire_locked(self._clock())
            held = self._items.get(mm_hash)
            if held is not None:
                self._items.move_to_end(mm_hash)
                if target:
                    again = PoolEvent(EventKind.EXPORTED, mm_hash, held.nbytes, target, again=True)
                    self._on_event(again)
            return held

    def lease(
        self,
        mm_hashes: Iterable[str],
        lease_s: float | None = None,
        readers: int = 1,
        consumer: str = "",
        claim: bool = False,
    ) -> list[Lease]:
        """Lease every item for `readers` READs by `consumer`, or none: raises
        NotFoundError naming the missing hashes, PoolFullError past a bound on leases
        (the consumer's, all consumers', or the number of consumers holding any).
        A `claim` (a lease nobody asked for yet) may be taken back for room."""
        mm_hashes = list(mm_hashes)
        with self._lock:
            now = self._clock()
            self._expire_locked(now)
            missing = tuple(h for h in mm_hashes if h not in self._items)
            if missing:
                raise NotFoundError(f"not exported here: {', '.join(missing)}", missing)
            self._check_bounds_locked(consumer, len(mm_hashes))
            expires_at = now + (lease_s or self.lease_s)
            leases = []
            for mm_hash in mm_hashes:
                item = self._items[mm_hash]
                self._items.move_to_end(mm_hash)
                lease = Lease(self._new_lease_id(), item, expires_at, readers, consumer, claim)
                item.leases.add(lease.lease_id)
                self._leases[lease.lease_id] = lease
                heapq.heappush(self._expiries, (expires_at, lease.lease_id))
                leases.append(lease)
            self._held_by[consumer] += len(leases)
            return leases

    def release(self, lease_ids: Iterable[int]) -> int:
        """End leases the consumer gives up; returns how many were live. Unknown ids are
        ignored."""
        with self._lock:
            released = sum(self._end_lease_locked(i, "released") for i in lease_ids)
            self._expire_locked(self._clock())
            return released

    def revoke(self, lease_ids: Iterable[int]) -> int:
        """Take back claims whose consumer stopped following: their items may leave
        (a READ that comes anyway fails its guard check). Returns how many were live."""
        with self._lock:
            return sum(self._end_lease_locked(i, "revoked") for i in lease_ids)

    def finish_reads(self, lease_ids: Iterable[int]) -> None:
        """One READ under each lease completed; a lease ends with its last reader."""
        with self._lock:
            for lease_id in lease_ids:
                lease = self._leases.get(lease_id)
                if lease is not None:
                    lease.readers -= 1
                    if lease.readers <= 0:
                        self._end_lease_locked(lease_id, "read")
                        self._read_locked(lease.item)

    def expire(self) -> None:
        """End expired leases; the exporter calls this periodically."""
        with self._lock:
            self._expire_locked(self._clock())

    def snapshot(self, then: Callable[[], T]) -> tuple[list[PoolEvent], T]:
        """An EXPORTED event for every item held now, and `then()` called at the same
        moment: a watcher that subscribes there sees each later export once, live, and
        each earlier one once, in the snapshot."""
        with self._lock:
            held = [
                PoolEvent(EventKind.EXPORTED, i.mm_hash, i.nbytes) for i in self._items.values()
            ]
            return held, then()

    def remaining_s(self, lease: Lease) -> float:
        return max(0.0, lease.expires_at - self._clock())

    def _check_bounds_locked(self, consumer: str, more: int) -> None:
        name = consumer[:64]
        if consumer not in self._held_by and len(self._held_by) >= MAX_CONSUMERS:
            raise PoolFullError(
                f"{len(self._held_by)} consumers hold leases here, at most {MAX_CONSUMERS}: "
                f"consumer {name!r} gets one once a consumer's leases have all ended"
            )
        if self._held_by[consumer] + more > MAX_LEASES_PER_CONSUMER:
            raise PoolFullError(
                f"consumer {name!r} holds {self._held_by[consumer]} leases and asks for "
                f"{more} more; at most {MAX_LEASES_PER_CONSUMER}"
            )
        if len(self._leases) + more > MAX_LIVE_LEASES:
            raise PoolFullError(
                f"{len(self._leases)} leases are live here and consumer {name!r} asks for "
                f"{more} more; at most {MAX_LIVE_LEASES} over all consumers"
            )

    def _new_lease_id(self) -> int:
        """Random, so nobody can release (by RPC or READ notification) a lease not theirs."""
        while (lease_id := secrets.randbits(63)) in self._leases or not lease_id:
            pass
        return lease_id

    def _allocate_locked(self, mm_hash: str, nbytes: int) -> Slot:
        """Room for a new export: items nobody holds leave first (least recently used
        first), then items held by claims alone (their claims are taken back), never
        an item a consumer asked for."""
        while (slot := self.arena.allocate(nbytes)) is None:
            victim = next((i for i in self._items.values() if not i.leases), None)
            if victim is None:
                victim = next((i for i in self._items.values() if self._claimed_only(i)), None)
            if victim is None and not self._items:
                raise PoolFullError(
                    f"cannot export {mm_hash}: {nbytes} bytes with its guard, more than the "
                    f"arena's {self.arena.capacity}"
                )
            if victim is None:
                raise PoolFullError(
                    f"cannot export {mm_hash} ({nbytes} bytes): the arena holds "
                    f"{self.arena.bytes_used} of {self.arena.capacity} bytes, all leased"
                )
            for lease_id in list(victim.leases):
                self._end_lease_locked(lease_id, "revoked")
            del self._items[victim.mm_hash]
            self._guard(victim).zero_()  # before anything else can be written there
            self.arena.free(victim.slot)
            self._on_event(PoolEvent(EventKind.EVICTED, victim.mm_hash, victim.nbytes))
        return slot

    def _claimed_only(self, item: ExportedItem) -> bool:
        return all(self._leases[lease_id].claim for lease_id in item.leases)

    def _guard(self, item: ExportedItem) -> torch.Tensor:
        start = item.guard_offset
        return self.arena.buffer[start : start + GUARD_BYTES].view(torch.int64)

    def _end_lease_locked(self, lease_id: int, how: str) -> bool:
        """The item stays cached: only the room it needs for a newer export evicts it."""
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return False
        lease.item.leases.discard(lease_id)
        self._held_by[lease.consumer] -= 1
        if not self._held_by[lease.consumer]:
            del self._held_by[lease.consumer]
        self._on_lease_end(lease, how)
        return True

    def _read_locked(self, item: ExportedItem) -> None:
        """Read by all it was leased to: first in line for eviction, ahead of exports
        nobody has read yet (those are likelier to be wanted soon)."""
        if self._items.get(item.mm_hash) is item and not item.leases:
            self._items.move_to_end(item.mm_hash, last=False)

    def _expire_locked(self, now: float) -> None:
        """End leases due by `now`, looking at those alone (not every live lease)."""
        while self._expiries and self._expiries[0][0] <= now:
            _, lease_id = heapq.heappop(self._expiries)
            lease = self._leases.get(lease_id)
            if lease is not None:  # else ended before its time
                self._end_lease_locked(lease_id, "expired")


def _guard_offset(nbytes: int) -> int:
    return nbytes + -nbytes % GUARD_BYTES


def _copy_completely(
    destination: torch.Tensor, source: torch.Tensor, guard: torch.Tensor, value: int
) -> None:
    """Copy, then set the guard, and return once both are in place. On a GPU `copy_`
    only queues the copy on the current stream, and a remote READ is not ordered with
    that stream: announcing before the copy completed would let a consumer read stale
    bytes.

    Between CPU tensors of one layout the copy is one memmove on this thread: torch's
    `copy_` spreads it over its OpenMP threads, which then spin waiting for more work
    (most of the encoder's CPU per export, whatever the copy's size)."""
    if (
        destination.device.type == source.device.type == "cpu"
        and destination.dtype == source.dtype
        and destination.shape == source.shape
        and destination.is_contiguous()
        and source.is_contiguous()
    ):
        ctypes.memmove(destination.data_ptr(), source.data_ptr(), source.nbytes)
    else:
        destination.copy_(source)
    guard.fill_(value)  # after the bytes: a reader that sees it sees them
    if destination.is_cuda:
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(destination.device))
        done.synchronize()

"""The reading side: bring resolved items into a local registered arena with NIXL.

A puller owns a NIXL agent and a receive arena; it learns peers from the
resolutions it is given (the agent metadata came with the handshake) and
READs all items of a resolution in one transfer, then their guards in a second
(an item whose guard changed left the exporter's memory while it was read: its
bytes are discarded). The guards' READ carries the notification that releases
the leases, so a successful pull costs no extra gRPC round trip. After any
failure the slots are freed: a cut READ leaves garbage. A READ
that failed or outlived its deadline may still be in flight (over RDMA the NIC
would go on writing), so the peer is disconnected before its slots are freed;
other READs from that peer may be running, and are left to end first: the
peer goes, and those slots are freed, when no READ uses it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, replace

import torch

from ec_nixl.arena import Arena, Slot
from ec_nixl.consumer.metadata_probe import probe
from ec_nixl.consumer.resolver import Resolution
from ec_nixl.control.messages import PeerInfo, read_notification
from ec_nixl.errors import (
    DeadlineExceededError,
    ECNixlError,
    PeerDeadError,
    PoolFullError,
    StaleDataError,
)
from ec_nixl.nixl_agent import TransferAgent
from ec_nixl.region import GUARD_BYTES, tensor_region

logger = logging.getLogger(__name__)

# What a meeting READs of the exporter's memory (and throws away) to wire UCX up.
WIRE_UP_BYTES = 64


@dataclass(frozen=True)
class PulledItem:
    """An item now in local memory: `tensor` is a view of `slot` until freed."""

    mm_hash: str
    tensor: torch.Tensor
    slot: Slot


class Puller:
    def __init__(self, arena: Arena) -> None:
        self.arena = arena
        self.agent = TransferAgent("puller")
        self.agent.register(arena.buffer)
        # where meeting an exporter READs to wire UCX up (`_connect`)
        self._scratch_tensor = torch.empty(
            WIRE_UP_BYTES, dtype=torch.uint8, device=arena.buffer.device
        )  # held for as long as it is registered
        self._scratch = self.agent.register(self._scratch_tensor)
        self._lock = threading.Lock()
        self._agent_at: dict[str, str] = {}  # exporter address -> its current agent name
        self._reading: Counter[str] = Counter()  # agent name -> READs in flight from it
        # agent name -> slots of its failed READs: the peer goes, and the slots are freed,
        # when no READ uses it
        self._retiring: dict[str, list[Slot]] = {}

    def read(self, resolution: Resolution, deadline: float) -> list[PulledItem]:
        """READ resolved items into fresh local slots, in order, or raise a typed error."""
        if time.monotonic() >= resolution.valid_until:
            raise StaleDataError(
                f"leases at {resolution.address} ended before the READ began; not reading"
            )
        peer = self.meet(resolution.address, resolution.peer, deadline)
        with self._lock:
            self._reading[peer] += 1
        items = resolution.items
        slots: list[Slot] = []
        try:
            for item in items:
                slots.append(self._allocate(item.region.length, item.mm_hash))
            pulled = [
                PulledItem(item.mm_hash, self.arena.view(slot, item.dtype, item.shape), slot)
                for item, slot in zip(items, slots, strict=True)
            ]
            slots.append(guard_slot := self._allocate(GUARD_BYTES * len(items), "the guards"))
            guards = self.arena.view(guard_slot, torch.int64, (len(items),))
            read_until = min(deadline, resolution.valid_until)
            self.agent.read(
                peer,
                [item.region for item in items],
                [tensor_region(p.tensor) for p in pulled],
                deadline=read_until,
            )
            self.agent.read(  # after the bytes, never with them: see the pool's guards
                peer,
                [item.guard_region for item in items],
                [tensor_region(guards[i : i + 1]) for i in range(len(items))],
                deadline=read_until,
                notification=read_notification(resolution.lease_ids),
            )
            guarded = zip(items, guards.tolist(), strict=True)
            if moved := [item.mm_hash for item, guard in guarded if guard != item.guard]:
                raise StaleDataError(
                    f"{', '.join(moved)} left {resolution.address}'s memory during the READ; "
                    "data discarded"
                )
            if time.monotonic() > resolution.valid_until:
                raise StaleDataError(
                    f"READ from {resolution.address} outlived its lease; data discarded"
                )
            self.arena.free(slots.pop())
        except BaseException as exc:
            if isinstance(exc, (PeerDeadError, DeadlineExceededError)):
                with self._lock:  # the next pull from that address meets it anew
                    if self._agent_at.get(resolution.address) == peer:
                        del self._agent_at[resolution.address]
                    self._retiring.setdefault(peer, []).extend(slots)
                slots = []
            for slot in slots:
                self.arena.free(slot)
            raise
        finally:
            self._done_reading(peer)
        return pulled

    def _allocate(self, nbytes: int, what: str) -> Slot:
        slot = self.arena.allocate(nbytes)
        if slot is None:
            raise PoolFullError(
                f"no room for {what} ({nbytes} bytes) in the receive arena "
                f"({self.arena.bytes_used} of {self.arena.capacity} used)"
            )
        return slot

    def _done_reading(self, peer: str) -> None:
        with self._lock:
            self._reading[peer] -= 1
            if self._reading[peer] > 0:
                return
            del self._reading[peer]
            slots = self._retiring.pop(peer, None)
            if slots is None:
                return
            self.agent.remove_peer(peer)  # before the slots are freed: nothing writes there now
        for slot in slots:
            self.arena.free(slot)

    def free(self, item: PulledItem) -> None:
        self.arena.free(item.slot)

    def meet(self, address: str, peer: PeerInfo, deadline: float) -> str:
        """Load the exporter's agent metadata once (after a helper process survived
        loading it), and READ a few bytes of its memory (`_connect`); drop an older
        generation of it."""
        if self.agent.has_peer(peer.agent_name):
            return self._load(address, peer)
        probe(peer.agent_metadata, f"exporter {address}", deadline)
        name = self._load(address, peer)
        self._connect(address, name, peer, deadline)
        return name

    def _connect(self, address: str, name: str, peer: PeerInfo, deadline: float) -> None:
        """UCX wires an endpoint up in the first READ over it, and that needs the
        exporter's process to run (answer the wire-up); later READs over cma do not. On
        a loaded host the exporter may not run for seconds while PD's ranks busy-poll
        for a request that waits on its first pull: so wire up when meeting, before
        any request waits, with a READ of a few bytes into a scratch buffer of our own
        (never handed out: a READ that outlives its deadline writes nothing that is
        used). Best effort: on failure the first pull wires up as before."""
        if not peer.regions:
            return
        nbytes = min(peer.regions[0].length, WIRE_UP_BYTES)
        started = time.monotonic()
        try:
            self.agent.read(
                name,
                [replace(peer.regions[0], length=nbytes)],
                [replace(self._scratch, length=nbytes)],
                deadline=deadline,
            )
        except ECNixlError as exc:
            logger.info("wiring up to exporter %s failed: %s", address, exc)
            return
        logger.info("wired up to exporter %s (%.1f ms)", address,
                    (time.monotonic() - started) * 1e3)  # fmt: skip

    def _load(self, address: str, peer: PeerInfo) -> str:
        with self._lock:
            previous = self._agent_at.get(address)
            if previous is not None and previous != peer.agent_name:
                if self._reading[previous]:
                    self._retiring.setdefault(previous, [])
                else:
                    self.agent.remove_peer(previous)
            if not self.agent.has_peer(peer.agent_name):
                self.agent.add_peer(peer.agent_metadata)
            self._agent_at[address] = peer.agent_name
        return peer.agent_name

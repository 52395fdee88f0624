"""The reading side: bring resolved items into a local registered arena with NIXL.

A puller owns a NIXL agent and a receive arena; it learns peers from the
resolutions it is given (the agent metadata came with the handshake) and
READs all items of a resolution in one transfer. The READ's completion
notification releases the leases, so a successful pull costs no extra round
trip. After any failure the slots are freed: a cut READ leaves garbage. A READ
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
from dataclasses import dataclass

import torch

from ec_nixl.arena import Arena, Slot
from ec_nixl.consumer.metadata_probe import probe
from ec_nixl.consumer.resolver import Resolution
from ec_nixl.control.messages import PeerInfo, read_notification
from ec_nixl.errors import DeadlineExceededError, PeerDeadError, PoolFullError, StaleDataError
from ec_nixl.nixl_agent import TransferAgent
from ec_nixl.region import tensor_region

logger = logging.getLogger(__name__)


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
        slots: list[Slot] = []
        try:
            for item in resolution.items:
                slot = self.arena.allocate(item.region.length)
                if slot is None:
                    raise PoolFullError(
                        f"no room for {item.mm_hash} ({item.region.length} bytes) in the "
                        f"receive arena ({self.arena.bytes_used} of {self.arena.capacity} used)"
                    )
                slots.append(slot)
            pulled = [
                PulledItem(item.mm_hash, self.arena.view(slot, item.dtype, item.shape), slot)
                for item, slot in zip(resolution.items, slots, strict=True)
            ]
            self.agent.read(
                peer,
                [item.region for item in resolution.items],
                [tensor_region(p.tensor) for p in pulled],
                deadline=min(deadline, resolution.valid_until),
                notification=read_notification(resolution.lease_ids),
            )
            if time.monotonic() > resolution.valid_until:
                raise StaleDataError(
                    f"READ from {resolution.address} outlived its lease; data discarded"
                )
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
        loading it); drop an older generation of it."""
        if not self.agent.has_peer(peer.agent_name):
            probe(peer.agent_metadata, f"exporter {address}", deadline)
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

"""The consumer side: pull exported items from exporters into a local registered arena.

One pull is: handshake with the exporter once (cached), resolve the mm_hashes
(leases them), check every descriptor against what the handshake advertised,
READ them all in one NIXL transfer, and release the leases through the READ's
completion notification. A lease is valid for `lease_remaining` from the
moment we asked; a READ finishing later may have read reused memory, so its
bytes are thrown away (StaleDataError) rather than trusted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ec_nixl.arena import Arena, Slot
from ec_nixl.control.client import ExportClient
from ec_nixl.control.messages import PeerInfo, RemoteItem
from ec_nixl.control.security import Security
from ec_nixl.errors import (
    DeadlineExceededError,
    ECNixlError,
    PeerDeadError,
    PoolFullError,
    RefusedError,
    StaleDataError,
)
from ec_nixl.exporter import release_notification
from ec_nixl.transfer import TransferAgent, tensor_region

logger = logging.getLogger(__name__)

DEFAULT_PULL_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class PulledItem:
    """An item now in local memory: `tensor` is a view of `slot` until freed."""

    mm_hash: str
    tensor: torch.Tensor
    slot: Slot


@dataclass
class Resolution:
    """Leased, checked descriptors of one exporter, waiting to be read."""

    address: str
    peer: PeerInfo
    items: list[RemoteItem]
    valid_until: float  # local monotonic time: the leases may end after it

    @property
    def lease_ids(self) -> list[int]:
        return [item.lease_id for item in self.items]


class Puller:
    def __init__(
        self,
        arena: Arena,
        *,
        consumer_id: str,
        compatibility_hash: str = "",
        security: Security = Security(),
    ) -> None:
        self.arena = arena
        self.consumer_id = consumer_id
        self.compatibility_hash = compatibility_hash
        self.security = security
        self.agent = TransferAgent("puller")
        self.agent.register(arena.buffer)
        self._lock = threading.Lock()
        self._clients: dict[str, ExportClient] = {}
        self._peers: dict[str, PeerInfo] = {}

    def pull(
        self, address: str, mm_hashes: Sequence[str], timeout_s: float = DEFAULT_PULL_TIMEOUT_S
    ) -> list[PulledItem]:
        """Bring the items to local memory, in the order asked, or raise a typed error."""
        deadline = time.monotonic() + timeout_s
        return self.read(self.resolve(address, mm_hashes, deadline), deadline)

    def resolve(self, address: str, mm_hashes: Sequence[str], deadline: float) -> Resolution:
        """Lease the items at `address` and check their descriptors; no data moves yet."""
        asked_at = time.monotonic()
        client = self._client(address)
        peer = self._peer(address, client)
        items = client.resolve(mm_hashes, self.consumer_id, timeout_s=deadline - asked_at)
        resolution = Resolution(
            address, peer, items, asked_at + min(i.lease_remaining_s for i in items)
        )
        try:
            if any(i.epoch != peer.epoch or i.agent_name != peer.agent_name for i in items):
                resolution.peer = self._peer(address, client, refresh=True)
            for item in items:
                self._check(item, resolution.peer)
        except BaseException as exc:
            self._abandon(resolution, exc)
            raise
        return resolution

    def read(self, resolution: Resolution, deadline: float) -> list[PulledItem]:
        """READ resolved items into fresh local slots; the READ's notification releases leases."""
        items = resolution.items
        slots: list[Slot] = []
        try:
            for item in items:
                slot = self.arena.allocate(item.region.length)
                if slot is None:
                    raise PoolFullError(
                        f"no room for {item.mm_hash} ({item.region.length} bytes) in the "
                        f"receive arena ({self.arena.bytes_used} of {self.arena.capacity} used)"
                    )
                slots.append(slot)
            pulled = [
                PulledItem(item.mm_hash, self.arena.view(slot, item.dtype, item.shape), slot)
                for item, slot in zip(items, slots, strict=True)
            ]
            self.agent.read(
                resolution.peer.agent_name,
                [item.region for item in items],
                [tensor_region(p.tensor) for p in pulled],
                deadline=min(deadline, resolution.valid_until),
                notification=release_notification(resolution.lease_ids),
            )
            if time.monotonic() > resolution.valid_until:
                raise StaleDataError(
                    f"READ from {resolution.address} outlived its lease; data discarded"
                )
        except BaseException as exc:
            for slot in slots:
                self.arena.free(slot)
            self._abandon(resolution, exc)
            raise
        return pulled

    def free(self, item: PulledItem) -> None:
        self.arena.free(item.slot)

    def close(self) -> None:
        with self._lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()

    def _check(self, item: RemoteItem, peer: PeerInfo) -> None:
        if item.agent_name != peer.agent_name or item.epoch != peer.epoch:
            raise RefusedError(f"{item.mm_hash}: descriptor from another exporter generation")
        if not any(region.contains(item.region) for region in peer.regions):
            raise RefusedError(
                f"{item.mm_hash}: descriptor {item.region} lies outside the exporter's memory"
            )

    def _client(self, address: str) -> ExportClient:
        with self._lock:
            client = self._clients.get(address)
            if client is None:
                client = self._clients[address] = ExportClient(address, self.security)
            return client

    def _peer(self, address: str, client: ExportClient, refresh: bool = False) -> PeerInfo:
        with self._lock:
            peer = self._peers.get(address)
        if peer is not None and not refresh:
            return peer
        fresh = client.handshake(self.compatibility_hash, self.consumer_id)
        with self._lock:
            if peer is not None and peer.agent_name != fresh.agent_name:
                self.agent.remove_peer(peer.agent_name)
            if not self.agent.has_peer(fresh.agent_name):
                self.agent.add_peer(fresh.agent_metadata)
            self._peers[address] = fresh
        logger.info("exporter %s is agent %s (epoch %x)", address, fresh.agent_name, fresh.epoch)
        return fresh

    def _abandon(self, resolution: Resolution, exc: BaseException) -> None:
        """After a failed pull: forget a dead peer, give a live one its leases back now.

        A stalled peer would only stall us again: its leases expire on their own.
        """
        if isinstance(exc, DeadlineExceededError):
            return
        if isinstance(exc, PeerDeadError):
            with self._lock:
                peer = self._peers.pop(resolution.address, None)
                if peer is not None:
                    self.agent.remove_peer(peer.agent_name)
            return
        try:
            self._client(resolution.address).release(resolution.lease_ids, timeout_s=1.0)
        except ECNixlError as release_exc:
            logger.warning("could not release leases at %s: %s", resolution.address, release_exc)

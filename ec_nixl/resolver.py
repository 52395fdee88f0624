"""Where are the items? Handshakes, leases and descriptor checks; no data moves here.

A resolver talks to exporters over gRPC only, so it can live where no NIXL
agent does (the PD scheduler) and hand its `Resolution`s to the processes that
READ (the PD workers). A lease is valid for `lease_remaining` from the moment
we asked, which is where `valid_until` comes from: a READ that finishes later
may have read memory the exporter reused.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from ec_nixl.control.client import ExportClient
from ec_nixl.control.messages import PeerInfo, RemoteItem
from ec_nixl.control.security import Security
from ec_nixl.errors import DeadlineExceededError, ECNixlError, PeerDeadError, RefusedError

logger = logging.getLogger(__name__)


@dataclass
class Resolution:
    """Leased, checked descriptors of one exporter, waiting to be read."""

    address: str
    peer: PeerInfo
    items: list[RemoteItem]
    valid_until: float  # local monotonic time after which the leases may have ended

    @property
    def lease_ids(self) -> list[int]:
        return [item.lease_id for item in self.items]


class Resolver:
    def __init__(
        self,
        *,
        consumer_id: str,
        compatibility_hash: str = "",
        security: Security = Security(),
    ) -> None:
        self.consumer_id = consumer_id
        self.compatibility_hash = compatibility_hash
        self.security = security
        self._lock = threading.Lock()
        self._clients: dict[str, ExportClient] = {}
        self._peers: dict[str, PeerInfo] = {}

    def resolve(self, address: str, mm_hashes: Sequence[str], deadline: float) -> Resolution:
        """Lease the items at `address` and check their descriptors."""
        asked_at = time.monotonic()
        client = self.client(address)
        peer = self.peer(address)
        items = client.resolve(mm_hashes, self.consumer_id, timeout_s=deadline - asked_at)
        resolution = Resolution(
            address, peer, items, asked_at + min(i.lease_remaining_s for i in items)
        )
        try:
            if any(i.epoch != peer.epoch or i.agent_name != peer.agent_name for i in items):
                resolution.peer = self.peer(address, refresh=True)  # the exporter restarted
            for item in items:
                _check(item, resolution.peer)
        except BaseException as exc:
            self.abandon(resolution, exc)
            raise
        return resolution

    def abandon(self, resolution: Resolution, exc: BaseException) -> None:
        """After a failed read: forget a dead peer, give a live one its leases back now.

        A stalled peer would only stall us again: its leases expire on their own.
        """
        if isinstance(exc, DeadlineExceededError):
            return
        if isinstance(exc, PeerDeadError):
            with self._lock:
                self._peers.pop(resolution.address, None)
            return
        try:
            self.client(resolution.address).release(resolution.lease_ids, timeout_s=1.0)
        except ECNixlError as release_exc:
            logger.warning("could not release leases at %s: %s", resolution.address, release_exc)

    def client(self, address: str) -> ExportClient:
        with self._lock:
            client = self._clients.get(address)
            if client is None:
                client = self._clients[address] = ExportClient(address, self.security)
            return client

    def peer(self, address: str, refresh: bool = False) -> PeerInfo:
        """What the exporter at `address` told us in its handshake (cached)."""
        with self._lock:
            peer = self._peers.get(address)
        if peer is None or refresh:
            peer = self.client(address).handshake(self.compatibility_hash, self.consumer_id)
            with self._lock:
                self._peers[address] = peer
            logger.info("exporter %s is agent %s (epoch %x)", address, peer.agent_name, peer.epoch)
        return peer

    def close(self) -> None:
        with self._lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()


def _check(item: RemoteItem, peer: PeerInfo) -> None:
    if item.agent_name != peer.agent_name or item.epoch != peer.epoch:
        raise RefusedError(f"{item.mm_hash}: descriptor from another exporter generation")
    if not any(region.contains(item.region) for region in peer.regions):
        raise RefusedError(
            f"{item.mm_hash}: descriptor {item.region} lies outside the exporter's memory"
        )

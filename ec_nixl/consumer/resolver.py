"""Where are the items? Handshakes, leases and descriptor checks; no data moves here.

A resolver talks to exporters over gRPC only, so it lives where no NIXL agent
does (the PD scheduler) and hands its `Resolution`s to the processes that READ
(the PD workers), which check them again against their own handshake. A lease
is valid for `lease_remaining` from the moment we asked (or, for a claim, from
when its announcement arrived), which is where `valid_until` comes from: a READ
that finishes later may have read memory the exporter reused.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from ec_nixl.control.client import ExportClient, ExportClients
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
        self.clients = ExportClients(consumer_id, security)
        self._lock = threading.Lock()
        self._peers: dict[str, PeerInfo] = {}

    def resolve(
        self, address: str, mm_hashes: Sequence[str], deadline: float, readers: int = 1
    ) -> Resolution:
        """Lease the items at `address` for `readers` READs and check their descriptors."""
        asked_at = time.monotonic()
        items = self.client(address).resolve(
            mm_hashes, self.consumer_id, timeout_s=deadline - asked_at, readers=readers
        )
        answered = [item.mm_hash for item in items]
        if answered != list(mm_hashes):  # a hostile encoder renaming a descriptor, or none
            if items:
                self.release(address, [item.lease_id for item in items])
            raise RefusedError(
                f"exporter {address} answered a resolve of {list(mm_hashes)} "
                f"with descriptors of {answered}"
            )
        return self.checked(address, items, asked_at, deadline)

    def checked(
        self, address: str, items: list[RemoteItem], since: float, deadline: float
    ) -> Resolution:
        """Descriptors leased at `since` (a Resolve, an announcement's claim), checked
        against what the exporter's handshake said (met by `deadline` if need be); on
        refusal the leases go back."""
        valid_until = since + min(i.lease_remaining_s for i in items)
        try:
            peer = self.peer_agreeing(address, items, deadline)
        except BaseException as exc:
            self.abandon(address, [i.lease_id for i in items], exc)
            raise
        return Resolution(address, peer, items, valid_until)

    def peer_agreeing(self, address: str, items: list[RemoteItem], deadline: float) -> PeerInfo:
        """The exporter's handshake (met afresh if it restarted since), once `items` were
        checked against it: RefusedError for descriptors it did not hand out."""
        peer = self.peer(address, deadline=deadline)
        if any(i.epoch != peer.epoch for i in items):  # the exporter restarted
            peer = self.peer(address, refresh=True, deadline=deadline)
        _check_descriptors(items, peer)
        return peer

    def abandon(self, address: str, lease_ids: list[int], exc: BaseException) -> None:
        """After a failed read: forget a dead peer, give a live one its leases back now.

        A stalled peer would only stall us again: its leases expire on their own.
        """
        if isinstance(exc, DeadlineExceededError):
            return
        if isinstance(exc, PeerDeadError):
            self.forget_peer(address)
            return
        self.release(address, lease_ids)

    def release(self, address: str, lease_ids: list[int]) -> None:
        """Give leases back (best effort: they expire anyway)."""
        try:
            self.client(address).release(lease_ids, timeout_s=1.0)
        except ECNixlError as exc:
            logger.warning("could not release leases at %s: %s", address, exc)

    def learn(self, address: str, peer: PeerInfo) -> None:
        """The exporter's handshake as another process met it (a PD rank gets its
        scheduler's with each order): no handshake of our own unless it restarts."""
        with self._lock:
            self._peers[address] = peer

    def forget_peer(self, address: str) -> None:
        """The exporter at `address` died: the next call meets it afresh."""
        with self._lock:
            self._peers.pop(address, None)

    def client(self, address: str) -> ExportClient:
        return self.clients(address)

    def peer(self, address: str, refresh: bool = False, deadline: float | None = None) -> PeerInfo:
        """What the exporter at `address` told us in its handshake (cached); a handshake
        needed now keeps to `deadline`, when the caller has one."""
        with self._lock:
            peer = self._peers.get(address)
        if peer is None or refresh:
            timeout_s = None if deadline is None else max(0.001, deadline - time.monotonic())
            peer = self.client(address).handshake(
                self.compatibility_hash, self.consumer_id, timeout_s
            )
            with self._lock:
                self._peers[address] = peer
            logger.info("exporter %s is agent %s (epoch %x)", address, peer.agent_name, peer.epoch)
        return peer

    def close(self) -> None:
        self.clients.close()


def _check_descriptors(items: Sequence[RemoteItem], peer: PeerInfo) -> None:
    """Refuse, before any READ, a descriptor of another exporter generation or one
    pointing outside the exporter's registered memory."""
    for item in items:
        if item.agent_name != peer.agent_name or item.epoch != peer.epoch:
            raise RefusedError(f"{item.mm_hash}: descriptor from another exporter generation")
        if not any(
            region.contains(item.region) and region.contains(item.guard_region)
            for region in peer.regions
        ):
            raise RefusedError(
                f"{item.mm_hash}: descriptor {item.region} lies outside the exporter's memory"
            )

"""The PD worker's side of a pull: READ on the scheduler's order, hold, hand over.

The scheduler orders every worker at once, over a local socket, to READ items
it has leased (from an encoder's announcement or a Resolve): the worker checks
the descriptors against its own handshake with that encoder and the model's
shape, READs them into its receive arena, then holds them until the scheduler
schedules the request (`take` hands vLLM's encoder cache a view of the slot:
no copy) or drops them. A slot lent to the encoder cache is freed when vLLM
evicts the item from it (`release`, on the scheduler's word: it sees every
eviction). The scheduler owns the lease: on failure it gives it back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ec_nixl.arena import Arena
from ec_nixl.control.messages import RemoteItem
from ec_nixl.control.worker_link import PullOrder, PullReport
from ec_nixl.errors import ECNixlError, PeerDeadError, RefusedError
from ec_nixl.puller import PulledItem, Puller
from ec_nixl.resolver import DEFAULT_PULL_TIMEOUT_S, Resolution, Resolver

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelShape:
    """What an encoder output must look like to enter this model's encoder cache.

    Checked on the descriptors, before any byte is read: an encoder that sends
    another shape or dtype (a misconfigured or hostile peer) would otherwise
    crash the model at its next step.
    """

    dtype: torch.dtype
    width: int  # exactly: the inputs-embeds width, times 1 + its levels for a deepstack model

    @classmethod
    def of(cls, dtype: torch.dtype, embeds_width: int, deepstack_levels: int = 0) -> ModelShape:
        """A deepstack model's encoder stacks `deepstack_levels` more outputs of the same
        width beside each embedding (vLLM's Qwen3-VL); any other width would fail in the
        embedding merge."""
        return cls(dtype, embeds_width * (1 + deepstack_levels))

    def check(self, item: RemoteItem, num_embeds: int) -> None:
        """`num_embeds` 0: not known yet (a prefetch), the scheduler checks the rows."""
        shape = item.shape
        if (
            item.dtype != self.dtype
            or len(shape) != 2
            or shape[0] != (num_embeds or shape[0])
            or shape[1] != self.width
        ):
            raise RefusedError(
                f"{item.mm_hash}: the encoder holds {item.dtype}{list(shape)}, this model "
                f"needs {self.dtype}[{num_embeds or 'rows'}, {self.width}]"
            )


class Receiver:
    """Pulled items held by mm_hash in a registered receive arena."""

    def __init__(
        self,
        arena: Arena,
        resolver: Resolver,
        encoders: dict[str, str],
        model: ModelShape,
    ) -> None:
        self.puller = Puller(arena)
        self.resolver = resolver
        self.encoders = encoders
        self.model = model
        self._lock = threading.Lock()
        self._held: dict[str, PulledItem] = {}
        self._lent: dict[str, PulledItem] = {}  # in vLLM's encoder cache

    def read(self, order: PullOrder) -> PullReport:
        """READ the leased items of a configured encoder, then hold them."""
        start = time.monotonic()
        address = self.encoders.get(order.encoder_id)
        if address is None:
            raise RefusedError(f"encoder {order.encoder_id!r} is not configured")
        if not order.items or len(order.num_embeds) != len(order.items):
            raise RefusedError(f"{len(order.items)} items but {len(order.num_embeds)} shapes")
        for item, rows in zip(order.items, order.num_embeds, strict=True):
            self.model.check(item, rows)
        try:
            peer = self.resolver.peer_agreeing(address, order.items, order.deadline)
            resolution = Resolution(address, peer, order.items, order.valid_until)
            pulled = self.puller.read(resolution, order.deadline)
        except PeerDeadError:
            self.resolver.forget_peer(address)
            raise
        with self._lock:
            for item in pulled:
                if (older := self._held.pop(item.mm_hash, None)) is not None:
                    self.puller.free(older)
                self._held[item.mm_hash] = item
        return PullReport(sum(i.region.length for i in order.items), time.monotonic() - start)

    def take(self, mm_hash: str) -> torch.Tensor | None:
        """The held item for the encoder cache: a view of its slot, lent until `release`."""
        with self._lock:
            item = self._held.pop(mm_hash, None)
            if item is None:
                return None
            replaced = self._lent.pop(mm_hash, None)
            self._lent[mm_hash] = item
        if replaced is not None:  # the encoder cache drops its old tensor for this one
            self.puller.free(replaced)
        return item.tensor

    def release(self, mm_hashes: Iterable[str]) -> None:
        """vLLM evicted these from its encoder cache: free the slots lent to it."""
        with self._lock:
            released = [self._lent.pop(h) for h in mm_hashes if h in self._lent]
        for item in released:
            self.puller.free(item)

    def drop(self, mm_hashes: Iterable[str]) -> None:
        with self._lock:
            dropped = [self._held.pop(h) for h in mm_hashes if h in self._held]
        for item in dropped:
            self.puller.free(item)

    def meet_encoders(self) -> None:
        """Handshake with every configured encoder and connect NIXL to it now, so that
        the first pull does not pay for it; one that is not up yet is met by its first pull."""
        for encoder_id, address in self.encoders.items():
            try:
                deadline = time.monotonic() + DEFAULT_PULL_TIMEOUT_S
                self.puller.meet(address, self.resolver.peer(address, deadline=deadline), deadline)
            except ECNixlError as exc:
                logger.info(
                    "encoder %s not met at start (%s); its first pull will", encoder_id, exc
                )

    @property
    def held(self) -> list[str]:
        with self._lock:
            return list(self._held)

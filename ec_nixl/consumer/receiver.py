"""The PD worker's side of a pull: READ on the scheduler's order, hold, hand over.

The scheduler orders every worker at once, over a local socket, to READ items
it has leased (from an encoder's announcement or a Resolve) and checked against
its handshake with that encoder, which comes with the order: the worker checks
them against the model's shape, READs them into its receive arena (loading the
encoder's agent metadata first, once per generation), then holds them until the
scheduler schedules the request (`take` hands vLLM's encoder cache a view of the slot:
no copy) or drops them. A slot lent to the encoder cache is freed when vLLM
evicts the item from it (`free_evicted`, on the scheduler's word: it sees every
eviction). The scheduler owns the lease: on failure it gives it back.

Each copy is held under its mm_hash and the pull that read it, and every order
that removes one (drop, take, free_evicted) names that pull: two pulls of one item
(a request aborted while its pull ran, the same image asked for again) hold two
copies, and the older pull's drop leaves the newer one's alone. Calls come from
the worker link's threads (read, drop) and from the model runner (take, lend,
free_evicted), under one lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ec_nixl.arena import Arena
from ec_nixl.consumer.puller import PulledItem, Puller
from ec_nixl.consumer.resolver import Resolution, Resolver
from ec_nixl.consumer.worker_link import Load, PullOrder, PullReport
from ec_nixl.control.messages import PeerInfo, RemoteItem
from ec_nixl.errors import ECNixlError, LoadLostError, PeerDeadError, RefusedError

logger = logging.getLogger(__name__)

# Pulls dropped lately, remembered so that a READ that ends after its pull was dropped
# (a rank slower than the scheduler would wait) frees what it read instead of holding it.
DROPPED_MEMORY = 1024


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
    """Pulled items held in a registered receive arena, by mm_hash and pull. Its
    `resolver` knows each encoder's handshake from the orders and leases only to
    read an item again (`lend`)."""

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
        self._held: dict[tuple[str, int], PulledItem] = {}  # by (mm_hash, pull id)
        self._lent: dict[str, tuple[int, PulledItem]] = {}  # in vLLM's encoder cache: pull, copy
        self._dropped: dict[int, None] = {}  # pull ids, oldest first

    def read(self, order: PullOrder) -> PullReport:
        """READ the leased items of a configured encoder, then hold them."""
        start = time.monotonic()
        address = self.encoders.get(order.encoder_id)
        if address is None:
            raise RefusedError(f"encoder {order.encoder_id!r} is not configured")
        if not order.items or len(order.num_embeds) != len(order.items):
            raise RefusedError(f"{len(order.items)} items but {len(order.num_embeds)} shapes")
        if order.pull_id <= 0:
            raise RefusedError(f"an order must name its pull (pull id {order.pull_id})")
        for item, rows in zip(order.items, order.num_embeds, strict=True):
            self.model.check(item, rows)
        self.resolver.learn(address, order.peer)
        try:
            resolution = Resolution(address, order.peer, order.items, order.valid_until)
            pulled = self.puller.read(resolution, order.deadline)
        except PeerDeadError:
            self.resolver.forget_peer(address)
            raise
        keys = [(item.mm_hash, order.pull_id) for item in pulled]
        with self._lock:
            dropped = order.pull_id in self._dropped  # while it read: nobody will load it
            if dropped:
                freed = pulled
            else:  # a key held already (an order naming one item twice): the newest copy stays
                freed = [self._held.pop(key) for key in keys if key in self._held]
                self._held.update(zip(keys, pulled, strict=True))
        for item in freed:
            self.puller.free(item)
        if dropped:
            raise RefusedError(f"pull {order.pull_id} was dropped while it read; freed")
        return PullReport(sum(i.region.length for i in order.items), time.monotonic() - start)

    def take(self, mm_hash: str, pull_id: int) -> torch.Tensor | None:
        """Pull `pull_id`'s copy for the encoder cache: a view of its slot, lent until
        `free_evicted`; None if this worker does not hold that copy."""
        with self._lock:
            item = self._held.pop((mm_hash, pull_id), None)
        if item is None:
            return None
        self._lend(mm_hash, pull_id, item)
        return item.tensor

    def lend(self, load: Load, timeout_s: float) -> torch.Tensor:
        """The ordered copy for the encoder cache, as `take`; a worker that does not hold
        it reads the item again from its encoder first, within `timeout_s`.

        The scheduler orders only loads that every rank reported holding, of pulls that
        nothing but this load removes, so a missing copy is a broken promise, not a path
        of its own; but vLLM has by now scheduled the item's tokens without encoding it,
        and a miss would fail the whole engine in its gather (see
        `ConsumerScheduler.has_item`). Reading it again gives the bytes the pull would
        have (the encoder keeps what it exported, as a cache); if that fails too,
        LoadLostError names the item and stops the step before vLLM's gather."""
        tensor = self.take(load.mm_hash, load.pull_id)
        if tensor is not None:
            return tensor
        logger.error(
            "told to load %s (pull %d), which this worker does not hold; reading it again "
            "from encoder %s", load.mm_hash, load.pull_id, load.encoder_id,
        )  # fmt: skip
        try:
            item = self._read_again(load, time.monotonic() + timeout_s)
        except ECNixlError as exc:
            raise LoadLostError(
                f"{load.mm_hash} (pull {load.pull_id}) is not held here and could not be "
                f"read again from encoder {load.encoder_id}: {exc}"
            ) from exc
        self._lend(load.mm_hash, load.pull_id, item)
        return item.tensor

    def _read_again(self, load: Load, deadline: float) -> PulledItem:
        address = self.encoders.get(load.encoder_id)
        if address is None:
            raise RefusedError(f"encoder {load.encoder_id!r} is not configured")
        resolution = self.resolver.resolve(address, [load.mm_hash], deadline)
        try:
            self.model.check(resolution.items[0], load.num_embeds)
            [item] = self.puller.read(resolution, deadline)
        except BaseException as exc:
            self.resolver.abandon(address, resolution.lease_ids, exc)
            raise
        return item

    def _lend(self, mm_hash: str, pull_id: int, item: PulledItem) -> None:
        with self._lock:
            replaced = self._lent.pop(mm_hash, None)
            self._lent[mm_hash] = (pull_id, item)
        if replaced is not None:  # the encoder cache drops its old tensor for this one
            self.puller.free(replaced[1])

    def free_evicted(self, lent: Iterable[tuple[str, int]]) -> None:
        """vLLM evicted these (mm_hash, pull id) from its encoder cache: free their slots."""
        with self._lock:
            released = [
                self._lent.pop(mm_hash)[1]
                for mm_hash, pull_id in lent
                if mm_hash in self._lent and self._lent[mm_hash][0] == pull_id
            ]
        for item in released:
            self.puller.free(item)

    def drop(self, mm_hashes: Iterable[str], pull_id: int) -> None:
        """Free pull `pull_id`'s copies of these items; a READ of that pull still running
        frees what it reads when it ends."""
        with self._lock:
            keys = [(h, pull_id) for h in mm_hashes]
            dropped = [self._held.pop(key) for key in keys if key in self._held]
            self._dropped[pull_id] = None
            if len(self._dropped) > DROPPED_MEMORY:
                del self._dropped[next(iter(self._dropped))]
        for item in dropped:
            self.puller.free(item)

    def meet(self, encoder_id: str, peer: PeerInfo, deadline: float) -> None:
        """Load a configured encoder's agent metadata now (the scheduler met it), so
        that its first pull does not pay for it, nor for UCX's wire-up."""
        address = self.encoders.get(encoder_id)
        if address is None:
            raise RefusedError(f"encoder {encoder_id!r} is not configured")
        self.resolver.learn(address, peer)
        self.puller.meet(address, peer, deadline)

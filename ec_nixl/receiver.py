"""The PD worker's side of a pull: pull on the scheduler's order, hold, hand over.

The scheduler orders each of its workers, over a local socket, to pull items
from an encoder: the worker resolves them (its own leases) and READs them into
its receive arena, then holds them until the scheduler schedules the request
(`take` hands vLLM's encoder cache a view of the slot: no copy) or drops them.
A slot lent to the encoder cache is freed when vLLM evicts the item from it
(`release`, on the scheduler's word: it sees every eviction).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import torch

from ec_nixl.arena import Arena
from ec_nixl.control.messages import RemoteItem
from ec_nixl.control.status import status_of, translate
from ec_nixl.errors import ECNixlError, RefusedError
from ec_nixl.puller import PulledItem, Puller
from ec_nixl.resolver import Resolver
from ec_nixl.v1 import worker_pb2 as pb
from ec_nixl.v1 import worker_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelShape:
    """What an encoder output must look like to enter this model's encoder cache.

    Checked on the descriptors, before any byte is read: an encoder that sends
    another shape or dtype (a misconfigured or hostile peer) would otherwise
    crash the model at its next step.
    """

    dtype: torch.dtype
    embed_size: int  # inputs-embeds width; some models stack several (deepstack): a multiple

    def check(self, item: RemoteItem, num_embeds: int) -> None:
        """`num_embeds` 0: not known yet (a prefetch), the scheduler checks the rows."""
        shape = item.shape
        if (
            item.dtype != self.dtype
            or len(shape) != 2
            or shape[0] != (num_embeds or shape[0])
            or shape[1] % self.embed_size
        ):
            raise RefusedError(
                f"{item.mm_hash}: the encoder holds {item.dtype}{list(shape)}, this model "
                f"needs {self.dtype}[{num_embeds}, k*{self.embed_size}]"
            )


@dataclass(frozen=True)
class PullReport:
    bytes: int
    resolve_s: float
    read_s: float
    rows: tuple[int, ...]  # per item


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

    def pull(
        self,
        encoder_id: str,
        mm_hashes: Sequence[str],
        num_embeds: Sequence[int],
        deadline: float,
    ) -> PullReport:
        """Resolve and READ the items from a configured encoder, then hold them."""
        address = self.encoders.get(encoder_id)
        if address is None:
            raise RefusedError(f"encoder {encoder_id!r} is not configured")
        if len(num_embeds) != len(mm_hashes):
            raise RefusedError(f"{len(mm_hashes)} items but {len(num_embeds)} shapes")
        start = time.monotonic()
        resolution = self.resolver.resolve(address, mm_hashes, deadline)
        resolved = time.monotonic()
        try:
            for item, rows in zip(resolution.items, num_embeds, strict=True):
                self.model.check(item, rows)
            pulled = self.puller.read(resolution, deadline)
        except BaseException as exc:
            self.resolver.abandon(resolution, exc)
            raise
        with self._lock:
            for item in pulled:
                if (older := self._held.pop(item.mm_hash, None)) is not None:
                    self.puller.free(older)
                self._held[item.mm_hash] = item
        size = sum(item.region.length for item in resolution.items)
        rows = tuple(item.shape[0] for item in resolution.items)
        return PullReport(size, resolved - start, time.monotonic() - resolved, rows)

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
                self.puller.meet(address, self.resolver.peer(address))
            except ECNixlError as exc:
                logger.info(
                    "encoder %s not met at start (%s); its first pull will", encoder_id, exc
                )

    @property
    def held(self) -> list[str]:
        with self._lock:
            return list(self._held)


class WorkerServicer(pb_grpc.WorkerServiceServicer):
    def __init__(self, receiver: Receiver) -> None:
        self._receiver = receiver

    def Pull(self, request: pb.PullRequest, context: grpc.ServicerContext):
        deadline = time.monotonic() + request.timeout_ms / 1000
        try:
            report = self._receiver.pull(
                request.encoder_id, list(request.mm_hashes), list(request.num_embeds), deadline
            )
        except ECNixlError as exc:
            context.abort(status_of(exc), str(exc))
        return pb.PullResponse(
            bytes=report.bytes,
            resolve_us=int(report.resolve_s * 1e6),
            read_us=int(report.read_s * 1e6),
            rows=report.rows,
        )

    def Drop(self, request: pb.DropRequest, context: grpc.ServicerContext):
        self._receiver.drop(request.mm_hashes)
        return pb.DropResponse()


def serve_receiver(receiver: Receiver, address: str) -> grpc.Server:
    """Serve the worker service on `address` (a `unix:` path in practice)."""
    server = grpc.server(
        ThreadPoolExecutor(max_workers=8, thread_name_prefix="ec-nixl-worker-rpc"),
        options=[("grpc.max_receive_message_length", 4 << 20)],
    )
    pb_grpc.add_WorkerServiceServicer_to_server(WorkerServicer(receiver), server)
    server.add_insecure_port(address)
    server.start()
    return server


class WorkerClient:
    """The scheduler's handle on one worker's service."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._channel = grpc.insecure_channel(address)
        self._stub = pb_grpc.WorkerServiceStub(self._channel)

    def pull(
        self,
        encoder_id: str,
        mm_hashes: Sequence[str],
        num_embeds: Sequence[int],
        deadline: float,
    ) -> PullReport:
        now = time.monotonic()
        request = pb.PullRequest(
            encoder_id=encoder_id,
            mm_hashes=mm_hashes,
            num_embeds=num_embeds,
            timeout_ms=max(1, int((deadline - now) * 1000)),
        )
        try:
            # A grace second: the worker's own deadline should answer first.
            reply = self._stub.Pull(
                request, timeout=max(0.001, deadline - now) + 1.0, wait_for_ready=True
            )
        except grpc.RpcError as exc:
            raise translate(exc, f"worker {self.address}") from exc
        return PullReport(
            reply.bytes, reply.resolve_us / 1e6, reply.read_us / 1e6, tuple(reply.rows)
        )

    def drop(self, mm_hashes: list[str]) -> None:
        try:
            self._stub.Drop(pb.DropRequest(mm_hashes=mm_hashes), timeout=2.0)
        except grpc.RpcError as exc:
            logger.warning("could not drop %s on %s: %s", mm_hashes, self.address, exc.details())

    def close(self) -> None:
        self._channel.close()

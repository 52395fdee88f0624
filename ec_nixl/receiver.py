"""The PD worker's side of a pull: read on the scheduler's order, hold, hand over.

The scheduler resolves items and orders each of its workers, over a local
socket, to READ them into the worker's receive arena. The worker holds them
until the scheduler schedules the request (then `take` copies each into the
encoder cache and frees the slot at once) or drops them. Copying out costs a
local memcpy (several times faster than the READ itself) and means no slot is
shared with vLLM's encoder cache, whose lifetime we do not control.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch

from ec_nixl.arena import Arena
from ec_nixl.control.messages import PeerInfo, RemoteItem
from ec_nixl.control.status import status_of, translate
from ec_nixl.errors import ECNixlError
from ec_nixl.puller import PulledItem, Puller
from ec_nixl.resolver import Resolution
from ec_nixl.v1 import worker_pb2 as pb
from ec_nixl.v1 import worker_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)


class Receiver:
    """Pulled items held by mm_hash in a registered receive arena."""

    def __init__(self, arena: Arena, device: torch.device | str = "cpu") -> None:
        self.puller = Puller(arena)
        self.device = torch.device(device)
        self._lock = threading.Lock()
        self._held: dict[str, PulledItem] = {}

    def pull(self, resolution: Resolution, deadline: float) -> None:
        pulled = self.puller.read(resolution, deadline)
        with self._lock:
            for item in pulled:
                if (older := self._held.pop(item.mm_hash, None)) is not None:
                    self.puller.free(older)
                self._held[item.mm_hash] = item
        logger.debug("holding %s", ", ".join(item.mm_hash for item in pulled))

    def take(self, mm_hash: str) -> torch.Tensor | None:
        """The held item as a tensor of its own on the worker's device; its slot is freed."""
        with self._lock:
            item = self._held.pop(mm_hash, None)
        if item is None:
            return None
        try:
            return item.tensor.to(self.device, copy=True)
        finally:
            self.puller.free(item)

    def drop(self, mm_hashes: Iterable[str]) -> None:
        with self._lock:
            dropped = [self._held.pop(h) for h in mm_hashes if h in self._held]
        for item in dropped:
            self.puller.free(item)

    @property
    def held(self) -> list[str]:
        with self._lock:
            return list(self._held)


class WorkerServicer(pb_grpc.WorkerServiceServicer):
    def __init__(self, receiver: Receiver) -> None:
        self._receiver = receiver

    def Pull(self, request: pb.PullRequest, context: grpc.ServicerContext):
        now = time.monotonic()
        try:
            resolution = Resolution(
                address=request.exporter_address,
                peer=PeerInfo.from_pb(request.peer),
                items=[RemoteItem.from_pb(item) for item in request.items],
                valid_until=now + request.valid_for_ms / 1000,
            )
            self._receiver.pull(resolution, now + request.timeout_ms / 1000)
        except ECNixlError as exc:
            context.abort(status_of(exc), str(exc))
        return pb.PullResponse()

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

    def pull(self, resolution: Resolution, deadline: float) -> None:
        now = time.monotonic()
        request = pb.PullRequest(
            exporter_address=resolution.address,
            peer=resolution.peer.to_pb(),
            items=[item.to_pb() for item in resolution.items],
            timeout_ms=max(1, int((deadline - now) * 1000)),
            valid_for_ms=max(0, int((resolution.valid_until - now) * 1000)),
        )
        try:
            self._stub.Pull(request, timeout=max(0.001, deadline - now) + 1.0, wait_for_ready=True)
        except grpc.RpcError as exc:
            raise translate(exc, f"worker {self.address}") from exc

    def drop(self, mm_hashes: list[str]) -> None:
        try:
            self._stub.Drop(pb.DropRequest(mm_hashes=mm_hashes), timeout=2.0)
        except grpc.RpcError as exc:
            logger.warning("could not drop %s on %s: %s", mm_hashes, self.address, exc.details())

    def close(self) -> None:
        self._channel.close()

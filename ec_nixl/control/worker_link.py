"""The local link between a PD scheduler and its workers: READ orders and drops.

Both ends live here, apart from `receiver` (which holds NIXL), so that the
scheduler's process never loads NIXL. The scheduler sends the same order to
every tensor-parallel rank at once (`WorkerClient.pull` returns a future); each
rank READs under the one lease that counts it as a reader.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc

from ec_nixl.control.messages import RemoteItem
from ec_nixl.control.status import status_of, translate
from ec_nixl.errors import ECNixlError
from ec_nixl.v1 import worker_pb2 as pb
from ec_nixl.v1 import worker_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

# Every call on this link is local; a worker that does not answer this fast is stuck.
DROP_TIMEOUT_S = 2.0


def worker_address(engine_id: str, rank: int) -> str:
    """The local socket of a PD worker's service; both sides derive it the same way."""
    return f"unix:{Path(tempfile.gettempdir()) / f'ec-nixl-{engine_id}-{rank}.sock'}"


@dataclass(frozen=True)
class PullOrder:
    """READ these leased items of one encoder into every worker, before `valid_until`."""

    encoder_id: str
    items: list[RemoteItem]
    num_embeds: list[int]  # per item: the rows the request's placeholder takes (0: unknown)
    valid_until: float  # local monotonic time
    deadline: float


@dataclass(frozen=True)
class PullReport:
    bytes: int
    read_s: float


class Reader(Protocol):
    """What a worker does with an order (`receiver.Receiver`)."""

    def read(self, order: PullOrder) -> PullReport: ...

    def drop(self, mm_hashes: Sequence[str]) -> None: ...


class WorkerServicer(pb_grpc.WorkerServiceServicer):
    def __init__(self, reader: Reader) -> None:
        self._reader = reader

    def Pull(self, request: pb.PullRequest, context: grpc.ServicerContext):
        now = time.monotonic()
        try:
            order = PullOrder(
                encoder_id=request.encoder_id,
                items=[RemoteItem.from_pb(item) for item in request.items],
                num_embeds=list(request.num_embeds),
                valid_until=now + request.valid_ms / 1000,
                deadline=now + request.timeout_ms / 1000,
            )
            report = self._reader.read(order)
        except ECNixlError as exc:
            context.abort(status_of(exc), str(exc))
        return pb.PullResponse(bytes=report.bytes, read_us=int(report.read_s * 1e6))

    def Drop(self, request: pb.DropRequest, context: grpc.ServicerContext):
        self._reader.drop(request.mm_hashes)
        return pb.DropResponse()


def serve_worker(reader: Reader, address: str) -> grpc.Server:
    """Serve the worker service on `address` (a `unix:` path in practice)."""
    server = grpc.server(
        ThreadPoolExecutor(max_workers=8, thread_name_prefix="ec-nixl-worker-rpc"),
        options=[("grpc.max_receive_message_length", 4 << 20)],
    )
    pb_grpc.add_WorkerServiceServicer_to_server(WorkerServicer(reader), server)
    server.add_insecure_port(address)
    server.start()
    return server


class PendingPull:
    """A worker's answer to come; `result()` waits for it."""

    def __init__(self, call: grpc.Future, address: str) -> None:
        self._call = call
        self._address = address

    def result(self) -> PullReport:
        try:
            reply = self._call.result()
        except grpc.RpcError as exc:
            raise translate(exc, f"worker {self._address}") from exc
        return PullReport(reply.bytes, reply.read_us / 1e6)


class WorkerClient:
    """The scheduler's handle on one worker's service."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._channel = grpc.insecure_channel(address)
        self._stub = pb_grpc.WorkerServiceStub(self._channel)

    def pull(self, order: PullOrder) -> PendingPull:
        """Send the order; the worker READs while the caller orders the other ranks."""
        now = time.monotonic()
        request = pb.PullRequest(
            encoder_id=order.encoder_id,
            items=[item.to_pb() for item in order.items],
            num_embeds=order.num_embeds,
            timeout_ms=max(1, int((order.deadline - now) * 1000)),
            valid_ms=max(0, int((order.valid_until - now) * 1000)),
        )
        # A grace second: the worker's own deadline should answer first.
        timeout = max(0.001, order.deadline - now) + 1.0
        call = self._stub.Pull.future(request, timeout=timeout, wait_for_ready=True)
        return PendingPull(call, self.address)

    def drop(self, mm_hashes: list[str]) -> None:
        try:
            self._stub.Drop(pb.DropRequest(mm_hashes=mm_hashes), timeout=DROP_TIMEOUT_S)
        except grpc.RpcError as exc:
            logger.warning("could not drop %s on %s: %s", mm_hashes, self.address, exc.details())

    def close(self) -> None:
        self._channel.close()

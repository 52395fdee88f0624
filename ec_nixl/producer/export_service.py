"""The export service: answers consumers about what this process exported.

It runs in the process that owns the exported memory. Each RPC is a short
critical section on the pool; descriptors it hands out stay valid for the
life of their lease.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import replace

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ec_nixl.config import DEFAULT_MAX_WATCHERS
from ec_nixl.control.client import KEEPALIVE_MS, KEEPALIVE_OPTIONS
from ec_nixl.control.messages import (
    PROTOCOL_VERSION,
    EventKind,
    PeerInfo,
    RemoteItem,
    consumer_id_problem,
)
from ec_nixl.control.security import AccessInterceptor, Security
from ec_nixl.control.status import status_of
from ec_nixl.errors import NotFoundError, PoolFullError
from ec_nixl.nixl_agent import TransferAgent
from ec_nixl.producer.pool import ExportPool, Lease, PoolEvent
from ec_nixl.v1 import export_pb2 as pb
from ec_nixl.v1 import export_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = "ec_nixl.v1.ExportService"
MAX_ITEMS_PER_CALL = 1024
MAX_READERS = 64  # tensor-parallel ranks of one consumer
MAX_LEASE_MS = 10 * 60 * 1000
MAX_MESSAGE_BYTES = 4 << 20
WATCH_QUEUE_DEPTH = 4096


class EventHub:
    """Fans pool events out to WatchEvents streams; a slow watcher is cut off, never waited on."""

    def __init__(self, max_watchers: int = DEFAULT_MAX_WATCHERS) -> None:
        self.max_watchers = max_watchers
        self._lock = threading.Lock()
        self._queues: list[queue.Queue[PoolEvent | None]] = []

    def publish(self, event: PoolEvent) -> None:
        with self._lock:
            for q in list(self._queues):
                try:
                    q.put_nowait(event)
                except queue.Full:
                    self._end_locked(q)  # the watcher reconnects

    def subscribe(self) -> queue.Queue[PoolEvent | None] | None:
        with self._lock:
            if len(self._queues) >= self.max_watchers:
                return None
            q: queue.Queue[PoolEvent | None] = queue.Queue(WATCH_QUEUE_DEPTH)
            self._queues.append(q)
            return q

    def unsubscribe(self, q: queue.Queue) -> None:
        """No more events for this stream; what it has not taken yet is dropped, and it
        ends at its next look (a departed watcher must not be claimed for)."""
        with self._lock:
            self._end_locked(q)

    def _end_locked(self, q: queue.Queue) -> None:
        if q in self._queues:
            self._queues.remove(q)
            q.queue.clear()
            q.put_nowait(None)  # tells the stream to end


class ExportServicer(pb_grpc.ExportServiceServicer):
    def __init__(
        self,
        pool: ExportPool,
        agent: TransferAgent,
        *,
        epoch: int,
        compatibility_hash: str,
        events: EventHub,
        on_leased: Callable[[], None],
    ) -> None:
        self._pool = pool
        self._agent = agent
        self._epoch = epoch
        self._compatibility_hash = compatibility_hash
        self._events = events
        self._on_leased = on_leased
        self._handshake = PeerInfo(agent.name, agent.metadata, epoch, tuple(agent.regions)).to_pb()
        self._handshake.compatibility_hash = compatibility_hash

    def Handshake(self, request: pb.HandshakeRequest, context: grpc.ServicerContext):
        _check_consumer_id(request.consumer_id, context)
        if request.protocol_version != PROTOCOL_VERSION:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"protocol version {request.protocol_version} is not supported: "
                f"this exporter speaks version {PROTOCOL_VERSION}",
            )
        if request.compatibility_hash != self._compatibility_hash:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"compatibility hash mismatch: consumer {request.consumer_id!r} serves "
                f"{request.compatibility_hash!r}, this exporter {self._compatibility_hash!r} "
                "(start both sides with the same --model string and dtype)",
            )
        logger.info("handshake from %s (%s)", request.consumer_id or "?", context.peer())
        return self._handshake

    def Resolve(self, request: pb.ResolveRequest, context: grpc.ServicerContext):
        hashes = list(request.mm_hashes)
        if not hashes or len(hashes) > MAX_ITEMS_PER_CALL:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"resolve takes 1 to {MAX_ITEMS_PER_CALL} mm_hashes, got {len(hashes)}",
            )
        _check_lease_ms(request.lease_ms, context)
        _check_readers(request.readers, context)
        _check_consumer_id(request.consumer_id, context)
        try:
            leases = self._pool.lease(
                hashes, request.lease_ms / 1000 or None, request.readers or 1, request.consumer_id
            )
        except (NotFoundError, PoolFullError) as exc:  # unknown item; past a lease bound
            context.abort(status_of(exc), str(exc))
        self._on_leased()
        return pb.ResolveResponse(items=[self._describe(lease) for lease in leases])

    def Release(self, request: pb.ReleaseRequest, context: grpc.ServicerContext):
        _check_lease_count(request.lease_ids, context)
        return pb.ReleaseResponse(released=self._pool.release(request.lease_ids))

    def WatchEvents(self, request: pb.WatchEventsRequest, context: grpc.ServicerContext):
        _check_readers(request.readers, context)
        _check_consumer_id(request.consumer_id, context)
        held, q = self._pool.snapshot(then=self._events.subscribe)
        if q is None:
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this encoder serves at most {self._events.max_watchers} watchers at once "
                "(its max_watchers)",
            )
        readers = request.readers or 1
        # The moment the call ends (the watcher closed it, or left): its stream thread may
        # be waiting for the next event, and must not claim that for nobody.
        if not context.add_callback(lambda: self._events.unsubscribe(q)):
            self._events.unsubscribe(q)
        context.send_initial_metadata(())  # subscribed: what follows the snapshot is live
        try:
            yield from self._snapshot_pb(held)
            for event in self._stream(q, context):
                if event.again and event.target != request.consumer_id and not request.claim:
                    continue  # announced again for another consumer: nothing new here
                message = self._event_pb(event)
                meant_for_watcher = bool(event.target) and event.target == request.consumer_id
                if event.kind is EventKind.EXPORTED and (request.claim or meant_for_watcher):
                    self._claim(message, readers, request.consumer_id)
                yield message
        finally:
            self._events.unsubscribe(q)

    def _snapshot_pb(self, held: list[PoolEvent]) -> list[pb.ExportEvent]:
        """What is held as the stream begins, unclaimed: a reconnecting consumer learns what
        it may ask for, and does not fetch again what it already had."""
        messages = [self._event_pb(event) for event in held]
        for message in messages:
            message.snapshot = True
        return messages

    def _claim(self, message: pb.ExportEvent, readers: int, consumer: str) -> None:
        """Lease the announced item for the watcher, unless it was evicted meanwhile
        (its EVICTED event follows) or a lease bound is reached (the watcher can still
        resolve the item once there are leases to spare)."""
        try:
            [lease] = self._pool.lease(
                [message.mm_hash], readers=readers, consumer=consumer, claim=True
            )
        except (NotFoundError, PoolFullError):
            return
        self._on_leased()
        message.claim.CopyFrom(self._describe(lease))

    def _stream(self, q: queue.Queue, context: grpc.ServicerContext) -> Iterator[PoolEvent]:
        while context.is_active():
            try:
                event = q.get(timeout=0.5)
            except queue.Empty:
                continue
            if event is None:
                return
            yield event

    def _event_pb(self, event: PoolEvent) -> pb.ExportEvent:
        kinds = {
            EventKind.EXPORTED: pb.ExportEvent.EXPORTED,
            EventKind.EVICTED: pb.ExportEvent.EVICTED,
            EventKind.ENCODING: pb.ExportEvent.ENCODING,
        }
        return pb.ExportEvent(
            kind=kinds[event.kind],
            mm_hash=event.mm_hash,
            length=event.length,
            epoch=self._epoch,
            published_unix_ns=event.published_unix_ns,
        )

    def _describe(self, lease: Lease) -> pb.ItemDescriptor:
        item = lease.item
        memory = self._agent.regions[0]
        return RemoteItem(
            mm_hash=item.mm_hash,
            agent_name=self._agent.name,
            epoch=self._epoch,
            region=replace(memory, address=self._pool.arena.address(item.slot), length=item.nbytes),
            dtype=item.dtype,
            shape=item.shape,
            lease_id=lease.lease_id,
            lease_remaining_s=self._pool.remaining_s(lease),
            guard=item.guard,
        ).to_pb()


def _check_lease_ms(lease_ms: int, context: grpc.ServicerContext) -> None:
    if lease_ms > MAX_LEASE_MS:
        context.abort(
            grpc.StatusCode.INVALID_ARGUMENT, f"lease_ms {lease_ms} exceeds {MAX_LEASE_MS}"
        )


def _check_lease_count(lease_ids, context: grpc.ServicerContext) -> None:
    """A call may name as many leases as a resolve can grant: a bigger one would hold the
    pool's lock (and the encoder's export) for as long as it takes."""
    if len(lease_ids) > MAX_ITEMS_PER_CALL:
        context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"at most {MAX_ITEMS_PER_CALL} lease ids per call, got {len(lease_ids)}",
        )


def _check_consumer_id(consumer_id: str, context: grpc.ServicerContext) -> None:
    """Leases are counted under the consumer's name: a name of megabytes, or of anything
    at all, would be kept for as long as they live."""
    if problem := consumer_id_problem(consumer_id):
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)


def _check_readers(readers: int, context: grpc.ServicerContext) -> None:
    if readers > MAX_READERS:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"readers {readers} exceeds {MAX_READERS}")


def start_server(
    servicer: ExportServicer,
    address: str,
    security: Security,
    max_watchers: int = DEFAULT_MAX_WATCHERS,
) -> tuple[grpc.Server, int]:
    """Serve the export service and grpc.health.v1 on `address`; returns the bound port.
    Each watch stream holds one of its threads for as long as it lasts."""
    health_threads = futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="ec-nixl-health")
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_watchers + 8, thread_name_prefix="ec-nixl-rpc"),
        interceptors=[AccessInterceptor(security.token, health_threads)],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
            # Ping each client too, so a watcher whose link died silently frees its slot,
            # and accept the clients' own pings at their pace. Pings that arrive bunched
            # (a stalled host delivers them together) are no offence: no strikes, no
            # GOAWAY too_many_pings.
            *KEEPALIVE_OPTIONS,
            ("grpc.http2.min_recv_ping_interval_without_data_ms", KEEPALIVE_MS // 2),
            ("grpc.http2.max_ping_strikes", 0),
        ],
    )
    pb_grpc.add_ExportServiceServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    credentials = security.server_credentials()
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise OSError(f"cannot bind the export service to {address}")
    server.start()
    for name in (SERVICE_NAME, ""):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, port

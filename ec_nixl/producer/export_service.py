"""The export service: answers consumers about what this process exported.

It runs in the process that owns the exported memory, on an event loop of its
own thread: every call is a coroutine, so a watch stream holds no thread and an
encoder serves many watchers with a fixed few. Each call is a short critical
section on the pool; descriptors it hands out stay valid for the life of their
lease, and READs of them are proven by their items' guards.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ec_nixl.control.client import KEEPALIVE_MS, KEEPALIVE_OPTIONS, WATCH_ID_KEY
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
from ec_nixl.metrics import Stats
from ec_nixl.nixl_agent import TransferAgent
from ec_nixl.producer.fanout import STALL_S, SWEEP_S, EventHub, Watcher
from ec_nixl.producer.loop_thread import LoopThread
from ec_nixl.producer.pool import ExportPool, Lease, PoolEvent
from ec_nixl.v1 import export_pb2 as pb
from ec_nixl.v1 import export_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = "ec_nixl.v1.ExportService"
MAX_ITEMS_PER_CALL = 1024
MAX_READERS = 64  # tensor-parallel ranks of one consumer
MAX_LEASE_MS = 10 * 60 * 1000
MAX_MESSAGE_BYTES = 4 << 20


class ExportServicer(pb_grpc.ExportServiceServicer):
    def __init__(
        self,
        pool: ExportPool,
        agent: TransferAgent,
        *,
        epoch: int,
        compatibility_hash: str,
        events: EventHub,
        stats: Stats,
        on_leased: Callable[[], None],
    ) -> None:
        self._pool = pool
        self._agent = agent
        self._epoch = epoch
        self._compatibility_hash = compatibility_hash
        self._events = events
        self._stats = stats
        self._on_leased = on_leased
        self._handshake = PeerInfo(agent.name, agent.metadata, epoch, tuple(agent.regions)).to_pb()
        self._handshake.compatibility_hash = compatibility_hash

    async def Handshake(self, request: pb.HandshakeRequest, context: grpc.aio.ServicerContext):
        await _check(context, consumer_id_problem(request.consumer_id))
        if request.protocol_version != PROTOCOL_VERSION:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"protocol version {request.protocol_version} is not supported: "
                f"this exporter speaks version {PROTOCOL_VERSION}",
            )
        if request.compatibility_hash != self._compatibility_hash:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"compatibility hash mismatch: consumer {request.consumer_id!r} serves "
                f"{request.compatibility_hash!r}, this exporter {self._compatibility_hash!r} "
                "(start both sides with the same --model string and dtype)",
            )
        logger.info("handshake from %s (%s)", request.consumer_id or "?", context.peer())
        return self._handshake

    async def Resolve(self, request: pb.ResolveRequest, context: grpc.aio.ServicerContext):
        hashes = list(request.mm_hashes)
        if not hashes or len(hashes) > MAX_ITEMS_PER_CALL:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"resolve takes 1 to {MAX_ITEMS_PER_CALL} mm_hashes, got {len(hashes)}",
            )
        await _check(context, _lease_ms_problem(request.lease_ms))
        await _check(context, _readers_problem(request.readers))
        await _check(context, consumer_id_problem(request.consumer_id))
        try:
            leases = self._pool.lease(
                hashes, request.lease_ms / 1000 or None, request.readers or 1, request.consumer_id
            )
        except (NotFoundError, PoolFullError) as exc:  # unknown item; past a lease bound
            await context.abort(status_of(exc), str(exc))
        self._on_leased()
        return pb.ResolveResponse(items=[self._describe(lease) for lease in leases])

    async def Release(self, request: pb.ReleaseRequest, context: grpc.aio.ServicerContext):
        # A call may name as many leases as a resolve can grant: a bigger one would hold
        # the pool's lock (and the encoder's export) for as long as it takes.
        if len(request.lease_ids) > MAX_ITEMS_PER_CALL:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"at most {MAX_ITEMS_PER_CALL} lease ids per call, got {len(request.lease_ids)}",
            )
        return pb.ReleaseResponse(released=self._pool.release(request.lease_ids))

    async def Acknowledge(self, request: pb.AcknowledgeRequest, context: grpc.aio.ServicerContext):
        if not self._events.acknowledge(request.watch_id, request.seq):
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such watch stream (it ended)")
        return pb.AcknowledgeResponse()

    async def WatchEvents(
        self, request: pb.WatchEventsRequest, context: grpc.aio.ServicerContext
    ) -> None:
        await _check(context, _readers_problem(request.readers))
        await _check(context, consumer_id_problem(request.consumer_id))
        held, watcher = self._pool.snapshot(
            then=lambda: self._events.subscribe(
                request.consumer_id, request.claim, request.readers or 1
            )
        )
        if watcher is None:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this encoder serves at most {self._events.max_watchers} watchers at once "
                "(its max_watchers)",
            )
        tasks: list[asyncio.Future] = []
        try:
            # subscribed: what follows the snapshot is live
            await context.send_initial_metadata(((WATCH_ID_KEY, str(watcher.watch_id)),))
            tasks = [
                sending := asyncio.ensure_future(self._send(watcher, held, context)),
                asyncio.ensure_future(watcher.cut.wait()),
            ]
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when the watcher closed the call, or left
            for task in tasks:
                task.cancel()
            self._events.unsubscribe(watcher)
        if watcher.cut.is_set():
            await context.abort(grpc.StatusCode.ABORTED, self._cut_off(watcher))
        await sending  # it ended: raises what ended it

    async def sweep(self) -> None:
        """Cut off, every SWEEP_S, the watchers that fell STALL_S behind; not when this
        loop itself was held up (a busy host, the GIL): acknowledgements may be waiting
        to be taken, and the fault would be this side's."""
        last = time.monotonic()
        while True:
            await asyncio.sleep(SWEEP_S)
            now, late = time.monotonic(), time.monotonic() - last > 2 * SWEEP_S
            last = now
            if not late:
                for watcher in self._events.lagging(now):
                    watcher.cut.set()

    def _cut_off(self, watcher: Watcher) -> str:
        """Take back the claims of a watcher that stopped taking its events."""
        revoked = self._pool.revoke(lease_id for lease_id, _ in watcher.claims)
        self._stats.count("watchers_cut_off")
        reason = (
            f"events unacknowledged for {STALL_S:g} s: cut off, {revoked} claims taken back "
            "(reconnect to follow again)"
        )
        logger.warning("watcher %s: %s", watcher.consumer or "?", reason)
        return reason

    async def _send(
        self, watcher: Watcher, held: list[PoolEvent], context: grpc.aio.ServicerContext
    ) -> None:
        """What is held as the stream begins, unclaimed (a reconnecting consumer learns
        what it may ask for, and does not fetch again what it already had), then each
        event as it comes."""
        for event in held:
            message = self._event_pb(event)
            message.snapshot = True
            message.seq = watcher.sent()
            await context.write(message)
        while True:
            event = await watcher.next()
            if event.again and event.target != watcher.consumer and not watcher.claim:
                continue  # announced again for another consumer: nothing new here
            message = self._event_pb(event)
            meant_for_watcher = bool(event.target) and event.target == watcher.consumer
            if event.kind is EventKind.EXPORTED and (watcher.claim or meant_for_watcher):
                self._claim(message, watcher)
            message.seq = watcher.sent()
            await context.write(message)

    def _claim(self, message: pb.ExportEvent, watcher: Watcher) -> None:
        """Lease the announced item for the watcher, unless it was evicted meanwhile
        (its EVICTED event follows) or a lease bound is reached (the watcher can still
        resolve the item once there are leases to spare)."""
        try:
            [lease] = self._pool.lease(
                [message.mm_hash], readers=watcher.readers, consumer=watcher.consumer, claim=True
            )
        except (NotFoundError, PoolFullError):
            return
        self._on_leased()
        watcher.claimed(lease.lease_id, lease.expires_at)
        message.claim.CopyFrom(self._describe(lease))

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


async def _check(context: grpc.aio.ServicerContext, problem: str | None) -> None:
    if problem:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)


def _lease_ms_problem(lease_ms: int) -> str | None:
    return f"lease_ms {lease_ms} exceeds {MAX_LEASE_MS}" if lease_ms > MAX_LEASE_MS else None


def _readers_problem(readers: int) -> str | None:
    return f"readers {readers} exceeds {MAX_READERS}" if readers > MAX_READERS else None


class ExportServer:
    """The export service and grpc.health.v1 on `address`, served by `loop` on a thread
    of its own; `port` is the bound port."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        servicer: ExportServicer,
        address: str,
        security: Security,
    ) -> None:
        self._thread = LoopThread("ec-nixl-control", loop)
        self.port = self._thread.start(partial(self._start, servicer, address, security))

    def close(self, grace_s: float = 0.5) -> None:
        self._thread.close(partial(self._server.stop, grace_s))

    async def _start(self, servicer: ExportServicer, address: str, security: Security) -> int:
        self._server = grpc.aio.server(
            interceptors=[AccessInterceptor(security.token)],
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
                # Ping each client too, so a watcher whose link died silently frees its
                # slot, and accept the clients' own pings at their pace. Pings that arrive
                # bunched (a stalled host delivers them together) are no offence: no
                # strikes, no GOAWAY too_many_pings.
                *KEEPALIVE_OPTIONS,
                ("grpc.http2.min_recv_ping_interval_without_data_ms", KEEPALIVE_MS // 2),
                ("grpc.http2.max_ping_strikes", 0),
            ],
        )
        pb_grpc.add_ExportServiceServicer_to_server(servicer, self._server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, self._server)
        credentials = security.server_credentials()
        if credentials is None:
            port = self._server.add_insecure_port(address)
        else:
            port = self._server.add_secure_port(address, credentials)
        if port == 0:
            raise OSError(f"cannot bind the export service to {address}")
        await self._server.start()
        for name in (SERVICE_NAME, ""):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._sweeping = asyncio.ensure_future(servicer.sweep())  # ends with the loop
        return port

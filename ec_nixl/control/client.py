"""Client of one exporter's export service: one channel, a deadline on every call.

gRPC failures come back as this package's typed errors, so callers never see
grpc.RpcError.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence

import grpc
import grpc.experimental

from ec_nixl.control.messages import PROTOCOL_VERSION, Announcement, EventKind, PeerInfo, RemoteItem
from ec_nixl.control.security import Security
from ec_nixl.control.status import translate
from ec_nixl.errors import ECNixlError, NotFoundError, RefusedError
from ec_nixl.v1 import export_pb2 as pb
from ec_nixl.v1 import export_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

DEFAULT_RPC_TIMEOUT_S = 5.0
# Keepalive pings notice a link that died without a reset (it would otherwise look
# alive forever, and a watch stream never end) within KEEPALIVE_MS + PING_TIMEOUT_MS;
# gRPC 1.85 waits for a ping's answer for ping_timeout_ms (a minute by default), not
# for keepalive_timeout_ms. The answer may take a while on a loaded host (a few
# busy-polling ranks per core stalled a healthy peer's answer past 2 s), so the wait
# for it is longer than the interval between pings.
KEEPALIVE_MS = 2000
PING_TIMEOUT_MS = 5000
KEEPALIVE_OPTIONS = (
    ("grpc.keepalive_time_ms", KEEPALIVE_MS),
    ("grpc.keepalive_timeout_ms", PING_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.ping_timeout_ms", PING_TIMEOUT_MS),
)
# After a dropped connection gRPC reconnects with exponential backoff; its default
# ceiling (120 s) would keep PD encoding locally for minutes after the encoder is back.
# A watch stream's events are read by the thread that iterates it, not handed over by
# the channel's spin thread: one thread wake-up less between an export and PD's pull,
# on --overlap's critical path (inside vLLM, four A/B pairs of 96 announcements each:
# transit mean 10.0 / 8.2 / 6.3 / 3.5 ms against 15.8 / 12.8 / 8.0 / 6.9).
MAX_RECONNECT_BACKOFF_MS = 2000
CHANNEL_OPTIONS = (
    (grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
    *KEEPALIVE_OPTIONS,
)


# The watch stream's name in its initial metadata, and how often a watcher acknowledges
# the events it took (the exporter cuts off a watcher 5 s behind: fanout.STALL_S).
WATCH_ID_KEY = "ec-nixl-watch"
CANCELLED = grpc.StatusCode.CANCELLED  # by this side: the stream just ends
ACK_S = 0.5


class ExportClient:
    def __init__(
        self,
        address: str,
        security: Security = Security(),
        timeout_s: float = DEFAULT_RPC_TIMEOUT_S,
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._metadata = security.call_metadata()
        credentials = security.channel_credentials()
        if credentials is None:
            self._channel = grpc.insecure_channel(address, CHANNEL_OPTIONS)
        else:
            self._channel = grpc.secure_channel(address, credentials, CHANNEL_OPTIONS)
        self._stub = pb_grpc.ExportServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def handshake(
        self, compatibility_hash: str, consumer_id: str, timeout_s: float | None = None
    ) -> PeerInfo:
        request = pb.HandshakeRequest(
            protocol_version=PROTOCOL_VERSION,
            compatibility_hash=compatibility_hash,
            consumer_id=consumer_id,
        )
        return PeerInfo.from_pb(self._call(self._stub.Handshake, request, timeout_s))

    def resolve(
        self,
        mm_hashes: Sequence[str],
        consumer_id: str,
        timeout_s: float | None = None,
        readers: int = 1,
    ) -> list[RemoteItem]:
        request = pb.ResolveRequest(mm_hashes=mm_hashes, consumer_id=consumer_id, readers=readers)
        reply: pb.ResolveResponse = self._call(self._stub.Resolve, request, timeout_s)
        return [RemoteItem.from_pb(item) for item in reply.items]

    def release(self, lease_ids: Sequence[int], timeout_s: float | None = None) -> int:
        reply = self._call(self._stub.Release, pb.ReleaseRequest(lease_ids=lease_ids), timeout_s)
        return reply.released

    def watch(
        self,
        consumer_id: str = "",
        *,
        claim: bool = False,
        readers: int = 1,
        on_unknown: Callable[[int], None] = lambda kind: None,
    ) -> EventStream:
        """An EXPORTED event for each item held now, then events as they happen, from the
        moment of this call until the stream ends or is closed. With `claim`, each
        EXPORTED event carries a lease for `readers` READs by this consumer (an export
        meant for `consumer_id` carries one either way). Events of a kind this version
        does not know are skipped, each passed to `on_unknown`."""
        request = pb.WatchEventsRequest(consumer_id=consumer_id, claim=claim, readers=readers)
        call = self._stub.WatchEvents(request, metadata=self._metadata)
        return EventStream(call, self.address, on_unknown, self.acknowledge)

    def acknowledge(self, watch_id: int, seq: int) -> None:
        request = pb.AcknowledgeRequest(watch_id=watch_id, seq=seq)
        self._call(self._stub.Acknowledge, request, ACK_S * 2)

    def _call(self, method, request, timeout_s: float | None = None):
        try:
            return method(request, timeout=timeout_s or self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise translate(exc, f"exporter {self.address}") from exc


MAX_LOGGED_KINDS = 16  # distinct unknown kinds named in the log, per stream
_KINDS = {
    pb.ExportEvent.EXPORTED: EventKind.EXPORTED,
    pb.ExportEvent.EVICTED: EventKind.EVICTED,
    pb.ExportEvent.ENCODING: EventKind.ENCODING,
}


class ExportClients:
    """One client (one channel) per exporter address, for one consumer: its resolves,
    releases and watch streams to an exporter share a connection."""

    def __init__(self, consumer_id: str, security: Security = Security()) -> None:
        self.consumer_id = consumer_id
        self.security = security
        self._lock = threading.Lock()
        self._clients: dict[str, ExportClient] = {}

    def __call__(self, address: str) -> ExportClient:
        with self._lock:
            client = self._clients.get(address)
            if client is None:
                client = self._clients[address] = ExportClient(address, self.security)
            return client

    def close(self) -> None:
        with self._lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()


class EventStream:
    """An exporter's events as `Announcement`s. `close()` may be called from any thread:
    the exporter then stops announcing (and claiming) to this stream.

    Asking for the next event says the last one was dealt with: a thread of the
    stream acknowledges that to the exporter every ACK_S, so a consumer whose thread
    stops taking events is cut off (and its claims taken back) within seconds."""

    def __init__(
        self,
        call: grpc.Call,
        address: str,
        on_unknown: Callable[[int], None],
        acknowledge: Callable[[int, int], None],
    ) -> None:
        self._call = call
        self._address = address
        self._on_unknown = on_unknown
        self._acknowledge = acknowledge
        self._unknown: set[int] = set()  # kinds said in the log
        self._opening = False
        self._given = self._taken = 0  # seq of the event handed out last; of the one before
        self._closed = threading.Event()
        self._acking = False

    def __iter__(self) -> Iterator[Announcement]:
        return self

    def __next__(self) -> Announcement:
        self._taken = self._given
        event = self._next_event()
        while event.kind not in _KINDS:  # a newer exporter's: followers skip it (EVENTS.md)
            self._skip(event.kind)
            event = self._next_event()
        claim = None
        if event.HasField("claim"):
            try:
                claim = RemoteItem.from_pb(event.claim)
                if claim.mm_hash != event.mm_hash:
                    raise RefusedError(f"a claim on {claim.mm_hash} announces {event.mm_hash}")
            except RefusedError as exc:  # its lease expires on its own
                logger.warning("exporter %s announced a bad claim: %s", self._address, exc)
                claim = None
        return Announcement(
            _KINDS[event.kind],
            event.mm_hash,
            event.length,
            event.epoch,
            claim,
            event.snapshot,
            event.published_unix_ns,
        )

    def _next_event(self) -> pb.ExportEvent:
        try:
            event = next(self._call)
        except grpc.RpcError as exc:
            self._closed.set()
            if exc.code() == CANCELLED:
                raise StopIteration from None
            raise translate(exc, f"exporter {self._address}") from exc
        except StopIteration:
            self._closed.set()
            raise
        if not self._acking:
            self._start_acks()
        self._given = event.seq
        return event

    def _skip(self, kind: int) -> None:
        if kind not in self._unknown and len(self._unknown) < MAX_LOGGED_KINDS:
            self._unknown.add(kind)
            logger.warning(
                "exporter %s sends events of kind %d, which this version does not know: "
                "skipped (a newer encoder?)",
                self._address,
                kind,
            )
        self._on_unknown(kind)

    def wait_open(self) -> None:
        """Until the exporter follows this stream: an export after this is announced as
        new, not in the stream's opening list. Bounded by keepalive; a typed error if
        the stream failed instead."""
        self._opening = True
        try:
            self._call.initial_metadata()
        finally:
            self._opening = False
        if self._call.done() and self._call.code() not in (grpc.StatusCode.OK, CANCELLED):
            raise translate(self._call, f"exporter {self._address}")

    def _start_acks(self) -> None:
        self._acking = True
        watch_id = dict(self._call.initial_metadata()).get(WATCH_ID_KEY)
        if watch_id is not None:  # else an encoder older than acknowledgements
            threading.Thread(
                target=self._send_acks, args=(int(watch_id),), name="ec-nixl-acks", daemon=True
            ).start()

    def _send_acks(self, watch_id: int) -> None:
        acked = 0
        while not self._closed.wait(ACK_S):
            taken = self._taken
            if taken <= acked:
                continue
            try:
                self._acknowledge(watch_id, taken)
                acked = taken
            except NotFoundError:  # the stream ended
                return
            except ECNixlError as exc:  # the stream itself will tell
                logger.debug("acknowledging events of %s failed: %s", self._address, exc)

    def close(self) -> None:
        """Cancel the stream, without waiting for an exporter that never answered: a
        stream read on its own thread holds the call while waiting to open."""
        self._closed.set()
        if self._opening:
            threading.Thread(target=self._call.cancel, daemon=True).start()
        else:
            self._call.cancel()

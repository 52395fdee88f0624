"""The local link between a PD scheduler and its workers: READ orders and drops.

Both ends live here, apart from `receiver` (which holds NIXL), so that the
scheduler's process never loads NIXL. The scheduler sends the same order to
every tensor-parallel rank at once (`WorkerClient.pull` returns before the
answer); each rank READs under the one lease that counts it as a reader.
Every order names its pull (`pull_id`): a worker keeps what it read under the
item and the pull, and only orders naming that pull remove it (a drop over this
link, the load into vLLM's encoder cache, and the free when vLLM evicts it,
which travel in vLLM's step metadata as `Load`s and `(mm_hash, pull_id)`s). So a
pull that ends late never takes away what a newer pull of the same item read.

The link is a Unix socket with length-prefixed protobuf frames
(`proto/ec_nixl/v1/worker.proto`), one call at a time per connection; the
scheduler keeps a connection open per call in flight and the worker serves
each on a thread of its own. It was gRPC: on a busy host each direction cost
~1.5 ms of thread hand-offs (polling thread, pool, completion queue), twice
the READ of a 4.5 MiB item. Here the calling thread writes and reads the
socket itself: one wake-up each way. Only processes of the worker's own user
may connect; failures travel as the status codes of `status.py`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import struct
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from ec_nixl.control.messages import PeerInfo, RemoteItem
from ec_nixl.control.status import error_of, status_of
from ec_nixl.errors import (
    ConfigError,
    DeadlineExceededError,
    ECNixlError,
    RefusedError,
    WorkerLostError,
)
from ec_nixl.v1 import worker_pb2 as pb

logger = logging.getLogger(__name__)

# Every call on this link is local; a worker that does not answer this fast is stuck.
DROP_TIMEOUT_S = 2.0
# A worker answers its own deadline; this much later the scheduler stops waiting.
ANSWER_GRACE_S = 1.0
# A worker still starting has no socket yet: look again this often.
CONNECT_RETRY_S = 0.01
MAX_FRAME_BYTES = 4 << 20
_LENGTH = struct.Struct("!I")
_CODES = {code.value[0]: code for code in grpc.StatusCode}
_M = TypeVar("_M", bound=Message)


def worker_address(engine_id: str, rank: int) -> str:
    """The local socket of a PD worker's service; both sides derive it the same way."""
    return f"unix:{private_dir() / f'{engine_id}-{rank}.sock'}"


def private_dir() -> Path:
    """`$TMPDIR/ec-nixl-<uid>`: a directory only this user may enter, so that another
    local user can neither bind a worker's socket first nor reach one. Made if missing;
    one that is not this user's, or is open to others, is refused."""
    path = Path(tempfile.gettempdir()) / f"ec-nixl-{os.getuid()}"
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise ConfigError(
            f"{path} holds PD's worker sockets and must be a directory of uid {os.getuid()} "
            f"with mode 0700 (it is uid {info.st_uid}, mode {stat.filemode(info.st_mode)}): "
            "remove it, or set TMPDIR elsewhere"
        )
    return path


def _peer_uid(conn: socket.socket) -> int:
    return struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]


@dataclass(frozen=True)
class PullOrder:
    """READ these leased items of one encoder into every worker, before `valid_until`."""

    encoder_id: str
    items: list[RemoteItem]
    num_embeds: list[int]  # per item: the rows the request's placeholder takes (0: unknown)
    valid_until: float  # local monotonic time
    deadline: float
    pull_id: int  # what the worker keeps the items under (from 1: the proto's 0 names none)
    peer: PeerInfo  # the encoder's handshake, as the scheduler met it


@dataclass(frozen=True)
class Load:
    """Lend pull `pull_id`'s copy of an item to vLLM's encoder cache (in the step's
    metadata). The encoder and the rows say where to read it again, and what to expect,
    should a worker not hold that copy."""

    mm_hash: str
    pull_id: int
    encoder_id: str
    num_embeds: int


@dataclass(frozen=True)
class PullReport:
    bytes: int
    read_s: float


class Reader(Protocol):
    """What a worker does with an order (`receiver.Receiver`)."""

    def read(self, order: PullOrder) -> PullReport: ...

    def drop(self, mm_hashes: Sequence[str], pull_id: int) -> None: ...

    def meet(self, encoder_id: str, peer: PeerInfo, deadline: float) -> None: ...


class WorkerServer:
    """A worker's end of the link, on `address` (`unix:<path>`): a thread per
    connection answers its calls in turn."""

    def __init__(self, reader: Reader, address: str) -> None:
        self._reader = reader
        self._path = Path(address.removeprefix("unix:"))
        self._path.unlink(missing_ok=True)  # a socket left by a worker that died
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(self._path))
        self._listener.listen()
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._stopped = False
        threading.Thread(target=self._accept, name="ec-nixl-worker-link", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # stopped
            uid = _peer_uid(conn)
            stranger = uid != os.getuid()
            if stranger:
                logger.warning("refused a worker-link connection from uid %d", uid)
            with self._lock:
                refused = stranger or self._stopped
                if not refused:
                    self._connections.add(conn)
            if refused:
                conn.close()
                continue
            threading.Thread(
                target=self._serve, args=(conn,), name="ec-nixl-worker-call", daemon=True
            ).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            while (call := _receive(conn, pb.WorkerCall)) is not None:
                _send(conn, self._answer(call))
        except RefusedError as exc:
            logger.warning("closed a worker-link connection: %s", exc)
        except OSError:
            pass  # the scheduler went away, or gave up on an answer
        finally:
            with self._lock:
                self._connections.discard(conn)
            conn.close()

    def _answer(self, call: pb.WorkerCall) -> pb.WorkerAnswer:
        kind = call.WhichOneof("call")
        try:
            if kind == "pull":
                report = self._reader.read(_order(call.pull))
                return pb.WorkerAnswer(
                    pull=pb.PullResponse(bytes=report.bytes, read_us=int(report.read_s * 1e6))
                )
            if kind == "drop":
                self._reader.drop(call.drop.mm_hashes, call.drop.pull_id)
                return pb.WorkerAnswer(drop=pb.DropResponse())
            if kind == "meet":
                deadline = time.monotonic() + call.meet.timeout_ms / 1000
                self._reader.meet(call.meet.encoder_id, PeerInfo.from_pb(call.meet.peer), deadline)
                return pb.WorkerAnswer(meet=pb.MeetResponse())
            raise RefusedError("a worker call of no known kind")
        except Exception as exc:  # a thread boundary: whatever fails here fails this call only
            if not isinstance(exc, ECNixlError):
                logger.exception("worker call %s failed unexpectedly", kind)
            code = status_of(exc) if isinstance(exc, ECNixlError) else grpc.StatusCode.INTERNAL
            return pb.WorkerAnswer(failure=pb.Failure(code=code.value[0], message=str(exc)))

    def stop(self) -> None:
        """Stop accepting, end every connection (calls in flight fail at the scheduler)."""
        with self._lock:
            self._stopped = True
            connections = list(self._connections)
        for sock in (self._listener, *connections):
            with contextlib.suppress(OSError):  # wakes a thread blocked in accept() or recv()
                sock.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._path.unlink(missing_ok=True)


def _order(request: pb.PullRequest) -> PullOrder:
    now = time.monotonic()
    return PullOrder(
        encoder_id=request.encoder_id,
        items=[RemoteItem.from_pb(item) for item in request.items],
        num_embeds=list(request.num_embeds),
        valid_until=now + request.valid_ms / 1000,
        deadline=now + request.timeout_ms / 1000,
        pull_id=request.pull_id,
        peer=PeerInfo.from_pb(request.peer),
    )


class PendingPull:
    """A worker's answer to come; `result()` waits for it (and first for the worker to
    listen, if it was not yet when the order went: a worker may still be starting)."""

    def __init__(self, client: WorkerClient, call: pb.WorkerCall, deadline: float) -> None:
        self._client = client
        self._call = call
        self._deadline = deadline
        try:  # at once, so that every rank READs while the caller orders the next one
            self._conn: socket.socket | None = client._send(call, deadline=0.0)
        except ECNixlError:
            self._conn = None  # result() tries again, until the deadline

    def result(self) -> PullReport:
        conn = self._conn or self._client._send(self._call, self._deadline)
        reply = self._client._answer(conn, self._deadline + ANSWER_GRACE_S).pull
        return PullReport(reply.bytes, reply.read_us / 1e6)


class WorkerClient:
    """The scheduler's end of one worker's link; connections stay open between calls."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._path = address.removeprefix("unix:")
        self._lock = threading.Lock()
        self._idle: list[socket.socket] = []

    def pull(self, order: PullOrder) -> PendingPull:
        """Send the order; the worker READs while the caller orders the other ranks."""
        now = time.monotonic()
        request = pb.PullRequest(
            encoder_id=order.encoder_id,
            items=[item.to_pb() for item in order.items],
            num_embeds=order.num_embeds,
            timeout_ms=max(1, int((order.deadline - now) * 1000)),
            valid_ms=max(0, int((order.valid_until - now) * 1000)),
            pull_id=order.pull_id,
            peer=order.peer.to_pb(),
        )
        return PendingPull(self, pb.WorkerCall(pull=request), order.deadline)

    def drop(self, mm_hashes: list[str], pull_id: int) -> None:
        """The worker frees pull `pull_id`'s copies of these items (another pull's stay)."""
        deadline = time.monotonic() + DROP_TIMEOUT_S
        try:
            call = pb.WorkerCall(drop=pb.DropRequest(mm_hashes=mm_hashes, pull_id=pull_id))
            self._answer(self._send(call, deadline), deadline)
        except ECNixlError as exc:
            logger.warning(
                "could not drop %s (pull %d) on %s: %s", mm_hashes, pull_id, self.address, exc
            )

    def meet(self, encoder_id: str, peer: PeerInfo, timeout_s: float) -> None:
        """The worker loads the encoder's agent metadata now (best effort: else its
        first pull from that encoder does)."""
        deadline = time.monotonic() + timeout_s
        request = pb.MeetRequest(
            encoder_id=encoder_id, peer=peer.to_pb(), timeout_ms=max(1, int(timeout_s * 1000))
        )
        try:
            conn = self._send(pb.WorkerCall(meet=request), deadline)
            self._answer(conn, deadline + ANSWER_GRACE_S)
        except ECNixlError as exc:
            logger.info("worker %s did not meet encoder %s: %s", self.address, encoder_id, exc)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _send(self, call: pb.WorkerCall, deadline: float) -> socket.socket:
        """A connection with `call` written on it: an idle one, else a new one (waiting
        until `deadline` for a worker that does not listen yet)."""
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is not None:
            try:
                _send(conn, call)
                return conn
            except OSError:  # the worker restarted since: connect afresh
                conn.close()
        while True:
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            # With a timeout the socket does not block: a listener whose backlog is full
            # (a worker that stopped accepting) refuses at once with EAGAIN, where a
            # blocking connect would wait for it for ever, and the scheduler with it.
            conn.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                conn.connect(self._path)
                if (uid := _peer_uid(conn)) != os.getuid():
                    conn.close()
                    raise RefusedError(
                        f"worker {self.address} is served by uid {uid}, not this user: "
                        "not sending it orders"
                    )
                _send(conn, call)
                return conn
            except (FileNotFoundError, ConnectionRefusedError, BlockingIOError) as exc:
                conn.close()
                if time.monotonic() >= deadline:
                    if isinstance(exc, BlockingIOError):
                        raise DeadlineExceededError(
                            f"worker {self.address} did not accept a connection by the "
                            "deadline: its backlog is full (a stuck worker?)"
                        ) from exc
                    raise DeadlineExceededError(
                        f"worker {self.address} was not listening by the deadline ({exc})"
                    ) from exc
                time.sleep(CONNECT_RETRY_S)
            except OSError as exc:
                conn.close()
                raise WorkerLostError(f"worker {self.address}: {exc}") from exc

    def _answer(self, conn: socket.socket, deadline: float) -> pb.WorkerAnswer:
        """The answer to the call written on `conn`, which is then free for the next
        call; a connection whose answer did not come whole is closed."""
        try:
            conn.settimeout(max(0.001, deadline - time.monotonic()))
            answer = _receive(conn, pb.WorkerAnswer)
            if answer is None:
                raise ConnectionResetError("the worker closed the link before answering")
        except TimeoutError as exc:
            conn.close()
            raise DeadlineExceededError(f"worker {self.address} did not answer in time") from exc
        except OSError as exc:
            conn.close()
            raise WorkerLostError(f"worker {self.address}: {exc}") from exc
        except ECNixlError:
            conn.close()
            raise
        conn.settimeout(None)
        with self._lock:
            self._idle.append(conn)
        if answer.WhichOneof("answer") == "failure":
            code = _CODES.get(answer.failure.code, grpc.StatusCode.UNKNOWN)
            raise error_of(code, f"worker {self.address}: {code.name}: {answer.failure.message}")
        return answer


def _send(conn: socket.socket, message: Message) -> None:
    body = message.SerializeToString()
    conn.sendall(_LENGTH.pack(len(body)) + body)


def _receive(conn: socket.socket, kind: type[_M]) -> _M | None:
    """The next message on `conn`; None if it closed between messages."""
    header = _read(conn, _LENGTH.size)
    if header is None:
        return None
    (length,) = _LENGTH.unpack(header)
    if length > MAX_FRAME_BYTES:
        raise RefusedError(f"a {length}-byte frame on the worker link (at most {MAX_FRAME_BYTES})")
    body = _read(conn, length) if length else b""
    if body is None:
        raise ConnectionResetError("the worker link closed in the middle of a frame")
    message = kind()
    try:
        message.ParseFromString(body)
    except DecodeError as exc:
        raise RefusedError(f"a malformed {kind.__name__} on the worker link: {exc}") from exc
    return message


def _read(conn: socket.socket, size: int) -> bytes | None:
    """Exactly `size` bytes; None if the link closed before the first."""
    data = bytearray()
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            if not data:
                return None
            raise ConnectionResetError("the worker link closed in the middle of a frame")
        data += chunk
    return bytes(data)

"""An encoder's own /metrics over HTTP: one thread, however many connections.

prometheus_client's `start_http_server` gives each connection a thread and
waits for its request as long as the sender likes: 300 connections that never
finish their request held 300 threads for good. Here one thread runs an
asyncio server. A connection has REQUEST_TIMEOUT_S to send its request and
take the answer, then it is closed; at most MAX_CONNECTIONS are open at once,
and one more closes the oldest (a scraper sends its request at once and is
answered, while connections that send nothing are dropped in turn). Each
answer is `generate_latest(registry)`, and the connection closes after it.
"""

from __future__ import annotations

import asyncio
import threading
from functools import partial
from urllib.parse import urlsplit

import prometheus_client

from ec_nixl.metrics import PromMetrics, Stats
from ec_nixl.producer.loop_thread import LoopThread

REQUEST_TIMEOUT_S = 5.0
MAX_CONNECTIONS = 64
MAX_REQUEST_BYTES = 16 << 10  # request line and headers; a GET has no body
PATHS = ("/metrics", "/")


class MetricsEndpoint:
    """Serves `registry` on HOST:PORT (port 0: any) from a thread of its own; `port`
    is the bound port. OSError at once if the address cannot be bound."""

    def __init__(
        self,
        registry: prometheus_client.CollectorRegistry,
        host: str,
        port: int,
    ) -> None:
        self._registry = registry
        self._timeout_s = REQUEST_TIMEOUT_S
        # open connections, oldest first; only the endpoint's thread changes it
        self._connections: dict[asyncio.Transport, None] = {}
        self._thread = LoopThread("ec-nixl-metrics-http")
        self.port = self._thread.start(partial(self._start, host, port))

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    def close(self) -> None:
        self._thread.close(self._stop)

    async def _start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(self._serve, host, port, limit=MAX_REQUEST_BYTES)
        return self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        self._server.close()
        for transport in list(self._connections):
            transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        transport = writer.transport
        # drain() returns once the whole answer is with the kernel: a reader that never
        # reads cannot keep it here after the deadline
        transport.set_write_buffer_limits(high=0)
        if len(self._connections) >= MAX_CONNECTIONS:
            oldest = next(iter(self._connections))
            del self._connections[oldest]
            oldest.abort()
        self._connections[transport] = None
        try:
            async with asyncio.timeout(self._timeout_s):
                head = await reader.readuntil(b"\r\n\r\n")
                writer.write(self._answer(head))
                await writer.drain()
            writer.close()
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            transport.abort()
        except asyncio.LimitOverrunError:
            writer.write(_response(431, b"request header fields too large\n"))
            writer.close()
        finally:
            self._connections.pop(transport, None)

    def _answer(self, head: bytes) -> bytes:
        method, _, rest = head.partition(b" ")
        target = rest.partition(b" ")[0].decode("latin-1")
        if method != b"GET":
            return _response(405, b"only GET\n")
        if urlsplit(target).path not in PATHS:
            return _response(404, b"not found: GET /metrics\n")
        body = prometheus_client.generate_latest(self._registry)
        return _response(200, body, prometheus_client.CONTENT_TYPE_LATEST)


_REASONS = {
    200: "OK",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
}


def _response(status: int, body: bytes, content_type: str = "text/plain") -> bytes:
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


class MetricsServer:
    """Our own /metrics endpoint, for processes whose numbers vLLM cannot carry
    (the encoder's worker: vLLM drops an encoder-only step's connector output).
    Folds `stats` into Prometheus metrics every `interval_s`; serves them from one
    thread with a deadline on each request (`MetricsEndpoint`)."""

    def __init__(self, stats: Stats, address: str, interval_s: float = 1.0) -> None:
        self._stats = stats
        self.registry = prometheus_client.CollectorRegistry()
        constructors = {
            "counter": partial(prometheus_client.Counter, registry=self.registry),
            "gauge": partial(prometheus_client.Gauge, registry=self.registry),
            "histogram": partial(prometheus_client.Histogram, registry=self.registry),
        }
        self._metrics = PromMetrics(constructors, labelnames=[])
        host, _, port = address.rpartition(":")
        self.endpoint = MetricsEndpoint(self.registry, host.strip("[]"), int(port))
        self.port = self.endpoint.port
        self._stop = threading.Event()
        self._folder = threading.Thread(
            target=self._fold, args=(interval_s,), name="ec-nixl-metrics", daemon=True
        )
        self._folder.start()

    def _fold(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            self.flush()

    def flush(self) -> None:
        self._metrics.observe(self._stats.take(), [])

    def close(self) -> None:
        self._stop.set()
        self.endpoint.close()

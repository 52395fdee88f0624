"""EPD proxy: an OpenAI-compatible front that sends each request to an encoder and to PD.

For each chat or completion request:
1. send it to an encoder instance with `max_tokens` 1 (an encoder-only instance
   runs the vision encoder, exports the outputs, and answers with
   `ec_transfer_params` saying where they are);
2. forward the original request to the PD instance with those
   `ec_transfer_params` at the top level of the body; a streamed answer
   passes through chunk by chunk.
With `--overlap` (PD runs ECNixlConnector) step 2 does not wait for step 1:
PD gets the request at once, saying that its images are being encoded
(`{"*": {"encoder_id": "*"}}`), so its front end (HTTP, image processing,
tokenizing) runs while they are, and its scheduler pulls each item the moment
an encoder announces it. Should the encoders fail, PD's request is
cancelled and sent again with what did arrive: PD encodes the rest.

With several PDs, requests go to them in turn. A PD named `NAME=URL` (its
`consumer_id`) is told to its encoders: each encoder request carries
`{"consumer_id": NAME}`, so the encoder announces the request's items to
that PD with a claim and it prefetches them (one READ each); other PDs do
not pull them.

With several encoders, a request's images are spread over them (one
encoder request per image) and their answers merged; encoders are used
round-robin, and one that fails (or does not answer within the encoder
timeout) is skipped for a few seconds. If no encoder answers, or all are
being skipped, PD gets the request without params and encodes locally.
`/metrics` counts both, and times each request's two phases (encoders; PD's
first chunk, which overlap with `--overlap`): where a TTFT goes.

Each inline media item gets the SHA-256 of its content as its `uuid`, which
vLLM takes as the item's mm_hash; no client's own uuid is passed on (it could
name another tenant's image), and an item named by a uuid alone is refused
(ec_nixl.proxy.media says which parts vLLM takes for media). With `--encoder-events`,
the proxy follows the encoders' export events, and an image an encoder still
holds (a chat's earlier turn) is not sent to an encoder again: PD pulls it from
the holder (docs/EVENTS.md).

A request may hold at most `--max-media-items` items (400 past that), and at
most `--encoder-concurrency` encoder requests are in flight at once, over all
requests: a request with many items waits for its turn instead of flooding the
encoders and the proxy's connection pool (which PD and `/health` share).
A request body may be at most `--max-body-bytes` (413 past that), and the
proxy holds at most `--max-body-bytes-in-flight` of bodies at once, over all
requests: each is kept, parsed, for its request's whole life, at about four
times its size (six bodies of 48 MiB took 1.2 GiB). A request that would pass
that is answered 503 with Retry-After, before its body is read when it gives
its length.

A client that hangs up ends its request: the proxy closes its requests to the
encoders and PD, streamed or not, and vLLM aborts them instead of generating
an answer nobody reads.

The token for `--encoder-events` is taken from --token, else --token-file,
else $EC_NIXL_TOKEN (the first keeps it in the process list: prefer the others).

    ec-nixl proxy --encoder URL [--encoder URL ...] --pd [NAME=]URL [--pd ...]
        --port N [--overlap] [--encoder-events ID=HOST:PORT ...]
        [--max-media-items N] [--encoder-concurrency N]
        [--max-body-bytes N] [--max-body-bytes-in-flight N]
        [--token-file FILE] [--tls-ca FILE] [--require-tls]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp
import prometheus_client
from aiohttp import web

from ec_nixl.control.security import add_client_arguments, client_security
from ec_nixl.errors import ConfigError
from ec_nixl.proxy.directory import EncoderDirectory
from ec_nixl.proxy.encoders import Encoders
from ec_nixl.proxy.media import (
    MediaError,
    Named,
    Position,
    TooManyItems,
    media_positions,
    name_by_content,
    without,
)
from ec_nixl.transfer_params import ENCODER_ID, announce_params

logger = logging.getLogger("ec_nixl.proxy")

ROUTES = ("/v1/chat/completions", "/v1/completions")
DEFAULT_ENCODER_TIMEOUT_S = 30.0
DEFAULT_MAX_MEDIA_ITEMS = 64
# Below aiohttp's pool of 100 connections, so that PD and /health always find one.
DEFAULT_ENCODER_CONCURRENCY = 32
DEFAULT_MAX_BODY_BYTES = 64 << 20
# Room for four bodies of the largest size: about 1 GiB once parsed and sent on.
DEFAULT_MAX_BODY_BYTES_IN_FLIGHT = 256 << 20
BUSY_RETRY_AFTER_S = 1
PD_TIMEOUT = aiohttp.ClientTimeout(total=600)
# aiohttp lets a handler run on when its client hangs up; cancelled instead, it closes its
# requests to the encoders and PD, and vLLM aborts them rather than generate for no one.
SERVER_OPTIONS = {"handler_cancellation": True}
PHASE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10)


@dataclass(frozen=True)
class PD:
    url: str
    name: str = ""  # its consumer_id: told to the encoders so they claim items for it

    @classmethod
    def parse(cls, text: str) -> PD:
        """`URL` or `NAME=URL`."""
        name, sep, url = text.partition("=")
        return cls(url, name) if sep and not name.startswith("http") else cls(text)


class BodyBudget:
    """Bytes of request bodies the proxy holds at once, over all requests (the event
    loop's thread alone calls it)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def take(self, nbytes: int) -> bool:
        if self.held + nbytes > self.limit:
            return False
        self.held += nbytes
        return True

    def give(self, nbytes: int) -> None:
        self.held -= nbytes


class EPDProxy:
    def __init__(
        self,
        encoders: list[str],
        pds: list[PD],
        encoder_timeout_s: float,
        overlap: bool = False,
        directory: EncoderDirectory | None = None,
        max_media_items: int = DEFAULT_MAX_MEDIA_ITEMS,
        encoder_concurrency: int = DEFAULT_ENCODER_CONCURRENCY,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        max_body_bytes_in_flight: int = DEFAULT_MAX_BODY_BYTES_IN_FLIGHT,
    ) -> None:
        self.max_media_items = max_media_items
        self.max_body_bytes = max_body_bytes
        self._bodies = BodyBudget(max_body_bytes_in_flight)
        self.directory = directory
        self.pds = pds
        self._next_pd = itertools.cycle(pds)
        self.overlap = overlap
        self._health_timeout = aiohttp.ClientTimeout(total=encoder_timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self.registry = prometheus_client.CollectorRegistry()
        self._encoders = Encoders(encoders, encoder_timeout_s, encoder_concurrency, self.registry)
        self._encode_seconds = prometheus_client.Histogram(
            "ec_nixl_proxy_encode_seconds", "From a request's arrival to its encoders' answers",
            buckets=PHASE_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self._encoder_hits = prometheus_client.Counter(
            "ec_nixl_proxy_encoder_hits",
            "Media items not sent to an encoder: one already held them (PD pulls them there)",
            registry=self.registry,
        )  # fmt: skip
        self._media_items = prometheus_client.Counter(
            "ec_nixl_proxy_media_items", "Inline media items named by their content",
            registry=self.registry,
        )  # fmt: skip
        self._replaced_uuids = prometheus_client.Counter(
            "ec_nixl_proxy_replaced_uuids",
            "Client uuids not passed on: replaced by the item's content id, or dropped",
            registry=self.registry,
        )  # fmt: skip
        self._refused_requests = prometheus_client.Counter(
            "ec_nixl_proxy_refused_requests", "Requests refused with 400 (media the proxy "
            "cannot name, or too many items)", registry=self.registry,
        )  # fmt: skip
        self._shed_requests = prometheus_client.Counter(
            "ec_nixl_proxy_shed_requests", "Requests turned away for their body: 413 (over "
            "--max-body-bytes) or 503 (past --max-body-bytes-in-flight)", ["status"],
            registry=self.registry,
        )  # fmt: skip
        self._pd_first_chunk_seconds = prometheus_client.Histogram(
            "ec_nixl_proxy_pd_first_chunk_seconds",
            "From forwarding a request to PD to its first chunk (whole answer if not streamed)",
            buckets=PHASE_BUCKETS, registry=self.registry,
        )  # fmt: skip

    async def start(self, app: web.Application) -> None:
        self._session = aiohttp.ClientSession()

    async def stop(self, app: web.Application) -> None:
        await self._session.close()
        if self.directory is not None:
            self.directory.close()

    async def encode(self, path: str, body: dict[str, Any], pd: PD) -> list[dict[str, Any] | None]:
        with self._encode_seconds.time():
            return await self._encoders.encode(self._session, path, body, pd.name)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Read the body within the bounds on bodies, then serve the request; the body's
        bytes count against the bound on bodies in flight until its answer is sent."""
        taken = 0
        try:
            declared = request.content_length
            if declared is not None:
                if declared > self.max_body_bytes:
                    return self._too_large()
                if not self._bodies.take(declared):
                    return self._busy(declared)
                taken = declared
            chunks, size = [], 0
            async for chunk in request.content.iter_any():
                size += len(chunk)
                if size > self.max_body_bytes:
                    return self._too_large()
                if size > taken:
                    if not self._bodies.take(size - taken):
                        return self._busy(size)
                    taken = size
                chunks.append(chunk)
            try:
                body = json.loads(b"".join(chunks))
            except ValueError:
                return web.json_response({"error": "body is not JSON"}, status=400)
            del chunks  # the request's life long, only its parsed form is kept
            return await self._serve(request, body)
        finally:
            self._bodies.give(taken)

    def _too_large(self) -> web.Response:
        self._shed_requests.labels("413").inc()
        reason = f"request body over {self.max_body_bytes} bytes (the proxy's --max-body-bytes)"
        logger.warning("refused a request: %s", reason)
        return web.json_response({"error": reason}, status=413)

    def _busy(self, nbytes: int) -> web.Response:
        """Not logged: under a flood, one line per request would be the flood's."""
        self._shed_requests.labels("503").inc()
        reason = (
            f"the proxy holds {self._bodies.held} bytes of request bodies, and this one's "
            f"{nbytes} would pass its --max-body-bytes-in-flight ({self._bodies.limit}): "
            "try again shortly"
        )
        headers = {"Retry-After": str(BUSY_RETRY_AFTER_S)}
        return web.json_response({"error": reason}, status=503, headers=headers)

    async def _serve(self, request: web.Request, body: Any) -> web.StreamResponse:
        if not isinstance(body, dict):
            return web.json_response({"error": "body is not a JSON object"}, status=400)
        # Only an encoder may say where encoder outputs are: never pass on a client's claim.
        body.pop("ec_transfer_params", None)
        try:
            named = name_by_content(body, self.max_media_items)
        except MediaError as exc:
            self._refused_requests.inc()
            reason = str(exc)
            if isinstance(exc, TooManyItems):
                reason += " (the proxy's --max-media-items)"
            logger.warning("refused a request: %s", reason)
            return web.json_response({"error": reason}, status=400)
        self._media_items.inc(len(named.ids))
        if named.replaced_uuids:
            self._replaced_uuids.inc(named.replaced_uuids)
            logger.warning(
                "dropped %d client uuid(s), naming the items by their content instead (a "
                "uuid names one image for every tenant)", named.replaced_uuids
            )  # fmt: skip
        held = self._held(named)
        body = named.body
        to_encode = without(body, held)
        held_params = make_params_by_holder(held.values())
        pd = next(self._next_pd)
        if self.overlap:
            return await self._overlapped(request, body, to_encode, held_params, pd)
        answers = [held_params]
        if not held or media_positions(to_encode):  # all held: skip the encoders' round trip
            answers += await self.encode(request.path, to_encode, pd)
        return await self._forward(request, with_params(body, answers), pd)

    def _held(self, named: Named) -> dict[Position, tuple[str, str]]:
        """The request's items an encoder holds: (content id, encoder id) by position."""
        if self.directory is None or not named.hashes_known:
            return {}
        held = {}
        for position, uid in named.ids.items():
            encoder_id = self.directory.holder(uid)
            if encoder_id is not None:
                held[position] = (uid, encoder_id)
        self._encoder_hits.inc(len(held))
        return held

    async def _overlapped(
        self,
        request: web.Request,
        body: dict[str, Any],
        to_encode: dict[str, Any],
        held_params: dict[str, Any],
        pd: PD,
    ) -> web.StreamResponse:
        first = asyncio.create_task(
            self._forward(
                request, {**body, "ec_transfer_params": {**held_params, **announce_params()}}, pd
            )
        )
        if held_params and not media_positions(to_encode):
            return await first
        try:
            answers = await self.encode(request.path, to_encode, pd)
        except asyncio.CancelledError:  # the client left: PD's request goes with it
            first.cancel()
            raise
        if None not in answers or request.get("streaming"):
            return await first
        # An encoder failed: PD would wait out its deadline for items nobody announces.
        # Start PD over (cancelling closes the connection: vLLM aborts the request) with
        # what did arrive; it encodes the rest itself.
        first.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await first
        again = with_params(body, [held_params, *answers])
        response = await self._forward(request, again, pd)
        if response.status >= 500 and not request.get("streaming"):
            # vLLM's front end may have sent the image to its engine only with the aborted
            # request; the engine then refuses this one as retryable ("cache drift").
            logger.warning("PD refused the request sent again (%d); once more", response.status)
            response = await self._forward(request, again, pd)
        return response

    async def _forward(
        self, request: web.Request, body: dict[str, Any], pd: PD
    ) -> web.StreamResponse:
        try:
            return await self._pass_on(request, body, pd)
        except (aiohttp.ClientError, TimeoutError) as exc:
            if request.get("streaming"):  # the status went out with the first chunk
                raise
            logger.warning("PD failed: %r", exc)
            return web.json_response({"error": f"PD unavailable: {exc!r}"}, status=502)

    async def _pass_on(
        self, request: web.Request, body: dict[str, Any], pd: PD
    ) -> web.StreamResponse:
        """PD's answer to the client; a stream's status goes out with its first chunk
        (until then the request can still be sent again)."""
        start = time.perf_counter()
        async with self._session.post(
            pd.url + request.path, json=body, timeout=PD_TIMEOUT
        ) as reply:
            if not body.get("stream"):
                answer = await reply.read()
                self._pd_first_chunk_seconds.observe(time.perf_counter() - start)
                return web.Response(
                    body=answer, status=reply.status, content_type="application/json"
                )
            response = web.StreamResponse(
                status=reply.status, headers={"Content-Type": "text/event-stream"}
            )
            async for chunk in reply.content.iter_any():
                if not request.get("streaming"):
                    self._pd_first_chunk_seconds.observe(time.perf_counter() - start)
                    await response.prepare(request)
                    request["streaming"] = True
                await response.write(chunk)
            if not request.get("streaming"):
                await response.prepare(request)
            await response.write_eof()
            return response

    async def health(self, request: web.Request) -> web.Response:
        """Healthy while every PD is."""
        try:
            for pd in self.pds:
                async with self._session.get(
                    pd.url + "/health", timeout=self._health_timeout
                ) as reply:
                    if reply.status != 200:
                        return web.Response(status=reply.status)
        except (aiohttp.ClientError, TimeoutError):
            return web.Response(status=503)
        return web.Response(status=200)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=prometheus_client.generate_latest(self.registry),
            content_type="text/plain",
        )


def with_params(body: dict[str, Any], answers: list[dict[str, Any] | None]) -> dict[str, Any]:
    """The request for PD, carrying the merged `ec_transfer_params` of the encoders that
    answered (and of the items they held already); without any, PD encodes the images
    itself."""
    merged = {k: v for answer in answers if answer for k, v in answer.items()}
    return {**body, "ec_transfer_params": merged} if merged else body


def make_params_by_holder(held: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """`ec_transfer_params` for items (content id, encoder id) that encoders hold."""
    return {uid: {ENCODER_ID: encoder_id} for uid, encoder_id in held}


def check_body_bounds(max_body_bytes: int, max_body_bytes_in_flight: int) -> None:
    if max_body_bytes_in_flight < max_body_bytes:
        raise ConfigError(
            f"--max-body-bytes-in-flight ({max_body_bytes_in_flight}) is below --max-body-bytes "
            f"({max_body_bytes}): a body of the largest size could never be served"
        )


def make_app(
    encoders: list[str],
    pds: list[PD],
    encoder_timeout_s: float,
    overlap: bool = False,
    directory: EncoderDirectory | None = None,
    max_media_items: int = DEFAULT_MAX_MEDIA_ITEMS,
    encoder_concurrency: int = DEFAULT_ENCODER_CONCURRENCY,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_body_bytes_in_flight: int = DEFAULT_MAX_BODY_BYTES_IN_FLIGHT,
) -> web.Application:
    check_body_bounds(max_body_bytes, max_body_bytes_in_flight)
    proxy = EPDProxy(
        encoders, pds, encoder_timeout_s, overlap, directory, max_media_items,
        encoder_concurrency, max_body_bytes, max_body_bytes_in_flight,
    )  # fmt: skip
    app = web.Application(client_max_size=max_body_bytes, handler_args=SERVER_OPTIONS)
    app.on_startup.append(proxy.start)
    app.on_cleanup.append(proxy.stop)
    for route in ROUTES:
        app.router.add_post(route, proxy.handle)
    app.router.add_get("/health", proxy.health)
    app.router.add_get("/metrics", proxy.metrics)
    return app


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--encoder", action="append", required=True, help="encoder instance URL")
    parser.add_argument(
        "--pd", action="append", required=True, type=PD.parse, metavar="[NAME=]URL",
        help="prefill/decode instance; requests go to each in turn. NAME (the PD's "
        "consumer_id) is told to the encoders, which then hand that PD each of its "
        "requests' items with a claim (it prefetches them; other PDs do not pull them)",
    )  # fmt: skip
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--encoder-timeout", type=float, default=DEFAULT_ENCODER_TIMEOUT_S, metavar="S",
        help="give up on an encoder after S seconds (a stalled one), skip it for a while and "
        "try the next; PD encodes locally if none answers (default %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--encoder-events", action="append", default=[], type=_encoder_events,
        metavar="ID=HOST:PORT",
        help="follow this encoder's export events (its control address; ID as PD's "
        "`encoders` config names it) and send no encoder the media items an encoder "
        "already holds: PD pulls them from it (an image repeated across a chat's turns is "
        "encoded once)",
    )  # fmt: skip
    parser.add_argument(
        "--max-media-items", type=_positive, default=DEFAULT_MAX_MEDIA_ITEMS, metavar="N",
        help="refuse (400) a request with more than N media items (default %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--encoder-concurrency", type=_positive, default=DEFAULT_ENCODER_CONCURRENCY,
        metavar="N",
        help="at most N encoder requests in flight, over all requests; a request's other "
        "items wait their turn (default %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--max-body-bytes", type=_positive, default=DEFAULT_MAX_BODY_BYTES, metavar="N",
        help="refuse (413) a request body of more than N bytes (default %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--max-body-bytes-in-flight", type=_positive, default=DEFAULT_MAX_BODY_BYTES_IN_FLIGHT,
        metavar="N",
        help="hold at most N bytes of request bodies at once, over all requests (each is "
        "kept, parsed, until its answer is sent, at about 4x its size); a request past it "
        "is answered 503 with Retry-After (default %(default)s)",
    )  # fmt: skip
    add_client_arguments(parser)
    parser.add_argument(
        "--overlap", action="store_true",
        help="send each request to PD at the same time as to the encoders, so PD's front end "
        "overlaps the encoding and PD pulls each item the moment it is announced; PD must "
        "run ECNixlConnector (with another connector PD would encode the images itself)",
    )  # fmt: skip


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _encoder_events(text: str) -> tuple[str, str]:
    encoder_id, sep, address = text.partition("=")
    if not (sep and encoder_id and address):
        raise argparse.ArgumentTypeError(f"expected ID=HOST:PORT, got {text!r}")
    return encoder_id, address


def run(args: argparse.Namespace) -> int:
    logging.getLogger().setLevel(logging.INFO)  # a server's log: one line per request
    encoders = dict(args.encoder_events)
    try:
        check_body_bounds(args.max_body_bytes, args.max_body_bytes_in_flight)
        security = client_security(args, encoders.values())
    except ConfigError as exc:
        print(f"ec-nixl proxy: {exc}", file=sys.stderr)
        return 2
    directory = EncoderDirectory(encoders, security) if encoders else None
    app = make_app(
        args.encoder, args.pd, args.encoder_timeout, args.overlap, directory,
        args.max_media_items, args.encoder_concurrency, args.max_body_bytes,
        args.max_body_bytes_in_flight,
    )  # fmt: skip
    web.run_app(app, host=args.host, port=args.port, print=None)
    return 0


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))

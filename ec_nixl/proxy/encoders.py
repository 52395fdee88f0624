"""The proxy's encoders: a request's media shared out over them, and their answers.

Each share goes to the next encoder in turn, with `max_tokens` 1 (an
encoder-only instance runs the vision encoder, exports the outputs and answers
with `ec_transfer_params` saying where they are). An encoder that fails, or
does not answer within the timeout, is skipped for DOWN_FOR_S and the next one
tried: a stalled encoder would otherwise cost every request the timeout. At
most `concurrency` encoder requests are in flight over all requests, so one
request with many items waits its turn instead of flooding the encoders and the
proxy's connection pool (which PD and `/health` share).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any

import aiohttp
import prometheus_client

from ec_nixl.proxy.media import split_by_item
from ec_nixl.transfer_params import consumer_params

logger = logging.getLogger("ec_nixl.proxy")

DOWN_FOR_S = 5.0
# Encoder requests drop these: they only shape the text generated, and an encoder's one
# token is thrown away (tools and schemas can be large, and each share would carry them).
NOT_FOR_ENCODERS = (
    "max_completion_tokens", "stream_options", "tools", "tool_choice", "parallel_tool_calls",
    "response_format", "structured_outputs",
)  # fmt: skip


class Encoders:
    def __init__(
        self,
        urls: list[str],
        timeout_s: float,
        concurrency: int,
        registry: prometheus_client.CollectorRegistry,
    ) -> None:
        self.urls = urls
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._slots = asyncio.Semaphore(concurrency)
        self._turn = itertools.cycle(urls)
        self._down_until = dict.fromkeys(urls, 0.0)
        self._failures = prometheus_client.Counter(
            "ec_nixl_proxy_encoder_failures", "Encoder requests that failed or timed out",
            ["encoder"], registry=registry,
        )  # fmt: skip
        self._local_encodes = prometheus_client.Counter(
            "ec_nixl_proxy_local_encodes", "Requests PD encoded itself: no encoder answered",
            registry=registry,
        )  # fmt: skip

    async def encode(
        self, session: aiohttp.ClientSession, path: str, body: dict[str, Any], pd_name: str
    ) -> list[dict[str, Any] | None]:
        """Spread the request's images over the encoders (one share per image when there
        are several), telling them which PD will serve it (`pd_name`, its consumer_id):
        each share's `ec_transfer_params` ({} for a share without images), None for a
        share no encoder answered."""
        if pd_name:
            body = {**body, "ec_transfer_params": consumer_params(pd_name)}
        shares = split_by_item(body) if len(self.urls) > 1 else [body]
        return await asyncio.gather(*(self._encode_share(session, path, s) for s in shares))

    def _next(self) -> str | None:
        """Round-robin, skipping an encoder that failed in the last DOWN_FOR_S; None
        while all did."""
        now = time.monotonic()
        for _ in self.urls:
            encoder = next(self._turn)
            if self._down_until[encoder] <= now:
                return encoder
        return None

    async def _encode_share(
        self, session: aiohttp.ClientSession, path: str, body: dict[str, Any]
    ) -> dict[str, Any] | None:
        request = {**body, "max_tokens": 1, "stream": False}
        for key in NOT_FOR_ENCODERS:
            request.pop(key, None)
        for _ in self.urls:
            encoder = self._next()
            if encoder is None:
                break
            try:
                async with (
                    self._slots,
                    session.post(encoder + path, json=request, timeout=self._timeout) as reply,
                ):
                    if reply.status == 200:
                        return (await reply.json()).get("ec_transfer_params") or {}
                    # The request itself is bad: another encoder would say the same.
                    logger.warning("encoder %s answered %d", encoder, reply.status)
                    return None
            except (aiohttp.ClientError, TimeoutError) as exc:
                logger.warning(
                    "encoder %s failed (%r); skipping it for %.0f s", encoder, exc, DOWN_FOR_S
                )
                self._down_until[encoder] = time.monotonic() + DOWN_FOR_S
                self._failures.labels(encoder).inc()
        logger.warning("no encoder answered; PD will encode locally")
        self._local_encodes.inc()
        return None

"""The encoder's scheduler side of ECNixlConnector: whom each request's items are for.

Works on vLLM's `Request` objects by their attributes, without importing vLLM.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from ec_nixl.errors import RefusedError
from ec_nixl.transfer_params import make_params, parse_consumer

logger = logging.getLogger(__name__)


class ProducerScheduler:
    """The encoder's scheduler side: which PD each request's items are meant for (the
    proxy says so in the request's `ec_transfer_params`), and where the items are (the
    response's). Every call runs on vLLM's scheduler thread."""

    def __init__(
        self,
        encoder_id: str,
        describe: Callable[[list[Any]], dict[str, dict[str, Any]]] = lambda features: {},
    ) -> None:
        self.encoder_id = encoder_id
        # mm_features -> vLLM's per-item entries (`collect_ec_item_metadata`): the
        # response carries them beside our encoder id, for proxies that use them
        self._describe = describe
        self._consumers: dict[str, str] = {}  # request id -> the PD it is meant for ("": any)

    def note(self, request: Any) -> None:
        """A request is about to be scheduled: remember whom its items are for."""
        if request.request_id in self._consumers:
            return
        try:
            consumer = parse_consumer(request.ec_transfer_params)
        except RefusedError as exc:
            logger.warning("request %s: %s; announcing its items to no PD in particular",
                           request.request_id, exc)  # fmt: skip
            consumer = ""
        self._consumers[request.request_id] = consumer

    def uses(self, new_requests: Iterable[Any]) -> dict[str, str]:
        """mm_hash -> the PD to claim it for ("": none named), over this step's new requests."""
        return {
            feature.identifier: self._consumers.get(request.req_id, "")
            for request in new_requests
            for feature in request.mm_features
        }

    def finished(self, request: Any) -> dict[str, dict[str, Any]] | None:
        """What the encoder's response tells the proxy: where each item of the request is,
        and the PD it was announced to with a claim, if the request named one."""
        consumer = self._consumers.pop(request.request_id, "")
        hashes = [feature.identifier for feature in request.mm_features]
        if not hashes:
            return None
        params = make_params(self.encoder_id, hashes, claimed_for=consumer)
        for mm_hash, entry in self._describe(request.mm_features).items():
            params[mm_hash] = {**entry, **params[mm_hash]}
        return params

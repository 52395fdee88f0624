"""Pull items as soon as an encoder exports them, before their request reaches PD.

In the EPD flow the encoder answers the proxy, which then sends the request to
PD; PD's API server processes the images again (to place and hash them) before
its scheduler sees the request. That window is long enough for a pull, so a PD
that follows each encoder's event stream usually has the item in hand when the
request arrives and schedules it at once.

Every item an encoder exports is pulled, and a pull frees the encoder's copy:
so prefetch suits a PD that is the only consumer of its encoders (a PD that
prefetches another PD's item leaves that PD to encode it itself).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from ec_nixl.errors import ECNixlError
from ec_nixl.pool import EventKind
from ec_nixl.resolver import Resolver

logger = logging.getLogger(__name__)

RETRY_S = (0.5, 1.0, 2.0, 5.0)  # between attempts to follow a lost stream


class Prefetcher:
    """Follows each encoder's export events; calls `on_export(mm_hash, encoder_id)`."""

    def __init__(
        self,
        resolver: Resolver,
        encoders: dict[str, str],
        on_export: Callable[[str, str], None],
    ) -> None:
        self._resolver = resolver
        self._on_export = on_export
        self._stopped = threading.Event()
        for encoder_id, address in encoders.items():
            threading.Thread(
                target=self._follow, args=(encoder_id, address), daemon=True,
                name=f"ec-nixl-prefetch-{encoder_id}",
            ).start()  # fmt: skip

    def _follow(self, encoder_id: str, address: str) -> None:
        failures = 0
        while not self._stopped.is_set():
            try:
                for event in self._resolver.client(address).watch():
                    failures = 0
                    if event.kind is EventKind.EXPORTED:
                        self._on_export(event.mm_hash, encoder_id)
            except ECNixlError as exc:
                if failures == 0:
                    logger.info("lost the export events of %s: %s; retrying", encoder_id, exc)
            except Exception:  # a thread boundary: never let one event end the stream
                logger.exception("prefetch from %s failed", encoder_id)
            self._stopped.wait(RETRY_S[min(failures, len(RETRY_S) - 1)])
            failures += 1

    def close(self) -> None:
        self._stopped.set()

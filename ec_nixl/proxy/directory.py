"""Which encoder holds which item, kept from the encoders' export events.

The proxy asks it before sending a request's media to an encoder: an item an
encoder still holds (an image repeated across the turns of a chat) is not
encoded again; PD pulls it from its holder. An entry goes with the item's
EVICTED event, and all of an encoder's entries go when its event stream is
lost (a new stream starts with everything the encoder holds). An entry can
still be a moment stale (an eviction on its way): PD then fails that pull
and falls back as after any failed pull.
"""

from __future__ import annotations

import threading

from ec_nixl.control.client import ExportClients
from ec_nixl.control.messages import Announcement, EventKind
from ec_nixl.control.security import Security
from ec_nixl.control.watch import ExportWatcher

WATCHER_ID = "ec-nixl-proxy"  # the consumer id the proxy watches under: it never pulls


class EncoderDirectory:
    def __init__(self, encoders: dict[str, str], security: Security = Security()) -> None:
        """`encoders`: encoder id (as PD's config names it) -> its control address."""
        self._lock = threading.Lock()
        self._holders: dict[str, str] = {}  # mm_hash -> encoder id
        self._watcher = ExportWatcher(
            ExportClients(WATCHER_ID, security),
            encoders,
            self._on_event,
            on_connect=self._forget,
            on_lost=self._forget,
        )

    def holder(self, mm_hash: str) -> str | None:
        """The encoder that holds the item, as far as its events say."""
        return self._holders.get(mm_hash)

    def _on_event(self, event: Announcement, encoder_id: str) -> None:
        with self._lock:
            if event.kind is EventKind.EXPORTED:
                self._holders[event.mm_hash] = encoder_id
            elif event.kind is EventKind.EVICTED and self._holders.get(event.mm_hash) == encoder_id:
                del self._holders[event.mm_hash]

    def _forget(self, encoder_id: str) -> None:
        with self._lock:
            self._holders = {h: e for h, e in self._holders.items() if e != encoder_id}

    def close(self) -> None:
        self._watcher.close()

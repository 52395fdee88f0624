"""Follow each encoder's export events, so PD knows what is ready where without asking.

Two things hang on them: a request sent to PD at the same time as to its
encoder waits for its items to be announced (`ec_transfer_params` "*"), and,
with `prefetch`, PD pulls every exported item before its request arrives. A
prefetching PD asks for claims: each announcement then carries a lease for all
of its ranks, and the pull is one READ per rank. On (re)connecting, an encoder
first lists everything it holds (without claims), so PD knows what it may pull
for a request, including what was exported while a stream was down; it
prefetches only what is exported from then on.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from ec_nixl.control.client import EventStream, ExportClients
from ec_nixl.control.messages import Announcement
from ec_nixl.errors import ECNixlError

logger = logging.getLogger(__name__)

RETRY_S = (0.5, 1.0, 2.0, 5.0)  # between attempts to follow a lost stream


class ExportWatcher:
    """Calls `on_event(event, encoder_id)` for each event of each encoder, from one
    thread per encoder, after `on_connect(encoder_id)` once each new stream is open
    (it starts with everything the encoder holds), and `on_lost(encoder_id)` when a
    stream ends; with `claim`, announcements carry leases for `readers` READs. Events
    of a kind this version does not know are skipped and passed to `on_unknown`."""

    def __init__(
        self,
        clients: ExportClients,
        encoders: dict[str, str],
        on_event: Callable[[Announcement, str], None],
        on_connect: Callable[[str], None] = lambda encoder_id: None,
        on_lost: Callable[[str], None] = lambda encoder_id: None,
        on_unknown: Callable[[int], None] = lambda kind: None,
        *,
        claim: bool = False,
        readers: int = 1,
    ) -> None:
        self._clients = clients
        self._on_event = on_event
        self._on_connect = on_connect
        self._on_lost = on_lost
        self._on_unknown = on_unknown
        self._claim = claim
        self._readers = readers
        self._streams: dict[str, EventStream] = {}  # encoder id -> its stream now
        self._stopped = threading.Event()
        for encoder_id, address in encoders.items():
            threading.Thread(
                target=self._follow, args=(encoder_id, address), daemon=True,
                name=f"ec-nixl-watch-{encoder_id}",
            ).start()  # fmt: skip

    def _follow(self, encoder_id: str, address: str) -> None:
        failures = 0
        while not self._stopped.is_set():
            connected = False
            try:
                client = self._clients(address)
                consumer = self._clients.consumer_id
                stream = client.watch(
                    consumer, claim=self._claim, readers=self._readers, on_unknown=self._on_unknown
                )
                self._streams[encoder_id] = stream
                if self._stopped.is_set():  # closed meanwhile
                    stream.close()
                stream.wait_open()
                self._on_connect(encoder_id)
                connected = True
                for event in stream:
                    failures = 0
                    self._on_event(event, encoder_id)
            except ECNixlError as exc:
                if failures == 0:
                    logger.info("lost the export events of %s: %s; retrying", encoder_id, exc)
            except Exception:  # a thread boundary: never let one event end the stream
                logger.exception("following the events of %s failed", encoder_id)
            if connected:
                self._on_lost(encoder_id)
            self._stopped.wait(RETRY_S[min(failures, len(RETRY_S) - 1)])
            failures += 1

    def close(self) -> None:
        """Stop following: the encoders stop announcing (and claiming) to this PD."""
        self._stopped.set()
        for stream in list(self._streams.values()):
            stream.close()

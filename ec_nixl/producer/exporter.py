"""The producer side in one object: arena, NIXL agent, export pool and export service.

Consumers READ exported slots directly. A READ over UCX only completes while
this side also drives NIXL, so a progress loop polls NIXL while any lease is
live and sleeps otherwise; it also takes the notifications that consumers
attach to their READs: each counts one reader of a lease done (no extra round
trip).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from ec_nixl.arena import Arena
from ec_nixl.config import DEFAULT_LEASE_S, DEFAULT_MAX_WATCHERS
from ec_nixl.control.messages import EventKind, dtype_name, parse_read_notification
from ec_nixl.control.security import Security
from ec_nixl.metrics import Stats
from ec_nixl.nixl_agent import POLL_INTERVAL_S, TransferAgent
from ec_nixl.producer.export_service import ExportServer, ExportServicer
from ec_nixl.producer.fanout import EventHub
from ec_nixl.producer.metrics_endpoint import MetricsServer
from ec_nixl.producer.pool import ExportedItem, ExportPool, Lease, PoolEvent

logger = logging.getLogger(__name__)

EXPIRY_SWEEP_S = 0.5
ACTIVE_S = 0.02
IDLE_POLL_S = 0.005


@dataclass(frozen=True)
class ExporterConfig:
    address: str = "127.0.0.1:0"
    capacity_bytes: int = 1 << 30
    device: str = "cpu"
    lease_s: float = DEFAULT_LEASE_S
    compatibility_hash: str = ""
    security: Security = field(default_factory=Security)
    # HOST:PORT for a Prometheus /metrics endpoint of our own; None: no endpoint.
    metrics_address: str | None = None
    max_watchers: int = DEFAULT_MAX_WATCHERS


class Exporter:
    def __init__(self, config: ExporterConfig) -> None:
        self.config = config
        self.epoch = secrets.randbits(63)
        self.arena = Arena(config.capacity_bytes, config.device)
        self.agent = TransferAgent("exporter")
        self.agent.register(self.arena.buffer)
        loop = asyncio.new_event_loop()  # the export service's: see ExportServer
        self.stats = Stats()
        self.events = EventHub(loop, self.stats, config.max_watchers)
        self.pool = ExportPool(
            self.arena,
            lease_s=config.lease_s,
            on_event=self._on_event,
            on_lease_end=self._on_lease_end,
        )
        self.metrics = (
            MetricsServer(self.stats, config.metrics_address) if config.metrics_address else None
        )
        self._leased = threading.Event()
        self._stopping = threading.Event()
        servicer = ExportServicer(
            self.pool,
            self.agent,
            epoch=self.epoch,
            compatibility_hash=config.compatibility_hash,
            events=self.events,
            stats=self.stats,
            on_leased=self._on_leased,
        )
        self._server = ExportServer(loop, servicer, config.address, config.security)
        self.port = self._server.port
        self._progress = threading.Thread(
            target=self._progress_loop, name="ec-nixl-progress", daemon=True
        )
        self._progress.start()
        host = config.address.rsplit(":", 1)[0]
        self.address = f"{host}:{self.port}"
        logger.info(
            "exporter %s serving on %s, arena %d MiB on %s",
            self.agent.name,
            self.address,
            config.capacity_bytes >> 20,
            self.arena.device,
        )

    def export(self, mm_hash: str, tensor: torch.Tensor, target: str = "") -> ExportedItem:
        """Copy `tensor` into the arena under `mm_hash` (announced with a claim for
        consumer `target`, if given); RefusedError for a non-float dtype."""
        dtype_name(tensor.dtype)
        return self.pool.export(mm_hash, tensor, target)

    def encoding(self, mm_hashes: Iterable[str]) -> None:
        """Tell watchers these items are about to be encoded (their EXPORTED follows)."""
        for mm_hash in mm_hashes:
            self.events.publish(PoolEvent(EventKind.ENCODING, mm_hash, 0))

    def _on_event(self, event: PoolEvent) -> None:
        self.events.publish(event)
        if event.again:
            return
        if event.kind is EventKind.EXPORTED:
            self.stats.count("items_exported")
            self.stats.count("bytes_exported", event.length)
        else:
            self.stats.count("evictions")
        self.stats.set("pool_bytes_in_use", self.arena.bytes_used)

    def _on_leased(self) -> None:
        self.stats.set("leases_live", self.pool.live_leases)
        self._leased.set()  # the progress loop polls NIXL while leases are live

    def _on_lease_end(self, lease: Lease, how: str) -> None:
        self.stats.count("leases_ended", label=how)
        if how == "read":
            self.stats.count("items_read", label=lease.consumer or "unnamed")
        self.stats.set("leases_live", self.pool.live_leases)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        self._stopping.set()
        self._leased.set()
        self._server.close()
        self._progress.join()

    def _progress_loop(self) -> None:
        """Poll NIXL while leases are live (it runs without its progress thread, and a
        READ may need this side to call into it): every POLL_INTERVAL_S for ACTIVE_S
        after a lease or a READ's notification (a READ follows its lease within
        milliseconds), then ever less often, up to IDLE_POLL_S apart: claims that a PD
        never reads cost next to nothing, and a READ that comes late waits at most that."""
        next_sweep = active_until = 0.0
        interval = POLL_INTERVAL_S
        while not self._stopping.is_set():
            self._leased.wait(interval if self.pool.live_leases else EXPIRY_SWEEP_S)
            now = time.monotonic()
            if self._leased.is_set():
                self._leased.clear()
                active_until = now + ACTIVE_S
            for message in self.agent.progress():
                active_until = now + ACTIVE_S
                lease_ids = parse_read_notification(message)
                if lease_ids:
                    self.pool.finish_reads(lease_ids)
            interval = POLL_INTERVAL_S if now < active_until else min(2 * interval, IDLE_POLL_S)
            if now >= next_sweep:
                self.pool.expire()
                next_sweep = time.monotonic() + EXPIRY_SWEEP_S

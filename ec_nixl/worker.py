"""Worker-side parts of ECNixlConnector: what runs next to the model.

Producer (encoder instance): owns the Exporter, whose arena lives on the
worker's device; `save` copies each fresh encoder output into it. `step`, before
the encoder runs, exports outputs that this step reuses from the encoder cache
(vLLM does not re-encode those, so `save` never sees them) and tells watchers
which items it is about to encode. An item meant for a named PD is
announced to it with a claim. Only rank 0 exports: every
tensor-parallel rank holds the same encoder output.

Consumer (PD instance): owns a Receiver (which READs from the configured
encoders under the leases its scheduler took for every rank) and serves the
worker service on a local socket that its scheduler finds from the engine id
and rank.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

import torch

from ec_nixl.arena import Arena
from ec_nixl.connector_config import ConnectorConfig
from ec_nixl.control.worker_link import Load, WorkerServer, worker_address
from ec_nixl.errors import ECNixlError
from ec_nixl.exporter import Exporter, ExporterConfig
from ec_nixl.receiver import ModelShape, Receiver
from ec_nixl.resolver import Resolver

logger = logging.getLogger(__name__)


class ProducerWorker:
    def __init__(self, config: ConnectorConfig, fingerprint: str, device: torch.device) -> None:
        self.exporter = Exporter(
            ExporterConfig(
                address=config.control_address,
                capacity_bytes=config.pool_bytes,
                device=str(device),
                lease_s=config.lease_s,
                compatibility_hash=fingerprint,
                security=config.security,
                metrics_address=config.metrics_address,
            )
        )
        logger.info("encoder %s exports on %s", config.encoder_id, self.exporter.address)

    def save(self, encoder_cache: dict[str, torch.Tensor], mm_hash: str, target: str) -> None:
        try:
            self.exporter.export(mm_hash, encoder_cache[mm_hash], target)
        except ECNixlError as exc:
            # The PD side gets NOT_FOUND and encodes locally.
            logger.warning("not exporting %s: %s", mm_hash, exc)

    def step(self, encoder_cache: dict[str, torch.Tensor], uses: dict[str, str]) -> None:
        """Before the encoder runs, the items this step's new requests use: those in the
        encoder cache are exported if not held (announced again to the PD they are meant
        for if held); the others are about to be encoded, and watchers are told so."""
        self.exporter.encoding(h for h in uses if h not in encoder_cache)
        for mm_hash, target in uses.items():
            if mm_hash in encoder_cache and (target or mm_hash not in self.exporter.pool):
                self.save(encoder_cache, mm_hash, target)

    def close(self) -> None:
        self.exporter.close()


class ConsumerWorker:
    def __init__(
        self,
        config: ConnectorConfig,
        fingerprint: str,
        model: ModelShape,
        engine_id: str,
        rank: int,
        device: torch.device,
    ) -> None:
        resolver = Resolver(
            consumer_id=f"pd-{engine_id}-{rank}",
            compatibility_hash=fingerprint,
            security=config.security,
        )
        arena = Arena(config.receive_bytes, device)
        self.receiver = Receiver(arena, resolver, config.encoders, model)
        self._timeout_s = config.pull_timeout_s
        self.address = worker_address(engine_id, rank)
        self._server = WorkerServer(self.receiver, self.address)
        threading.Thread(target=self.receiver.meet_encoders, daemon=True).start()
        logger.info("PD worker %d receives pulls on %s", rank, self.address)

    def load(
        self,
        encoder_cache: dict[str, torch.Tensor],
        loads: Iterable[Load],
        evicted: Iterable[tuple[str, int]],
    ) -> None:
        """Free the slots of the pulls vLLM evicted, then lend it the pulled copies this
        step loads (each is read again if this worker lacks it: `Receiver.lend`)."""
        self.receiver.release(evicted)
        for load in loads:
            encoder_cache[load.mm_hash] = self.receiver.lend(load, self._timeout_s)

    def close(self) -> None:
        self._server.stop()
        self.receiver.resolver.close()

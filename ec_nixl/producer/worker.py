"""The encoder's worker side, next to the vision encoder: owns the Exporter, whose arena
lives on the worker's device; `save` copies each fresh encoder output into it. `step`,
before the encoder runs, exports outputs that this step reuses from the encoder cache
(vLLM does not re-encode those, so `save` never sees them) and tells watchers which
items it is about to encode. An item meant for a named PD is announced to it with a
claim. Only rank 0 exports: every tensor-parallel rank holds the same encoder output.
"""

from __future__ import annotations

import logging

import torch

from ec_nixl.config import ConnectorConfig
from ec_nixl.errors import ECNixlError
from ec_nixl.producer.exporter import Exporter, ExporterConfig

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
                max_watchers=config.max_watchers,
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

"""A PD worker (one per tensor-parallel rank), next to the model: owns a Receiver
(which READs from the configured encoders under the leases its scheduler took for
every rank) and serves the worker link on a local socket that its scheduler finds
from the engine id and rank.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch

from ec_nixl.arena import Arena
from ec_nixl.config import ConnectorConfig
from ec_nixl.consumer.receiver import ModelShape, Receiver
from ec_nixl.consumer.resolver import Resolver
from ec_nixl.consumer.worker_link import Load, WorkerServer, worker_address

logger = logging.getLogger(__name__)


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
        logger.info("PD worker %d receives pulls on %s", rank, self.address)

    def load(
        self,
        encoder_cache: dict[str, torch.Tensor],
        loads: Iterable[Load],
        evicted: Iterable[tuple[str, int]],
    ) -> None:
        """Free the slots of the pulls vLLM evicted, then lend it the pulled copies this
        step loads (each is read again if this worker lacks it: `Receiver.lend`)."""
        self.receiver.free_evicted(evicted)
        for load in loads:
            encoder_cache[load.mm_hash] = self.receiver.lend(load, self._timeout_s)

    def close(self) -> None:
        self._server.stop()
        self.receiver.resolver.close()

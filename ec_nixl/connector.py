"""ECNixlConnector: the thin adapter between vLLM's EC connector API and ec_nixl.

Load it with
    --ec-transfer-config '{"ec_connector": "ECNixlConnector",
                           "ec_connector_module_path": "ec_nixl.connector",
                           "ec_role": "ec_producer" | "ec_consumer" | "ec_both",
                           "ec_connector_extra_config": {...}}'
It routes each hook to the role's side: `producer.scheduler` and `producer.worker`
on an encoder, `consumer.scheduler` (decisions per request, over the item table of
`consumer.items`) and `consumer.worker` on a PD; `control.watch` follows what the
encoders announce.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.ec_transfer.ec_connector.base import (
    ECConnectorBase,
    ECConnectorMetadata,
    ECConnectorRole,
)
from vllm.distributed.ec_transfer.ec_connector.metrics import (
    ECConnectorPromMetrics,
    ECConnectorStats,
)
from vllm.distributed.ec_transfer.ec_connector.utils import (
    PlaceholderMetadataResolver,
    collect_ec_item_metadata,
)

from ec_nixl.config import ConnectorConfig
from ec_nixl.consumer.items import ItemTable
from ec_nixl.consumer.resolver import Resolver
from ec_nixl.consumer.scheduler import ConsumerScheduler
from ec_nixl.consumer.worker_link import Load, WorkerClient, worker_address
from ec_nixl.control.watch import ExportWatcher
from ec_nixl.errors import ConfigError
from ec_nixl.metrics import PromMetrics, merge, summary
from ec_nixl.producer.scheduler import ProducerScheduler

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

    from ec_nixl.consumer.worker import ConsumerWorker
    from ec_nixl.producer.worker import ProducerWorker

logger = logging.getLogger(__name__)


@dataclass
class ECNixlConnectorMetadata(ECConnectorMetadata):
    # consumer: pulled copies to lend from the receive arena to the encoder cache, and
    # the (mm_hash, pull id) of those vLLM evicted from it (their slots are freed)
    loads: list[Load] = field(default_factory=list)
    evicted: list[tuple[str, int]] = field(default_factory=list)
    # producer: items this step uses (export those served from the encoder cache), each
    # with the PD it is meant for ("": none named), which gets a claim with its announcement
    uses: dict[str, str] = field(default_factory=dict)


class ECNixlConnectorStats(ECConnectorStats):
    """The PD scheduler's counts (see ec_nixl.metrics) on their way to vLLM's metrics."""

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: ECConnectorStats) -> ECConnectorStats:
        return ECNixlConnectorStats(merge(self.data, other.data))

    def reduce(self) -> dict[str, int | float]:
        return summary(self.data)

    def is_empty(self) -> bool:
        return not self.data


class ECNixlPromMetrics(ECConnectorPromMetrics):
    """ec_nixl's metrics on vLLM's own /metrics, one series per engine."""

    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        kinds = {"counter": self._counter_cls, "gauge": self._gauge_cls}
        kinds["histogram"] = self._histogram_cls
        self._metrics = PromMetrics(kinds, labelnames)

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        self._metrics.observe(transfer_stats_data, self.per_engine_labelvalues[engine_idx])


def fingerprint(vllm_config: VllmConfig) -> str:
    """What both sides must agree on: mm_hashes include the model string."""
    model = vllm_config.model_config
    return f"model={model.model} dtype={str(model.dtype).removeprefix('torch.')}"


def _log_like_vllm() -> None:
    """Our records go where vLLM's go, at its level, in its format."""
    ours, vllms = logging.getLogger("ec_nixl"), logging.getLogger("vllm")
    if not ours.handlers and vllms.handlers:
        for handler in vllms.handlers:
            ours.addHandler(handler)
        ours.setLevel(vllms.level)
        ours.propagate = False


class ECNixlConnector(ECConnectorBase):
    def __init__(self, vllm_config: VllmConfig, role: ECConnectorRole) -> None:
        super().__init__(vllm_config, role)
        _log_like_vllm()
        transfer = vllm_config.ec_transfer_config
        self.config = ConnectorConfig.parse(transfer.ec_role, transfer.ec_connector_extra_config)
        self._vllm_config = vllm_config
        self._engine_id = transfer.engine_id
        self._fingerprint = fingerprint(vllm_config)
        parallel = vllm_config.parallel_config
        if parallel.pipeline_parallel_size > 1:
            raise ConfigError("ECNixlConnector does not support pipeline parallelism yet")
        self._consumer: ConsumerScheduler | None = None
        self._producer: ProducerScheduler | None = None
        self._watcher: ExportWatcher | None = None
        self._producer_worker: ProducerWorker | None = None
        self._consumer_worker: ConsumerWorker | None = None
        if role == ECConnectorRole.SCHEDULER:  # once per instance: its scheduler
            for risk in self.config.risks:
                logger.warning("ECNixlConnector: %s", risk)
        if role == ECConnectorRole.SCHEDULER and self.config.is_consumer:
            self._start_consumer(parallel.tensor_parallel_size)
        if role == ECConnectorRole.SCHEDULER and self.config.is_producer:
            resolver = PlaceholderMetadataResolver(vllm_config.model_config)
            self._producer = ProducerScheduler(
                self.config.encoder_id,
                lambda features: collect_ec_item_metadata(features, resolver),
            )

    def _start_consumer(self, world_size: int) -> None:
        resolver = Resolver(
            consumer_id=self.config.consumer_id or f"pd-{self._engine_id}",
            compatibility_hash=self._fingerprint,
            security=self.config.security,
        )
        workers = [WorkerClient(worker_address(self._engine_id, r)) for r in range(world_size)]
        items = ItemTable(
            resolver,
            self.config.encoders,
            workers,
            self.config.pull_timeout_s,
            receive_bytes=self.config.receive_bytes,
        )
        self._consumer = ConsumerScheduler(
            items,
            self.config.encoders,
            prefetch=self.config.prefetch,
            encode_on_failure=self.config.load_failure_policy == "encode",
        )
        self._watcher = ExportWatcher(
            resolver.clients,
            self.config.encoders,
            self._consumer.on_event,
            self._consumer.on_connect,
            on_unknown=lambda kind: self._consumer.stats.count("unknown_events"),
            claim=self.config.prefetch,
            readers=world_size,
        )

    # ---- worker side -------------------------------------------------------------

    def start_worker_services(self) -> None:
        # Here, not at the top: the worker side loads NIXL, the scheduler's process must not.
        from vllm.distributed import get_tensor_model_parallel_rank
        from vllm.platforms import current_platform

        from ec_nixl.consumer.receiver import ModelShape
        from ec_nixl.consumer.worker import ConsumerWorker
        from ec_nixl.producer.worker import ProducerWorker

        rank = get_tensor_model_parallel_rank()
        device = torch.device(current_platform.device_type)
        if current_platform.is_cuda_alike():
            device = torch.device(device.type, torch.cuda.current_device())
        if self.config.is_producer and rank == 0:
            self._producer_worker = ProducerWorker(self.config, self._fingerprint, device)
        if self.config.is_consumer:
            model = self._vllm_config.model_config
            vision = getattr(model.hf_config, "vision_config", None)
            levels = len(getattr(vision, "deepstack_visual_indexes", None) or ())
            shape = ModelShape.of(model.dtype, model.get_inputs_embeds_size(), levels)
            self._consumer_worker = ConsumerWorker(
                self.config, self._fingerprint, shape, self._engine_id, rank, device
            )

    def save_caches(self, encoder_cache: dict[str, torch.Tensor], mm_hash: str, **kwargs) -> None:
        if self._producer_worker is not None:
            metadata = self._connector_metadata  # bound while the encoder runs
            bound = isinstance(metadata, ECNixlConnectorMetadata)
            target = metadata.uses.get(mm_hash, "") if bound else ""
            self._producer_worker.save(encoder_cache, mm_hash, target)

    def start_save_caches(self, **kwargs: Any) -> None:
        if self._producer_worker is not None:
            self._producer_worker.step(kwargs.get("encoder_cache") or {}, self._metadata().uses)

    def start_load_caches(self, encoder_cache: dict[str, torch.Tensor], **kwargs) -> None:
        if self._consumer_worker is not None:
            metadata = self._metadata()
            self._consumer_worker.load(encoder_cache, metadata.loads, metadata.evicted)

    def _metadata(self) -> ECNixlConnectorMetadata:
        metadata = self._get_connector_metadata()
        assert isinstance(metadata, ECNixlConnectorMetadata)
        return metadata

    # ---- scheduler side ----------------------------------------------------------

    def has_cache_item(self, identifier: str) -> bool:
        return self._consumer is not None and self._consumer.has_item(identifier)

    def ensure_cache_available(self, request: Request, num_computed_tokens: int) -> bool:
        if self._producer is not None:
            self._producer.note(request)
        return self._consumer is None or self._consumer.ensure_available(
            request, num_computed_tokens
        )

    def update_state_after_alloc(self, request: Request, index: int) -> None:
        if self._consumer is not None:
            self._consumer.on_alloc(request.mm_features[index].identifier)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> ECConnectorMetadata:
        metadata = ECNixlConnectorMetadata()
        if self._consumer is not None:
            if scheduler_output.total_num_scheduled_tokens == 0:
                self._consumer.idle_step()
            freed = list(scheduler_output.free_encoder_mm_hashes)
            metadata.evicted = self._consumer.on_freed(freed)
            metadata.loads = self._consumer.take_loads()
        if self._producer is not None:
            metadata.uses = self._producer.uses(scheduler_output.scheduled_new_reqs)
        return metadata

    def take_unavailable_requests(self) -> set[str]:
        return self._consumer.take_unavailable() if self._consumer is not None else set()

    def request_finished(self, request: Request) -> tuple[bool, dict[str, Any] | None]:
        if self._consumer is not None:
            self._consumer.request_finished(request)
        if self._producer is not None:
            return False, self._producer.finished(request)
        return False, None

    def get_ec_connector_stats(self) -> ECConnectorStats | None:
        if self._consumer is None:
            return None
        data = self._consumer.stats.take()
        return ECNixlConnectorStats(data) if data else None

    @classmethod
    def build_ec_connector_stats(cls, data: dict[str, Any] | None = None) -> ECConnectorStats:
        return ECNixlConnectorStats(data or {})

    @classmethod
    def build_prom_metrics(
        cls, vllm_config, metric_types, labelnames, per_engine_labelvalues
    ) -> ECConnectorPromMetrics:
        return ECNixlPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        for part in (self._watcher, self._producer_worker, self._consumer_worker):
            if part is not None:
                part.close()
        if self._consumer is not None:
            self._consumer.close()

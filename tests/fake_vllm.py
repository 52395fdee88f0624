"""The smallest vLLM source tree that the compatibility check passes: each test of a
break writes it to a folder, changes one thing and sees the check name that thing.

Shaped like vLLM 0.34's: the names ec_nixl imports (a star re-export, a lazy module
`__getattr__`), the classes it extends and reads, the V2 runners' caller of the
hooks, and `collect_ec_item_metadata` as 0.33 wrote it.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

EC = "vllm/distributed/ec_transfer/ec_connector"
BASE = f"{EC}/base.py"
UTILS = f"{EC}/utils.py"
OUTPUT = "vllm/v1/core/sched/output.py"
V2_CONNECTOR = "vllm/v1/worker/gpu/ec_connector.py"
GPU_WORKER = "vllm/v1/worker/gpu_worker.py"

RELEASE = {
    "vllm/__init__.py": "",
    "vllm/config/__init__.py": """
        from vllm.config.ec_transfer import ECTransferConfig
        from vllm.config.vllm import ModelConfig, ParallelConfig, VllmConfig
        """,
    "vllm/config/ec_transfer.py": """
        class ECTransferConfig:
            ec_role: str
            ec_connector_extra_config: dict
            engine_id: str
        """,
    "vllm/config/vllm.py": """
        class ModelConfig:
            model: str
            dtype: str

            def __post_init__(self):
                self.hf_config = None

            def get_inputs_embeds_size(self) -> int:
                return 0


        class ParallelConfig:
            pipeline_parallel_size: int = 1
            tensor_parallel_size: int = 1


        class VllmConfig:
            model_config: ModelConfig
            parallel_config: ParallelConfig
            ec_transfer_config: object = None
        """,
    "vllm/distributed/__init__.py": "from .parallel_state import *\n",
    "vllm/distributed/parallel_state.py": """
        def get_tensor_model_parallel_rank() -> int:
            return 0
        """,
    BASE: """
        import enum
        from abc import ABC, abstractmethod


        class ECConnectorRole(enum.Enum):
            SCHEDULER = 0
            WORKER = 1


        class ECConnectorMetadata(ABC):  # noqa: B024
            pass


        class ECConnectorBase(ABC):
            def __init__(self, vllm_config, role):
                self._connector_metadata = None

            def shutdown(self):
                return None

            def _get_connector_metadata(self):
                return self._connector_metadata

            @abstractmethod
            def start_load_caches(self, encoder_cache, **kwargs):
                pass

            @abstractmethod
            def save_caches(self, encoder_cache, mm_hash, **kwargs):
                pass

            def get_ec_connector_stats(self):
                return None

            @abstractmethod
            def has_cache_item(self, identifier):
                pass

            def ensure_cache_available(self, request, num_computed_tokens):
                return True

            def start_save_caches(self, **kwargs):
                return

            def start_worker_services(self):
                return

            def take_unavailable_requests(self):
                return set()

            @abstractmethod
            def update_state_after_alloc(self, request, index):
                pass

            @abstractmethod
            def build_connector_meta(self, scheduler_output):
                pass

            def request_finished(self, request):
                return False, None

            @classmethod
            def build_ec_connector_stats(cls, data=None):
                return None

            @classmethod
            def build_prom_metrics(
                cls, vllm_config, metric_types, labelnames, per_engine_labelvalues
            ):
                return None
        """,
    f"{EC}/metrics.py": """
        from dataclasses import dataclass, field


        @dataclass
        class ECConnectorStats:
            data: dict = field(default_factory=dict)

            def reset(self):
                pass

            def aggregate(self, other):
                return self

            def reduce(self):
                return {}

            def is_empty(self):
                return True


        class ECConnectorPromMetrics:
            def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues):
                self._gauge_cls = metric_types["gauge"]
                self._counter_cls = metric_types["counter"]
                self._histogram_cls = metric_types["histogram"]
                self.per_engine_labelvalues = per_engine_labelvalues

            def observe(self, transfer_stats_data, engine_idx=0):
                pass
        """,
    f"{EC}/factory.py": """
        class ECConnectorFactory:
            @classmethod
            def register_connector(cls, name, module_path, class_name):
                pass
        """,
    UTILS: """
        from typing import Any

        import torch

        from vllm.utils.collection_utils import is_list_of


        class PlaceholderMetadataResolver:
            def __init__(self, model_config):
                self._model_config = model_config

            def fields_for(self, modality):
                return set()


        def collect_ec_item_metadata(
            mm_features: "list[MultiModalFeatureSpec]",
            resolver: PlaceholderMetadataResolver,
        ) -> dict[str, dict[str, Any]]:
            items: dict[str, dict[str, Any]] = {}
            for index, feature in enumerate(mm_features):
                metadata: dict[str, Any] = {}
                wanted = resolver.fields_for(feature.modality)
                if feature.data is not None:
                    for key, value in feature.data.get_data().items():
                        if key not in wanted:
                            continue
                        if isinstance(value, torch.Tensor):
                            metadata[key] = torch.atleast_1d(value).tolist()
                        elif is_list_of(value, (int, float)):
                            metadata[key] = value
                entry = items.setdefault(
                    feature.identifier, {"modality": feature.modality, "item_indices": []}
                )
                entry["metadata"] = metadata
                entry["item_indices"].append(index)
            return items
        """,
    "vllm/platforms/__init__.py": """
        def __getattr__(name):
            if name == "current_platform":
                from vllm.platforms.interface import Platform

                return Platform()
            raise AttributeError(name)
        """,
    "vllm/platforms/interface.py": """
        class Platform:
            device_type: str = "cpu"

            def is_cuda_alike(self) -> bool:
                return False
        """,
    "vllm/multimodal/inputs.py": """
        from dataclasses import dataclass


        @dataclass
        class PlaceholderRange:
            offset: int
            length: int

            def get_num_embeds(self) -> int:
                return self.length


        @dataclass
        class MultiModalFeatureSpec:
            data: object
            modality: str
            identifier: str
            mm_position: PlaceholderRange
        """,
    OUTPUT: """
        from dataclasses import dataclass


        @dataclass
        class NewRequestData:
            req_id: str
            mm_features: list


        @dataclass
        class SchedulerOutput:
            scheduled_new_reqs: list
            total_num_scheduled_tokens: int
            free_encoder_mm_hashes: list
            finished_req_ids: set
            ec_connector_metadata: object = None
        """,
    "vllm/v1/request.py": """
        class Request:
            def __init__(self, request_id, mm_features, ec_transfer_params=None):
                self.request_id = request_id
                self.mm_features = mm_features
                self.ec_transfer_params = ec_transfer_params
        """,
    "vllm/v1/core/sched/scheduler.py": """
        class Scheduler:
            def schedule(self, request, output):
                self.ec_connector.has_cache_item(request.mm_features[0].identifier)
                self.ec_connector.ensure_cache_available(request, 0)
                self.ec_connector.update_state_after_alloc(request, 0)
                self.ec_connector.build_connector_meta(output)
                self.ec_connector.take_unavailable_requests()
                self.ec_connector.request_finished(request)
        """,
    V2_CONNECTOR: """
        from vllm.distributed.ec_transfer import get_ec_transfer


        class ActiveECConnector:
            def __init__(self, encoder_cache):
                self.encoder_cache = encoder_cache
                self.ec_connector = get_ec_transfer()

            def step(self, scheduler_output, forward):
                ec_connector = self.ec_connector
                ec_connector.bind_connector_metadata(scheduler_output.ec_connector_metadata)
                ec_connector.start_save_caches(encoder_cache=self.encoder_cache)
                ec_connector.start_load_caches(self.encoder_cache)
                cached = set(self.encoder_cache)
                forward()
                for mm_hash in self.encoder_cache.keys() - cached:
                    ec_connector.save_caches(encoder_cache=self.encoder_cache, mm_hash=mm_hash)
                ec_connector.get_finished(scheduler_output.finished_req_ids)
                ec_connector.build_connector_worker_meta()
                ec_connector.clear_connector_metadata()
        """,
    GPU_WORKER: """
        from vllm.distributed.ec_transfer import get_ec_transfer, has_ec_transfer


        class Worker:
            def load_model(self):
                if has_ec_transfer():
                    get_ec_transfer().start_worker_services()
        """,
}


def write_release(root: Path, changes: dict[str, str | None] | None = None) -> Path:
    """The tree under `root`, with `changes` (path -> new source, or None: no such file)."""
    files = {**RELEASE, **(changes or {})}
    for path, source in files.items():
        if source is not None:
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).write_text(textwrap.dedent(source).lstrip())
    return root


def edit(path: str, old: str, new: str) -> dict[str, str]:
    """A change to one file of the tree: `old` (once, exactly) replaced by `new`."""
    source = textwrap.dedent(RELEASE[path])
    assert source.count(old) == 1, f"{old!r} is not once in {path}"
    return {path: source.replace(old, new)}

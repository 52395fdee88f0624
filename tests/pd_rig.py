"""A PD scheduler for tests: real vLLM Requests, two worker ranks (tensor parallel 2),
each a real worker service on a local socket with real NIXL READs behind it, and an
exporter's events."""

from __future__ import annotations

import threading
import time

import torch
from vllm.multimodal.inputs import MultiModalFeatureSpec, MultiModalKwargsItem, PlaceholderRange
from vllm.sampling_params import SamplingParams
from vllm.v1.request import Request

from ec_nixl.arena import Arena
from ec_nixl.consumer.items import ItemTable
from ec_nixl.consumer.pull_state import PullState
from ec_nixl.consumer.receiver import ModelShape, Receiver
from ec_nixl.consumer.resolver import Resolver
from ec_nixl.consumer.scheduler import ConsumerScheduler
from ec_nixl.consumer.worker_link import Load, WorkerClient, WorkerServer
from ec_nixl.control.client import ExportClients
from ec_nixl.control.watch import ExportWatcher
from integration.exporter_process import TensorSpec

MiB = 1 << 20


def serve_rank(tmp_path_factory, producer, rank: int):
    resolver = Resolver(consumer_id=f"test-worker-{rank}")
    model = ModelShape(torch.bfloat16, width=1024)
    receiver = Receiver(Arena(32 * MiB), resolver, {"enc0": producer.address}, model)
    address = f"unix:{tmp_path_factory.mktemp('sock') / f'worker-{rank}.sock'}"
    server = WorkerServer(receiver, address)
    yield receiver, address
    server.stop()
    resolver.close()


def make_scheduler(
    producer,
    receiver,
    other_rank,
    *,
    prefetch=False,
    timeout_s=5.0,
    encode_on_failure=True,
    **resolver_args,
) -> ConsumerScheduler:
    encoders = {"enc0": producer.address}
    workers = [WorkerClient(rank[1]) for rank in (receiver, other_rank)]
    resolver = Resolver(consumer_id="test-scheduler", **resolver_args)
    items = ItemTable(resolver, encoders, workers, timeout_s, receive_bytes=32 * MiB)
    return ConsumerScheduler(
        items, encoders, prefetch=prefetch, encode_on_failure=encode_on_failure
    )


def watching(scheduler: ConsumerScheduler, producer, *, claim: bool = False) -> ExportWatcher:
    """The encoder's events reach the scheduler, as in the connector (which asks for
    claims for its two ranks when it prefetches), from a stream open on return: what
    a test exports next is a new export, not part of the stream's opening list."""
    clients = ExportClients("test-watch")
    encoders = {"enc0": producer.address}
    opened = threading.Event()

    def on_connect(encoder_id: str) -> None:
        scheduler.on_connect(encoder_id)
        opened.set()

    watcher = ExportWatcher(
        clients, encoders, scheduler.on_event, on_connect, claim=claim, readers=2
    )
    assert opened.wait(STREAM_OPEN_S), "the watch stream did not open"
    return watcher


STREAM_OPEN_S = 10.0
ROWS = 8  # each test item's placeholder: ROWS x 1024 bf16, what the exports below hold


def item(seed: int, shape=(ROWS, 1024), dtype=torch.bfloat16):
    return TensorSpec(dtype, tuple(shape), seed)


def request(request_id: str, hashes: list[str], params=None, media: bool = True) -> Request:
    features = [
        MultiModalFeatureSpec(
            data=MultiModalKwargsItem.dummy() if media else None,
            modality="image",
            identifier=mm_hash,
            mm_position=PlaceholderRange(offset=1 + 10 * i, length=ROWS),
        )
        for i, mm_hash in enumerate(hashes)
    ]
    extra = {"ec_transfer_params": params} if params is not None else None
    return Request(
        request_id=request_id,
        prompt_token_ids=list(range(50)),
        sampling_params=SamplingParams(max_tokens=4, extra_args=extra),
        pooling_params=None,
        mm_features=features,
    )


def settle(scheduler: ConsumerScheduler, req: Request, timeout_s: float = 10) -> None:
    """Ask as vLLM does at each step until the request may run, or is being failed (it
    then never runs: vLLM fails it when the step ends)."""
    end = time.monotonic() + timeout_s
    while not scheduler.ensure_available(req, 0):
        if req.request_id in scheduler._unavailable:
            return
        assert time.monotonic() < end, "pull never finished"
        time.sleep(0.01)


def pulled(scheduler: ConsumerScheduler, mm_hash: str) -> bool:
    """Every rank holds the item's pull, whether or not a request has asked for it yet."""
    job = scheduler._items.job(mm_hash)
    return job is not None and job.state is PullState.READY


def load(scheduler: ConsumerScheduler, mm_hash: str) -> Load:
    """vLLM's part once a request that needs the item is scheduled: it asks
    `has_cache_item`, reserves the encoder-cache entry, and ends the scheduling pass;
    the load order its metadata then carries to every worker."""
    assert scheduler.has_item(mm_hash)
    scheduler.on_alloc(mm_hash)
    [order] = scheduler.take_loads()
    assert order.mm_hash == mm_hash
    return order


def held(receiver: Receiver) -> set[str]:
    """The items a rank holds pulled copies of, not yet lent to the encoder cache."""
    return {mm_hash for mm_hash, _pull_id in receiver._held}

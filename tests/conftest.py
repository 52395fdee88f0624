"""Shared fixtures: real exporter processes, real NIXL agents, real gRPC on loopback."""

from __future__ import annotations

import pytest
import torch

from ec_nixl.arena import Arena
from ec_nixl.exporter import ExporterConfig
from ec_nixl.exporter_process import ExporterProcess, TensorSpec
from ec_nixl.puller import Puller
from ec_nixl.resolver import Resolver
from integration.client import answer, image
from integration.servers import start_vllm, wait_healthy
from integration.tiny_vlm import build

MiB = 1 << 20


@pytest.fixture(scope="module")
def producer():
    """One exporter process for the module; tests use distinct mm_hashes."""
    with ExporterProcess(ExporterConfig(capacity_bytes=64 * MiB)) as process:
        yield process


@pytest.fixture(scope="module")
def resolver():
    resolver = Resolver(consumer_id="test-consumer")
    yield resolver
    resolver.close()


@pytest.fixture(scope="module")
def puller():
    return Puller(Arena(64 * MiB))


def spec(shape=(256, 1024), dtype=torch.bfloat16, seed=0) -> TensorSpec:
    return TensorSpec(dtype, tuple(shape), seed)


# Images the vLLM tests ask about; the reference instance answers all of them once.
PROXIED = [image(seed) for seed in range(4)]
DIRECT = [image(seed) for seed in (10, 11)]
PAIR = [image(60), image(61)]  # one request, two images: one per encoder
AFTER_FAILURE = [image(70), image(71)]
ACROSS_HOSTS = image(90)


@pytest.fixture(scope="session")
def workdirs(tmp_path_factory):
    """Two copies of the tiny model under the same --model string ("tiny-llava"):
    PD's has different vision weights, so PD answers like the reference only
    with the encoder's embeddings."""
    root = tmp_path_factory.mktemp("models")
    build(root / "encoder" / "tiny-llava")
    build(root / "pd" / "tiny-llava", vision_seed=99)
    return root / "encoder", root / "pd", root / "logs"


@pytest.fixture(scope="session")
def reference(workdirs):
    """Greedy answers of one ordinary instance with the encoder's weights."""
    encoder_dir, _, logs = workdirs
    server = start_vllm("reference", workdir=encoder_dir, cpu=0, log_dir=logs)
    try:
        wait_healthy([server])
        singles = PROXIED + DIRECT + AFTER_FAILURE + [ACROSS_HOSTS]
        answers = {url: answer(server.url, url) for url in singles}
        answers["pair"] = answer(server.url, PAIR)
        return answers
    finally:
        server.stop()

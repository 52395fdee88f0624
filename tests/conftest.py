"""Shared fixtures: real exporter processes, real NIXL agents, real gRPC on loopback."""

from __future__ import annotations

import pytest
import torch

from ec_nixl.arena import Arena
from ec_nixl.exporter import ExporterConfig
from ec_nixl.exporter_process import ExporterProcess, TensorSpec
from ec_nixl.puller import Puller
from ec_nixl.resolver import Resolver

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

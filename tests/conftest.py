"""Shared fixtures: real exporter processes, real NIXL agents, real gRPC on loopback."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from contextlib import contextmanager

import grpc
import pytest
import torch
from pd_rig import make_scheduler, serve_rank

from ec_nixl.arena import Arena
from ec_nixl.consumer.puller import Puller
from ec_nixl.consumer.resolver import Resolver
from ec_nixl.producer.exporter import ExporterConfig
from integration.client import answer, conversation, image
from integration.exporter_process import ExporterProcess, TensorSpec
from integration.servers import start_vllm, wait_healthy
from integration.tiny_vlm import build

MiB = 1 << 20
FLOOD_CALLS = 64  # four times the export service's threads

# What a caller of the export service may get for garbage: never UNKNOWN (an unhandled
# exception), never a dead server.
CLEAR = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.INTERNAL,  # gRPC's answer to bytes that do not decode as the request type
}


def call_raw(channel, method: str, metadata, payload: bytes) -> grpc.StatusCode:
    """Call an export-service method with arbitrary bytes as its request."""
    call = channel.unary_unary(f"/ec_nixl.v1.ExportService/{method}")
    try:
        call(payload, timeout=5, metadata=metadata)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


@contextmanager
def calls_held_open(channel, method: str):
    """FLOOD_CALLS calls of `method` without a token that send their headers, never their body."""
    release = threading.Event()

    def no_body():
        release.wait()
        yield from ()

    call = channel.stream_unary(method)
    held = [call.future(no_body()) for _ in range(FLOOD_CALLS)]
    try:
        time.sleep(0.5)  # every call has reached the server
        yield held
    finally:
        release.set()


def ucx_address_of_another_version(metadata: bytes) -> bytes:
    """The metadata with the first byte of its UCX worker address (the address format's
    version) changed: UCX asserts on it and aborts whoever loads it. (NIXL serializes a
    field as tag, 8-byte length, bytes; `|c` holds the UCX connection info.)"""
    at = metadata.index(b"|c") + len(b"|c") + 8
    return metadata[:at] + b"\xff" + metadata[at + 1 :]


def pytest_addoption(parser):
    parser.addoption(
        "--reliability-report",
        metavar="PATH",
        help="write the reliability suite's figures (tests/test_reliability.py) to PATH",
    )


@pytest.fixture(scope="session")
def tls_certificate(tmp_path_factory):
    """(certificate, key) for 127.0.0.1 and localhost, self-signed: it is its own CA."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    root = tmp_path_factory.mktemp("tls")
    cert, key = root / "cert.pem", root / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", key, "-out", cert, "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


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


def wait_until(condition, timeout_s: float = 10.0, every_s: float = 0.01) -> bool:
    """Whether `condition()` came true within the time (checked every `every_s`)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(every_s)
    return condition()


def spec(shape=(256, 1024), dtype=torch.bfloat16, seed=0) -> TensorSpec:
    return TensorSpec(dtype, tuple(shape), seed)


# Images the vLLM tests ask about; the reference instance answers all of them once.
PROXIED = [image(seed) for seed in range(4)]
DIRECT = [image(seed) for seed in (10, 11)]
PAIR = [image(60), image(61)]  # one request, two images: one per encoder
AFTER_FAILURE = [image(70), image(71)]
ACROSS_HOSTS = image(90)
PREFETCHED = image(91)  # across hosts too: pulled before its request reaches PD
RECOVERED = [image(seed) for seed in (95, 96, 97)]  # served after faults, checked to the bit
ROUTED = [image(seed) for seed in (100, 101, 102, 103)]  # through a proxy in front of two PDs
UNFORWARDED = image(104)  # to E, then to PD without E's params, as a stock EPD proxy does
CHATTED = image(105)  # a chat's turns about it, through a proxy that follows E's events
# Through vLLM's own example EPD proxy: with --no-rewrite, one image and two; rewriting.
# vLLM's example EPD proxy of each release the drop-in tests run: an image, and a pair
STOCK = {"0.32.0": (image(106), [image(107), image(108)]),
         "0.34.0": (image(110), [image(111), image(112)])}  # fmt: skip
REWRITTEN = {"0.32.0": image(109), "0.34.0": image(113)}


def start_encoder(
    name, workdir, logs, control: str, metrics: str, *, encoder_id: str = "enc0", tp: int = 1
):
    """An encoder-only instance exporting with ECNixlConnector (at tensor parallel 2: a
    rank on each core)."""
    return start_vllm(
        name, workdir=workdir, cpu="0|1" if tp == 2 else 0, log_dir=logs, encoder_only=True,
        tensor_parallel=tp,
        ec_transfer_config={
            "ec_connector": "ECNixlConnector",
            "ec_connector_module_path": "ec_nixl.connector",
            "ec_role": "ec_producer",
            "ec_connector_extra_config": {
                "encoder_id": encoder_id, "control_address": control, "pool_bytes": 64 << 20,
                "metrics_address": metrics,
            },
        },
    )  # fmt: skip


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
        singles = (
            PROXIED + DIRECT + AFTER_FAILURE + [ACROSS_HOSTS, PREFETCHED, UNFORWARDED]
            + RECOVERED + ROUTED + [single for single, _ in STOCK.values()]
            + list(REWRITTEN.values())
        )  # fmt: skip
        answers = {url: answer(server.url, url) for url in singles}
        answers["pair"] = answer(server.url, PAIR)
        for release, (_, pair) in STOCK.items():
            answers[f"stock pair {release}"] = answer(server.url, pair)
        answers["chat"] = conversation(server.url, CHATTED)
        return answers
    finally:
        server.stop()


# A PD scheduler's two worker ranks, for the scheduler tests (see pd_rig).
@pytest.fixture(scope="module")
def receiver(tmp_path_factory, producer):
    """Rank 0: (its Receiver, its socket)."""
    yield from serve_rank(tmp_path_factory, producer, 0)


@pytest.fixture(scope="module")
def other_rank(tmp_path_factory, producer):
    yield from serve_rank(tmp_path_factory, producer, 1)


@pytest.fixture
def scheduler(producer, receiver, other_rank):
    scheduler = make_scheduler(producer, receiver, other_rank)
    yield scheduler
    scheduler.close()

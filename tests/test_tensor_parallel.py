"""ECNixlConnector at tensor parallel 2 on both sides, in real vLLM on the CPU.

E runs at TP 2 (rank 0 exports); PD runs at TP 2 with different vision weights,
so its answers equal the TP-2 reference (E's weights) only if both of its ranks
loaded E's embeddings: a rank that encoded locally, or got nothing, would
answer otherwise or fail. One lease per pull covers both ranks.
"""

from __future__ import annotations

import re
import time

import pytest
from conftest import start_encoder, wait_until

from integration.client import answer, image, metric
from integration.servers import free_port, start_proxy, start_vllm, wait_healthy

IMAGES = [image(seed) for seed in (40, 41, 42)]
BOTH_CORES = "0|1"  # one per rank


@pytest.fixture(scope="module")
def reference_tp2(workdirs):
    """Greedy answers of one ordinary TP-2 instance with the encoder's weights."""
    encoder_dir, _, logs = workdirs
    server = start_vllm(
        "reference-tp2", workdir=encoder_dir, cpu=BOTH_CORES, log_dir=logs, tensor_parallel=2
    )
    try:
        wait_healthy([server])
        return {url: answer(server.url, url) for url in IMAGES}
    finally:
        server.stop()


@pytest.fixture(scope="module")
def cluster_tp2(workdirs, reference_tp2):
    encoder_dir, pd_dir, logs = workdirs
    control, metrics = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    # PD first, E right after, as an orchestrator may start them: PD's start-up meeting
    # finds no encoder, and PD meets E (and wires UCX up to it) when E's event stream
    # opens, not inside a first pull. (A first pull that wired up while four ranks
    # busy-polled two cores once left E's rank 0 unscheduled for 8.4 s.)
    pd = start_vllm(
        "pd-tp2", workdir=pd_dir, cpu=BOTH_CORES, log_dir=logs, tensor_parallel=2,
        ec_transfer_config={
            "ec_connector": "ECNixlConnector", "ec_role": "ec_consumer",
            "ec_connector_extra_config": {
                "encoders": {"enc0": control}, "receive_bytes": 64 << 20, "prefetch": True,
            },
        },
    )  # fmt: skip
    servers = [pd]
    try:
        encoder = start_encoder("enc-tp2", encoder_dir, logs, control, metrics, tp=2)
        servers.append(encoder)
        wait_healthy(servers)
        assert wait_until(
            lambda: pd.log_path.read_text().count("wired up to exporter") >= 2, timeout_s=120
        ), "PD's ranks did not wire up to E once it came"
        proxy = start_proxy(encoders=[encoder.url], pd=pd.url, log_dir=logs / "tp2")
        servers.append(proxy)
        wait_healthy([proxy])
        yield {"encoder_metrics": f"http://{metrics}", "pd": pd, "proxy": proxy}
    finally:
        for server in servers:
            server.stop()


def test_pd_and_encoder_at_tp2_answer_exactly_as_a_tp2_instance(cluster_tp2, reference_tp2):
    for url in IMAGES:
        assert answer(cluster_tp2["proxy"].url, url) == reference_tp2[url]


def test_every_item_reached_both_pd_ranks_under_one_claim_without_a_resolve(cluster_tp2):
    pd = cluster_tp2["pd"]
    pulled = metric(pd.url, "ec_nixl:items_pulled_total")
    assert pulled >= len(IMAGES)
    assert metric(pd.url, "ec_nixl:claimed_pulls_total") == pulled
    assert metric(pd.url, "ec_nixl:resolve_seconds_count") == 0
    assert metric(pd.url, "ec_nixl:pull_failures_total") == 0
    reads = re.findall(r"READ per rank ([\d.]+)/([\d.]+) ms", pd.log_path.read_text())
    assert len(reads) == pulled  # two ranks read each item
    # Each lease ended by its two READs, none by expiry or a give-back.
    time.sleep(1.5)  # E's endpoint folds new counts in once a second
    encoder = cluster_tp2["encoder_metrics"]
    assert metric(encoder, "ec_nixl:leases_ended_total", how="read") == pulled
    assert metric(encoder, "ec_nixl:leases_live") == 0

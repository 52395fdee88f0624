"""ECNixlConnector in real vLLM on the CPU: encoder -> proxy -> PD, checked to the bit.

E and PD run the tiny LLaVA model under the same --model string ("tiny-llava")
from two directories: PD's copy has different vision-tower weights. So PD can
only answer like the reference instance (E's weights) if it used E's
embeddings, which proves the transfer; images sent straight to PD answer
differently.
"""

from __future__ import annotations

import re
import threading
import time
from contextlib import contextmanager

import pytest
from conftest import (
    AFTER_FAILURE,
    DIRECT,
    PAIR,
    PROXIED,
    REWRITTEN,
    STOCK,
    UNFORWARDED,
    start_encoder,
)

from ec_nixl.control.client import ExportClient
from ec_nixl.control.messages import EventKind
from integration.client import answer, chat_body, image, metric, post, stream_ttft
from integration.servers import (
    free_port,
    start_proxy,
    start_stock_proxy,
    start_vllm,
    wait_healthy,
)
from integration.tiny_vlm import embedding_bytes

PULL_TIMEOUT_S = 5


@pytest.fixture(scope="module")
def cluster(workdirs, reference):
    """Two encoders (enc0, enc1), one PD, the proxy sending to PD at once (`proxy`) and
    one sending to PD after the encoders answered (`sequential_proxy`)."""
    encoder_dir, pd_dir, logs = workdirs
    controls = {name: f"127.0.0.1:{free_port()}" for name in ("enc0", "enc1")}
    metrics = {name: f"127.0.0.1:{free_port()}" for name in controls}
    encoders = [
        start_encoder(name, encoder_dir, logs, control, metrics[name], encoder_id=name)
        for name, control in controls.items()
    ]
    servers = list(encoders)
    try:
        wait_healthy(encoders)  # as launch scripts do: PD then finds them up from its start
        pd = start_vllm(
            "pd", workdir=pd_dir, cpu=1, log_dir=logs,
            ec_transfer_config={
                "ec_connector": "ECNixlConnector",  # by its short name: vLLM's plugin registers it
                "ec_role": "ec_consumer",
                "ec_connector_extra_config": {
                    "encoders": controls, "receive_bytes": 64 << 20,
                    "pull_timeout_s": PULL_TIMEOUT_S,
                },
            },
        )  # fmt: skip
        servers.append(pd)
        wait_healthy([pd])
        urls = [e.url for e in encoders]
        proxy = start_proxy(encoders=urls, pd=pd.url, log_dir=logs / "overlap", overlap=True)
        sequential = start_proxy(encoders=urls, pd=pd.url, log_dir=logs / "sequential")
        servers += [proxy, sequential]
        wait_healthy([proxy, sequential])
        yield {
            "encoder": encoders[0],
            "encoder1": encoders[1],
            "pd": pd,
            "proxy": proxy,
            "sequential_proxy": sequential,
            "control": controls["enc0"],
            "encoder_metrics": f"http://{metrics['enc0']}",
        }
    finally:
        for server in servers:
            server.stop()


def pulls_in_log(server, encoder: str = r"enc\d") -> int:
    log = server.log_path.read_text(errors="replace")
    return len(re.findall(rf"pulled \w+ from {encoder} ", log))


def test_a_lone_request_on_an_idle_pd_gets_its_pull(cluster, reference):
    # The first request after start-up: nothing else steps the PD engine.
    assert answer(cluster["proxy"].url, PROXIED[0]) == reference[PROXIED[0]]
    assert pulls_in_log(cluster["pd"]) == 1


def test_answers_through_encoder_and_pd_equal_the_single_instance(cluster, reference):
    for url in PROXIED:
        assert answer(cluster["proxy"].url, url) == reference[url]


def test_pd_got_each_request_before_its_image_was_announced_and_waited_for_it(cluster):
    pd = cluster["pd"].url
    expected = metric(pd, "ec_nixl:announce_wait_seconds_count")
    answer(cluster["proxy"].url, image(86))
    assert metric(pd, "ec_nixl:announce_wait_seconds_count") == expected + 1


def test_a_proxy_that_waits_for_the_encoders_gets_the_same_answers(cluster, reference):
    for url in PROXIED[:2]:
        assert answer(cluster["sequential_proxy"].url, url) == reference[url]


def test_a_request_with_two_images_is_served_by_both_encoders(cluster, reference):
    before = {e: pulls_in_log(cluster["pd"], e) for e in ("enc0", "enc1")}
    assert answer(cluster["proxy"].url, PAIR) == reference["pair"]
    assert all(pulls_in_log(cluster["pd"], e) == before[e] + 1 for e in before)


def test_a_streamed_answer_passes_through_the_proxy_unchanged(cluster, reference):
    ttft, text = stream_ttft(cluster["proxy"].url, chat_body(PROXIED[3]))
    assert text == reference[PROXIED[3]]


def phase_counts(proxy: str) -> list[float]:
    """How many requests each phase timed, once every request so far has both: with
    overlap, an answer can reach its client before the encoder's reaches the proxy."""
    phases = ("ec_nixl_proxy_encode_seconds_count", "ec_nixl_proxy_pd_first_chunk_seconds_count")
    deadline = time.monotonic() + 10
    while (counts := [metric(proxy, phase) for phase in phases])[0] != counts[1]:
        assert time.monotonic() < deadline, f"phases timed {counts} times"
        time.sleep(0.1)
    return counts


def test_the_proxy_times_both_phases_of_each_request(cluster):
    proxy = cluster["proxy"].url
    before = phase_counts(proxy)
    stream_ttft(proxy, chat_body(image(85)))
    assert phase_counts(proxy) == [count + 1 for count in before]


def test_pd_alone_encodes_differently_so_the_answers_above_came_from_the_encoder(
    cluster, reference
):
    assert [answer(cluster["pd"].url, url) for url in DIRECT] != [reference[u] for u in DIRECT]


def test_the_same_image_twice_is_pulled_once(cluster, reference):
    url = image(20)
    before = pulls_in_log(cluster["pd"])
    first = answer(cluster["proxy"].url, url)
    second = answer(cluster["proxy"].url, url)
    assert first == second
    assert pulls_in_log(cluster["pd"]) == before + 1


def test_pd_pulls_what_an_encoder_announced_for_a_request_without_params(cluster, reference):
    """A proxy of one's own: the request to an encoder, its answer dropped, then the
    original request to PD."""
    post(cluster["encoder"].url, chat_body(UNFORWARDED, max_tokens=1))
    before = pulls_in_log(cluster["pd"], "enc0")
    assert answer(cluster["pd"].url, UNFORWARDED) == reference[UNFORWARDED]
    assert pulls_in_log(cluster["pd"], "enc0") == before + 1


@contextmanager
def vllms_example_proxy(cluster, workdirs, release: str, *, rewrite: bool):
    """vLLM's example EPD proxy of `release`, unchanged, in front of both encoders and PD."""
    encoders = [cluster["encoder"].url, cluster["encoder1"].url]
    log_dir = workdirs[2] / f"stock-proxy-{release}-{'rewrite' if rewrite else 'no-rewrite'}"
    proxy = start_stock_proxy(encoders=encoders, pd=cluster["pd"].url, log_dir=log_dir,
                              rewrite=rewrite, vllm=release)  # fmt: skip
    try:
        wait_healthy([proxy])
        yield proxy
    finally:
        proxy.stop()


@pytest.mark.parametrize("release", list(STOCK))
def test_behind_vllms_example_proxy_with_no_rewrite_pd_pulls_every_image(
    cluster, workdirs, reference, release
):
    """What LLaVA users run: both sides hash the media alike, and PD takes E's
    ec_transfer_params as that proxy forwards them (every encoder's answer, by mm_hash).
    0.34's proxy reads each entry's `modality`, which an encoder on vLLM 0.32 (this one)
    does not send: it takes the modality from the content part's type instead."""
    single, pair = STOCK[release]
    with vllms_example_proxy(cluster, workdirs, release, rewrite=False) as proxy:
        before = pulls_in_log(cluster["pd"])
        assert answer(proxy.url, single) == reference[single]
        assert pulls_in_log(cluster["pd"]) == before + 1
        assert answer(proxy.url, pair) == reference[f"stock pair {release}"]  # one per encoder
        assert pulls_in_log(cluster["pd"]) == before + 3


@pytest.mark.parametrize("release", list(REWRITTEN))
def test_vllms_example_proxy_rewriting_for_llava_leaves_pd_to_encode_and_pd_says_why(
    cluster, workdirs, reference, release
):
    """By default that proxy gives E each item under a uuid of its own, but sends LLaVA's
    PD the media without it (LLaVA has no placeholder metadata to rewrite it to): PD's
    mm_hash is not E's, for any connector, so PD encodes (with its own vision weights)."""
    unmatched = metric(cluster["pd"].url, "ec_nixl:unmatched_params_total")
    with vllms_example_proxy(cluster, workdirs, release, rewrite=True) as proxy:
        assert answer(proxy.url, REWRITTEN[release]) != reference[REWRITTEN[release]]
    assert metric(cluster["pd"].url, "ec_nixl:unmatched_params_total") == unmatched + 1
    assert "--no-rewrite" in cluster["pd"].log_path.read_text(errors="replace")  # said once


def test_pd_counts_its_pulls_on_vllms_own_metrics_endpoint(cluster):
    pd = cluster["pd"].url
    pulled = metric(pd, "ec_nixl:items_pulled_total")
    assert pulled == pulls_in_log(cluster["pd"]) > 0
    assert metric(pd, "ec_nixl:bytes_pulled_total") == pulled * embedding_bytes()
    assert metric(pd, "ec_nixl:pull_seconds_count") == pulled


def test_the_encoder_reports_exports_and_evictions_on_its_metrics_endpoint(cluster):
    for seed in (80, 81):  # one per encoder
        answer(cluster["proxy"].url, image(seed))
    time.sleep(1.5)  # the endpoint folds new counts in once a second
    url = cluster["encoder_metrics"]
    assert metric(url, "ec_nixl:items_exported_total") >= 1
    assert metric(url, "ec_nixl:leases_ended_total", how="read") >= 1
    assert metric(url, "ec_nixl:pool_bytes_in_use") > 0


def test_the_encoder_keeps_a_pulled_item_cached_and_pins_it_no_longer(cluster):
    client = ExportClient(cluster["control"])
    events: list = []
    threading.Thread(target=lambda: events.extend(client.watch()), daemon=True).start()
    time.sleep(0.5)  # the stream is open before anything is exported
    url = image(30)  # through enc0 directly: the proxy could pick the other encoder
    params = post(cluster["encoder"].url, chat_body(url, max_tokens=1))["ec_transfer_params"]
    post(cluster["pd"].url, chat_body(url, ec_transfer_params=params))
    (mm_hash,) = params
    deadline = time.monotonic() + 10
    while metric(cluster["encoder_metrics"], "ec_nixl:leases_live") > 0:
        assert time.monotonic() < deadline, "the encoder still pins an item PD has read"
        time.sleep(0.2)
    client.close()
    # Announced as being encoded, then as exported; never evicted.
    kinds = [e.kind for e in events if e.mm_hash == mm_hash]
    assert kinds == [EventKind.ENCODING, EventKind.EXPORTED]


def test_the_proxy_drops_transfer_params_a_client_made_up(cluster, reference):
    forged = {"anything": {"encoder_id": "not-configured"}}
    body = chat_body(PROXIED[2], ec_transfer_params=forged)
    assert (
        post(cluster["proxy"].url, body)["choices"][0]["message"]["content"]
        == reference[PROXIED[2]]
    )


def test_with_the_encoder_gone_pd_encodes_locally_within_the_deadline(cluster, reference):
    url = image(50)
    params = post(cluster["encoder"].url, chat_body(url, max_tokens=1))["ec_transfer_params"]
    cluster["encoder"].kill()
    start = time.monotonic()
    local = post(cluster["pd"].url, chat_body(url, ec_transfer_params=params))
    assert time.monotonic() - start < PULL_TIMEOUT_S + 5
    assert local["choices"][0]["message"]["content"]
    assert metric(cluster["pd"].url, "ec_nixl:fallbacks_total") >= 1
    assert metric(cluster["pd"].url, "ec_nixl:pull_failures_total", cause="PeerDeadError") >= 1
    # PD keeps serving, and the proxy routes around the dead encoder.
    assert answer(cluster["pd"].url, DIRECT[0])
    for url in AFTER_FAILURE:
        assert answer(cluster["proxy"].url, url) == reference[url]


def test_with_every_encoder_gone_the_proxy_has_pd_encode_at_once(cluster):
    cluster["encoder1"].kill()  # enc0 is gone already
    url = image(51)
    start = time.monotonic()
    through_proxy = answer(cluster["proxy"].url, url)
    assert time.monotonic() - start < PULL_TIMEOUT_S  # not a wait for an announcement
    assert through_proxy == answer(cluster["pd"].url, url)

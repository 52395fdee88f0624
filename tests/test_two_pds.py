"""One encoder, two PDs behind one proxy, in real vLLM on the CPU.

The proxy sends requests to the PDs in turn and tells the encoder which PD each
is for (`{"consumer_id": ...}`); the encoder announces a request's items to that
PD with a claim, and that PD alone pulls them (one READ, no resolve) before the
request arrives. The encoder keeps what was read, so the same image sent later
to the other PD is pulled there too, not encoded. Both PDs have other vision
weights than the encoder: their answers equal the reference only with E's
embeddings. pd-b's load failure policy is "fail": once the encoder is gone, a
request naming its items fails there, where pd-a encodes them. The proxy names
each image by its content and follows the encoder's events: an image the
encoder still holds (asked for again, or a chat's earlier turn) is not sent to
it again.
"""

from __future__ import annotations

import time
import urllib.error

import pytest
from conftest import CHATTED, ROUTED, start_encoder

from integration.client import answer, chat_body, conversation, image, metric, post
from integration.servers import free_port, start_proxy, start_vllm, wait_healthy

PDS = ("pd-a", "pd-b")
POLICY = {"pd-a": "encode", "pd-b": "fail"}


@pytest.fixture(scope="module")
def routed(workdirs, reference):
    encoder_dir, pd_dir, logs = workdirs
    control, metrics = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    encoder = start_encoder("enc-routed", encoder_dir, logs, control, metrics)
    servers = [encoder]
    try:
        wait_healthy(servers)  # as launch scripts do: the PDs then find it up from their start
        pds = {
            name: start_vllm(
                name,
                workdir=pd_dir,
                cpu=1,
                log_dir=logs,
                ec_transfer_config={
                    "ec_connector": "ECNixlConnector",
                    "ec_role": "ec_consumer",
                    "ec_connector_extra_config": {
                        "encoders": {"enc0": control},
                        "receive_bytes": 64 << 20,
                        "consumer_id": name,
                        "load_failure_policy": POLICY[name],
                    },
                },
            )  # fmt: skip
            for name in PDS
        }
        servers += pds.values()
        wait_healthy(list(pds.values()))
        named = [f"{name}={pd.url}" for name, pd in pds.items()]
        proxy = start_proxy(
            encoders=[encoder.url], pd=named, log_dir=logs / "routed",
            encoder_events={"enc0": control},
        )  # fmt: skip
        servers.append(proxy)
        wait_healthy([proxy])
        yield {
            "proxy": proxy, "pds": pds, "encoder": encoder, "encoder_metrics": f"http://{metrics}"
        }  # fmt: skip
    finally:
        for server in servers:
            server.stop()


def pulled(pd) -> dict[str, float]:
    return {
        name: metric(pd.url, f"ec_nixl:{name}")
        for name in ("items_pulled_total", "claimed_pulls_total", "fallbacks_total")
    }


def test_each_pd_prefetches_the_items_routed_to_it_and_no_other(routed, reference):
    for url in ROUTED:  # to pd-a, pd-b, pd-a, pd-b
        assert answer(routed["proxy"].url, url) == reference[url]
    for pd in routed["pds"].values():
        assert pulled(pd) == {
            "items_pulled_total": 2, "claimed_pulls_total": 2, "fallbacks_total": 0
        }  # fmt: skip
    time.sleep(1.5)  # E's endpoint folds new counts in once a second
    for name in PDS:
        assert metric(routed["encoder_metrics"], "ec_nixl:items_read_total", consumer=name) == 2


def encoded(routed) -> float:
    return metric(routed["encoder"].url, "vllm:request_success_total")


def hits(routed) -> float:
    return metric(routed["proxy"].url, "ec_nixl_proxy_encoder_hits_total")


def test_an_image_asked_for_again_on_the_other_pd_is_pulled_there_not_encoded(routed, reference):
    url = ROUTED[0]  # pd-a had it; this turn goes to pd-a, the next to pd-b
    before = {name: pulled(pd) for name, pd in routed["pds"].items()}
    encoded_before, hits_before = encoded(routed), hits(routed)
    for _ in PDS:
        assert answer(routed["proxy"].url, url) == reference[url]
    after = {name: pulled(pd) for name, pd in routed["pds"].items()}
    assert after["pd-b"]["items_pulled_total"] == before["pd-b"]["items_pulled_total"] + 1
    assert after["pd-a"]["fallbacks_total"] == after["pd-b"]["fallbacks_total"] == 0
    # The proxy follows the encoder's events: it knew E held the image and did not ask again.
    assert hits(routed) == hits_before + 2
    assert encoded(routed) == encoded_before


def test_a_chat_sends_its_image_to_the_encoder_once_not_once_per_turn(routed, reference):
    encoded_before, hits_before = encoded(routed), hits(routed)
    assert conversation(routed["proxy"].url, CHATTED) == reference["chat"]
    assert encoded(routed) == encoded_before + 1  # the first turn
    assert hits(routed) == hits_before + 1  # the second turn's copy of the image


def test_an_item_named_by_a_client_uuid_without_its_data_is_refused_and_counted(routed):
    body = chat_body(image(112))
    body["messages"][0]["content"][0] = {"type": "image_url", "uuid": "someone-elses-image"}
    with pytest.raises(urllib.error.HTTPError) as refused:
        post(routed["proxy"].url, body)
    assert refused.value.code == 400 and b"uuid but no data" in refused.value.read()
    assert metric(routed["proxy"].url, "ec_nixl_proxy_refused_requests_total") == 1


def test_with_the_encoder_gone_each_pd_follows_its_load_failure_policy(routed):
    url = image(110)
    params = post(routed["encoder"].url, chat_body(url, max_tokens=1))["ec_transfer_params"]
    [mm_hash] = params
    routed["encoder"].kill()
    pd_a, pd_b = routed["pds"]["pd-a"], routed["pds"]["pd-b"]
    assert answer(pd_a.url, url, ec_transfer_params=params)  # "encode": pd-a encodes it
    assert metric(pd_a.url, "ec_nixl:fallbacks_total") == 1
    with pytest.raises(urllib.error.HTTPError) as failed:  # "fail": pd-b ends the request
        post(pd_b.url, chat_body(url, ec_transfer_params=params))
    assert failed.value.code == 500  # vLLM ends the request with an error: send it again
    assert metric(pd_b.url, "ec_nixl:failed_requests_total") == 1
    assert metric(pd_b.url, "ec_nixl:fallbacks_total") == 0
    said = pd_b.log_path.read_text()
    assert f"cannot get its encoder outputs: {mm_hash}" in said and "policy is 'fail'" in said
    assert answer(pd_b.url, image(111))  # and goes on serving

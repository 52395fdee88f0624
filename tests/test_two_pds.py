"""One encoder, two PDs behind one proxy, in real vLLM on the CPU.

The proxy sends requests to the PDs in turn and tells the encoder which PD each
is for (`{"consumer_id": ...}`); the encoder announces a request's items to that
PD with a claim, and that PD alone pulls them (one READ, no resolve) before the
request arrives. The encoder keeps what was read, so the same image sent later
to the other PD is pulled there too, not encoded. Both PDs have other vision
weights than the encoder: their answers equal the reference only with E's
embeddings.
"""

from __future__ import annotations

import time

import pytest
from conftest import ROUTED, start_encoder

from integration.client import answer, metric
from integration.servers import free_port, start_proxy, start_vllm, wait_healthy

PDS = ("pd-a", "pd-b")


@pytest.fixture(scope="module")
def routed(workdirs, reference):
    encoder_dir, pd_dir, logs = workdirs
    control, metrics = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    encoder = start_encoder("enc-routed", encoder_dir, logs, control, metrics)
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
                },
            },
        )  # fmt: skip
        for name in PDS
    }
    servers = [encoder, *pds.values()]
    try:
        wait_healthy(servers)
        named = [f"{name}={pd.url}" for name, pd in pds.items()]
        proxy = start_proxy(encoders=[encoder.url], pd=named, log_dir=logs / "routed")
        servers.append(proxy)
        wait_healthy([proxy])
        yield {"proxy": proxy, "pds": pds, "encoder_metrics": f"http://{metrics}"}
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


def test_an_image_asked_for_again_on_the_other_pd_is_pulled_there_not_encoded(routed, reference):
    url = ROUTED[0]  # pd-a had it; this turn goes to pd-a, the next to pd-b
    before = {name: pulled(pd) for name, pd in routed["pds"].items()}
    for _ in PDS:
        assert answer(routed["proxy"].url, url) == reference[url]
    after = {name: pulled(pd) for name, pd in routed["pds"].items()}
    assert after["pd-b"]["items_pulled_total"] == before["pd-b"]["items_pulled_total"] + 1
    assert after["pd-a"]["fallbacks_total"] == after["pd-b"]["fallbacks_total"] == 0

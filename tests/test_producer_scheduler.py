"""The encoder's scheduler side: what its answer says of a request's items, and which PD
it claims them for."""

from __future__ import annotations

import pytest
from pd_rig import request
from vllm.v1.request import Request

from ec_nixl.producer.scheduler import ProducerScheduler
from ec_nixl.transfer_params import consumer_params


def test_the_encoder_names_itself_for_every_item_of_a_request():
    encoder = ProducerScheduler("enc0")
    req = request("on-encoder", ["h1", "h2"])
    assert encoder.finished(req) == {
        "h1": {"encoder_id": "enc0"},
        "h2": {"encoder_id": "enc0"},
    }
    assert encoder.finished(request("text-only", [])) is None


def test_the_encoders_answer_carries_vllms_item_entries_beside_its_id():
    grid = {"image_grid_thw": [1, 4, 4]}
    encoder = ProducerScheduler("enc0", lambda features: {"h1": {"metadata": grid}})
    assert encoder.finished(request("described", ["h1", "h2"])) == {
        "h1": {"metadata": grid, "encoder_id": "enc0"},
        "h2": {"encoder_id": "enc0"},
    }


class NewRequest:
    """What vLLM's scheduler output says of a request scheduled for the first time."""

    def __init__(self, req: Request) -> None:
        self.req_id, self.mm_features = req.request_id, req.mm_features


def test_the_encoder_claims_a_requests_items_for_the_pd_the_proxy_names():
    encoder = ProducerScheduler("enc0")
    routed = request("routed", ["h-r1", "h-r2"], consumer_params("pd-a"))
    plain = request("plain", ["h-p"])
    for req in (routed, plain):
        encoder.note(req)
    uses = encoder.uses([NewRequest(routed), NewRequest(plain)])
    assert uses == {"h-r1": "pd-a", "h-r2": "pd-a", "h-p": ""}


def test_the_encoders_answer_names_the_pd_it_announces_the_items_to_with_a_claim():
    """So that a request that reaches that PD before the announcement waits for it."""
    encoder = ProducerScheduler("enc0")
    routed = request("routed-answer", ["h-r"], consumer_params("pd-a"))
    encoder.note(routed)
    assert encoder.finished(routed) == {"h-r": {"encoder_id": "enc0", "claimed_for": "pd-a"}}


@pytest.mark.parametrize(
    "params",
    [
        {"consumer_id": "../etc"},
        {"consumer_id": ""},
        {"consumer_id": 7},
        ["pd-a"],
        {"consumer_id": "p" * 129},  # no watcher could go by it: the control plane refuses it
    ],
)
def test_the_encoder_claims_for_no_pd_when_the_named_one_is_malformed(params, caplog):
    encoder = ProducerScheduler("enc0")
    req = request("forged-consumer", ["h-f"], params)
    encoder.note(req)
    assert encoder.uses([NewRequest(req)]) == {"h-f": ""}
    assert "announcing its items to no PD in particular" in caplog.text

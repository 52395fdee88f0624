"""ECNixlConnector driven as vLLM's V2 model runners drive it (the only runners of vLLM
0.34): through vLLM's own `ActiveECConnector` (`vllm/v1/worker/gpu/ec_connector.py`,
imported from the installed vLLM), with real connectors on both sides (scheduler and
worker role, built by vLLM from a real VllmConfig), vLLM's own scheduler, real NIXL
and real gRPC on loopback. See `v2_rig` for what plays the model runner.

Nothing of vLLM, NIXL, gRPC or ec_nixl is mocked. The tensor-parallel rank that
`start_worker_services` reads comes from vLLM's own distributed init (gloo, world size
1). Set up otherwise than in a vLLM server, and why:
- VLLM_USE_V2_MODEL_RUNNER=1 in the environment, only while each `Scheduler` is built
  (`make_scheduler`, with `unittest.mock.patch.dict` on `os.environ`): that is when
  the scheduler reads it, and only with it does 0.32's scheduler shape its outputs for
  the V2 runner, as 0.34's always does; the config itself refuses the V2 runner on a
  machine without Triton, so it cannot be set for the whole process.
- each scheduler's KV cache config is a small one of our making, where a server takes
  one from profiling its workers: no model weights are loaded, the forward is a
  stand-in (`v2_rig.encode`, `v2_rig.prefill`).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import wait_until
from pd_rig import pulled
from v2_rig import (
    RUN_TIMEOUT_S,
    SAMPLED_TOKEN,
    EncoderWorker,
    Engine,
    Runner,
    encoder_output,
    engine_config,
    image_request,
    make_scheduler,
    prefill,
    start_worker,
    stop_worker,
)

from ec_nixl.arena import Arena
from ec_nixl.connector import fingerprint
from ec_nixl.consumer.puller import Puller
from ec_nixl.consumer.resolver import Resolver
from ec_nixl.transfer_params import announce_params
from integration.exporter_process import pull
from integration.servers import free_port
from integration.tiny_vlm import build

MiB = 1 << 20
PD_ID = "pd-v2"  # the name PD goes by at its encoder
PULL_S = 30.0  # deadline for a pull to land
IDLE_STEPS = 3  # PD steps without tokens before E encodes
STEPS_S = 30.0  # deadline for those steps


def loaded(step) -> list[str]:
    """The items whose pulled copies a step's metadata has PD's workers load."""
    return [load.mm_hash for load in step.output.ec_connector_metadata.loads]


class Rig:
    def __init__(self, e: Engine, pd: Engine, pd_runner: Runner, control: str, config) -> None:
        self.e, self.pd, self.pd_runner = e, pd, pd_runner
        self.control = control  # E's export service
        self.fingerprint = fingerprint(config)
        self.image_token = config.model_config.hf_config.image_token_index

    def request(self, request_id: str, mm_hash: str, params: dict | None = None):
        return image_request(request_id, mm_hash, params, self.image_token)

    def encode(self, mm_hash: str, params: dict | None = None) -> dict:
        """E serves a request for one image: the ec_transfer_params of its response."""
        request_id = f"e-{mm_hash}"
        self.e.run(self.request(request_id, mm_hash, params))
        params = self.e.finished[request_id].ec_transfer_params
        assert params is not None
        return params


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    model = build(tmp_path_factory.mktemp("v2-runner") / "tiny-llava")
    control = f"127.0.0.1:{free_port()}"
    e_config = engine_config(
        model,
        "ec_producer",
        {"encoder_id": "enc0", "control_address": control, "pool_bytes": 16 * MiB},
        encoder_only=True,
    )
    encoder = EncoderWorker(e_config)  # starts while PD is set up
    try:
        pd_config = engine_config(
            model,
            "ec_consumer",
            {"encoders": {"enc0": control}, "consumer_id": PD_ID, "receive_bytes": 16 * MiB},
        )
        encoder.wait_ready()  # before PD meets it: gRPC would back off from a refused connect
        start_worker(pd_config)
        try:
            pd_runner = Runner(pd_config, prefill)
            e = Engine(make_scheduler(e_config), encoder.execute, lambda: encoder.cached)
            pd = Engine(
                make_scheduler(pd_config),
                pd_runner.execute,
                lambda: list(pd_runner.cache.encoder_outputs),
            )
            try:
                yield Rig(e, pd, pd_runner, control, pd_config)
            finally:
                pd.scheduler.shutdown()
                e.scheduler.shutdown()
        finally:
            stop_worker()
    finally:
        encoder.close()


def test_an_encoder_output_that_enters_the_cache_in_the_forward_is_exported(rig):
    """V2 saves what is new in the encoder cache once the forward is done (V1 saved each
    output as the encoder cached it); E exports it, and its bytes are the encoder's."""
    steps = rig.e.run(rig.request("e-saved", "v2-saved"))
    [step] = [s for s in steps if not s.idle]
    assert step.output.scheduled_encoder_inputs == {"e-saved": [0]}  # encoded in this step
    assert "v2-saved" in step.cached
    params = rig.e.finished["e-saved"].ec_transfer_params
    assert params["v2-saved"]["encoder_id"] == "enc0"
    # What E holds, read as any consumer would: Resolve over gRPC, then a NIXL READ.
    resolver = Resolver(consumer_id="v2-reader", compatibility_hash=rig.fingerprint)
    puller = Puller(Arena(4 * MiB))
    try:
        [item] = pull(resolver, puller, rig.control, ["v2-saved"])
        assert torch.equal(item.tensor, encoder_output("v2-saved"))
        puller.free(item)
    finally:
        resolver.close()


def test_a_pulled_item_is_in_the_encoder_cache_when_the_forward_gathers_it(rig):
    """The scheduler side says the item is available and puts its load in the step's
    metadata; `start_load_caches`, called by ActiveECConnector before the forward, puts
    it in the encoder cache, bit for bit what E's encoder made."""
    params = rig.encode("v2-pulled")
    load = rig.pd.run(rig.request("pd-pulled", "v2-pulled", params))[-1]
    assert loaded(load) == ["v2-pulled"]
    assert load.output.scheduled_encoder_inputs == {}  # loaded, not encoded
    # The forward gathered it (a miss would have raised) and it stays in the cache.
    expected = encoder_output("v2-pulled")
    assert torch.equal(rig.pd_runner.gathered["v2-pulled"], expected)
    assert torch.equal(rig.pd_runner.cache.encoder_outputs["v2-pulled"], expected)
    assert rig.pd.finished["pd-pulled"].new_token_ids == [SAMPLED_TOKEN]


def test_a_pull_that_lands_while_pd_is_idle_needs_no_forward_step(rig):
    """PD gets the request before E has encoded its image (a proxy that sends both at
    once): its engine steps without tokens, every step through `no_forward` (V1 skipped
    the connector on such steps), while E encodes and PD pulls; the request is scheduled
    once the item has landed, and loaded in that step, its first with tokens."""
    request = rig.request("pd-idle", "v2-idle", announce_params())
    with ThreadPoolExecutor(1) as engine_loop:
        first = len(rig.pd.steps)
        running = engine_loop.submit(rig.pd.run, request)

        def idling() -> bool:
            return running.done() or len(rig.pd.steps) >= first + IDLE_STEPS

        assert wait_until(idling, STEPS_S)
        assert not running.done(), running.result()  # raises what stopped PD's engine
        rig.encode("v2-idle")
        *idle, load = running.result(timeout=RUN_TIMEOUT_S)
    assert len(idle) >= IDLE_STEPS
    for step in idle:
        assert step.idle and loaded(step) == []
        assert "v2-idle" not in step.cached
    assert not load.idle and loaded(load) == ["v2-idle"]
    assert torch.equal(rig.pd_runner.gathered["v2-idle"], encoder_output("v2-idle"))


def test_an_item_claimed_for_pd_is_pulled_before_pd_takes_any_step(rig):
    """E's request names the PD that will serve it; E announces the item to that PD with
    a claim, which it takes from the step's metadata in `save_caches` (V2 calls it after
    the forward, the metadata still bound). PD pulls the item over its worker link while
    its engine, without requests, takes no step at all: an idle vLLM engine waits for
    input, so step metadata could not carry this pull, on V2 either. The request, when
    it comes, is scheduled and loaded in its first step."""
    params = rig.encode("v2-claimed", {"consumer_id": PD_ID})
    before = len(rig.pd.steps)
    consumer = rig.pd.scheduler.ec_connector._consumer
    assert wait_until(lambda: pulled(consumer, "v2-claimed"), PULL_S)
    assert len(rig.pd.steps) == before
    [load] = rig.pd.run(rig.request("pd-claimed", "v2-claimed", params))
    assert loaded(load) == ["v2-claimed"]
    assert torch.equal(rig.pd_runner.gathered["v2-claimed"], encoder_output("v2-claimed"))

"""The proxy app on loopback, between stub encoders and a stub PD: what it forwards, read
by vLLM's own chat parser; how many items it takes; how many encoder requests it keeps in
flight; how many bytes its encoders get; how many bytes of bodies it holds; that a client
who hangs up leaves nothing running behind it.

The stubs stand for vLLM instances where only the request matters: each reads what it is
sent with vLLM's `parse_chat_messages` (the tiny model's config; no engine) and records
the mm uuids vLLM would take as mm_hashes. A stub encoder "exports" each item under that
name, and the proxy's directory of held items learns it, as with --encoder-events. Like
vLLM, a stub stops working on a request whose connection closes (and counts it).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import io
import json
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from PIL import Image

from ec_nixl.proxy import app as proxy
from ec_nixl.proxy.media import name_by_content
from integration.client import chat_body, image
from integration.tiny_vlm import build

ATTACKER, VICTIM = image(201), image(202)
VICTIM_NAME = name_by_content(chat_body(VICTIM)).ids[(0, 0)]  # as anyone can compute it
CHAT = "/v1/chat/completions"
LIKE_VLLM = {"handler_cancellation": True}  # a stub's handler ends when its client leaves


@pytest.fixture(scope="module")
def model_config(tmp_path_factory):
    from vllm.config import ModelConfig

    return ModelConfig(model=str(build(tmp_path_factory.mktemp("model") / "tiny-llava")))


class Directory:
    """The encoders' export events, as the proxy's --encoder-events directory sees them."""

    def __init__(self) -> None:
        self.held: dict[str, str] = {}

    def holder(self, mm_hash: str) -> str | None:
        return self.held.get(mm_hash)

    def close(self) -> None:
        pass


@dataclass
class Stub:
    """An encoder or PD: records each request and the mm uuids vLLM derives from it."""

    model_config: Any = None
    directory: Directory | None = None  # an encoder: exports under vLLM's uuids
    delay_s: float = 0.0
    gate: asyncio.Event | None = None  # an encoder: answers once it is set
    bodies: list[dict] = field(default_factory=list)
    uuids: list[str | None] = field(default_factory=list)
    received_bytes: int = 0
    live: list[int] = field(default_factory=lambda: [0, 0])  # [now, most], shared by encoders
    abandoned: int = 0  # requests whose connection closed before the answer

    async def chat(self, request: web.Request) -> web.Response:
        raw = await request.read()
        self.received_bytes += len(raw)
        body = json.loads(raw)
        self.bodies.append(body)
        self.live[0] += 1
        self.live[1] = max(self.live[1], self.live[0])
        try:
            uuids = await self._vllm_uuids(body)
            await asyncio.sleep(self.delay_s)
            if self.gate is not None:
                await self.gate.wait()
        except asyncio.CancelledError:
            self.abandoned += 1
            raise
        finally:
            self.live[0] -= 1
        self.uuids += uuids
        params = {}
        if self.directory is not None:
            for uuid in filter(None, uuids):
                self.directory.held[uuid] = "enc0"
                params[uuid] = {"encoder_id": "enc0"}
        return web.json_response(
            {"ec_transfer_params": params, "choices": [{"message": {"content": "ok"}}]}
        )

    async def _vllm_uuids(self, body: dict) -> list[str | None]:
        if self.model_config is None:
            return []
        from vllm.renderers.chat_utils import parse_chat_messages

        # In a thread: vLLM fetches remote media with blocking calls (from our own stub).
        _, _, mm_uuids = await asyncio.to_thread(
            parse_chat_messages, body["messages"], self.model_config, "openai"
        )
        return [uuid for uuids in (mm_uuids or {}).values() for uuid in uuids]


async def remote_image(request: web.Request) -> web.Response:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buffer, "PNG")
    return web.Response(body=buffer.getvalue(), content_type="image/png")


@dataclass
class Rig:
    url: str
    encoders: list[Stub]
    pd: Stub
    media_url: str  # a remote image, on loopback
    session: aiohttp.ClientSession

    async def post(self, body: dict) -> tuple[int, str]:
        async with self.session.post(self.url + CHAT, json=body) as reply:
            return reply.status, await reply.text()

    @property
    def encoder_bodies(self) -> list[dict]:
        return [body for encoder in self.encoders for body in encoder.bodies]

    @property
    def encoder_uuids(self) -> list[str | None]:
        return [uuid for encoder in self.encoders for uuid in encoder.uuids]


@contextlib.asynccontextmanager
async def rig(
    encoders: int = 2,
    *,
    model_config=None,
    delay_s: float = 0.0,
    gate: asyncio.Event | None = None,
    pd_delay_s: float = 0.0,
    **options,
):
    """The proxy app in front of stub encoders and a stub PD, all on loopback; a stub
    takes `delay_s` (PD: `pd_delay_s`) to answer."""
    runners = []

    async def serve(app: web.Application) -> str:
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    live = [0, 0]
    stubs = [
        Stub(model_config, options.get("directory"), delay_s, gate, live=live)
        for _ in range(encoders)
    ]
    pd = Stub(model_config, delay_s=pd_delay_s)
    urls = []
    for stub in stubs:
        app = web.Application(client_max_size=1 << 30, handler_args=LIKE_VLLM)
        app.router.add_post(CHAT, stub.chat)
        urls.append(await serve(app))
    pd_app = web.Application(client_max_size=1 << 30, handler_args=LIKE_VLLM)
    pd_app.router.add_post(CHAT, pd.chat)
    pd_app.router.add_get("/cat.png", remote_image)
    pd_url = await serve(pd_app)
    url = await serve(proxy.make_app(urls, [proxy.PD(pd_url)], 30.0, **options))
    try:
        async with aiohttp.ClientSession() as session:
            yield Rig(url, stubs, pd, pd_url + "/cat.png", session)
    finally:
        for runner in reversed(runners):
            await runner.cleanup()


def attacks(remote_url: str) -> dict[str, dict]:
    """The parts that carried a client's uuid to E and PD: the attacker's image (or a URL
    of its choosing) under the name of the victim's."""
    return {
        "typed remote URL": {"type": "image_url", "image_url": {"url": remote_url}},
        "no type, inline data": {"image_url": {"url": ATTACKER}},
        "DATA: in capitals": {"type": "image_url", "image_url": {"url": "DATA" + ATTACKER[4:]}},
        "type text with an image_url key": {"type": "text", "image_url": {"url": ATTACKER}},
    }


def request_with(part: dict) -> dict:
    body = chat_body([])
    body["messages"][0]["content"].insert(0, {**part, "uuid": VICTIM_NAME})
    return body


def test_one_tenant_cannot_bind_its_image_to_another_tenants_name(model_config):
    async def scenario():
        directory = Directory()
        async with rig(model_config=model_config, directory=directory) as proxy_:
            for form, part in attacks(proxy_.media_url).items():
                status, text = await proxy_.post(request_with(part))
                assert status == 200, (form, text)
            uuid_only = {"image_url": None}  # media by a uuid alone: vLLM's cache, by our name
            status, text = await proxy_.post(request_with(uuid_only))
            assert status == 400 and "uuid but no data" in text
            seen = proxy_.encoder_bodies + proxy_.pd.bodies
            assert len(proxy_.pd.bodies) == 4 and not any(
                VICTIM_NAME in json.dumps(b) for b in seen
            )
            assert VICTIM_NAME not in proxy_.encoder_uuids + proxy_.pd.uuids
            assert VICTIM_NAME not in directory.held

            encoded = len(proxy_.encoder_bodies)
            assert (await proxy_.post(chat_body(VICTIM)))[0] == 200
            [asked] = proxy_.encoder_bodies[encoded:]  # the victim's image went to an encoder
            assert VICTIM in json.dumps(asked) and proxy_.encoder_uuids[-1] == VICTIM_NAME
            assert proxy_.pd.uuids[-1] == VICTIM_NAME  # PD keys it by its own content name

    asyncio.run(scenario())


def test_a_request_with_more_items_than_the_cap_is_refused_before_any_encoder_sees_it():
    async def scenario():
        async with rig(max_media_items=3) as proxy_:
            status, text = await proxy_.post(chat_body([image(n) for n in range(4)]))
            assert status == 400 and "more than 3 media items" in text
            assert "--max-media-items" in text and proxy_.encoder_bodies == []
            assert (await proxy_.post(chat_body([image(n) for n in range(3)])))[0] == 200
            assert len(proxy_.encoder_bodies) == 3

    asyncio.run(scenario())


def test_the_default_cap_refuses_thousands_of_items():
    async def scenario():
        async with rig() as proxy_:
            items = [f"data:image/png;base64,{n:08d}" for n in range(5000)]
            status, text = await proxy_.post(chat_body(items))
            assert status == 400 and f"more than {proxy.DEFAULT_MAX_MEDIA_ITEMS} media" in text

    asyncio.run(scenario())


def test_encoder_requests_in_flight_never_exceed_the_concurrency():
    async def scenario():
        async with rig(encoder_concurrency=3, max_media_items=12, delay_s=0.05) as proxy_:
            assert (await proxy_.post(chat_body([image(n) for n in range(12)])))[0] == 200
            assert len(proxy_.encoder_bodies) == 12
            assert proxy_.encoders[0].live[1] == 3  # both encoders, together

    asyncio.run(scenario())


def test_the_default_concurrency_leaves_connections_for_pd_and_health():
    async def scenario():
        async with rig(delay_s=0.05) as proxy_:
            items = [image(n) for n in range(proxy.DEFAULT_MAX_MEDIA_ITEMS)]
            assert (await proxy_.post(chat_body(items)))[0] == 200
            assert proxy_.encoders[0].live[1] == proxy.DEFAULT_ENCODER_CONCURRENCY
        pool = inspect.signature(aiohttp.TCPConnector).parameters["limit"].default
        assert pool > proxy.DEFAULT_ENCODER_CONCURRENCY

    asyncio.run(scenario())


def test_encoders_get_each_item_once_and_none_of_the_conversation():
    text = "x" * 80_000
    items = [
        f"data:image/png;base64,{base64.b64encode(bytes([n]) * 48).decode()}" for n in range(200)
    ]
    body = chat_body(items, tools=[{"type": "function", "function": {"name": "f" * 2000}}])
    body["messages"][0]["content"].append({"type": "text", "text": text})
    request_bytes = len(json.dumps(body))

    async def scenario():
        async with rig(max_media_items=200) as proxy_:
            assert (await proxy_.post(body))[0] == 200
            assert len(proxy_.encoder_bodies) == 200
            sent = sum(encoder.received_bytes for encoder in proxy_.encoders)
            assert sent < request_bytes  # before: each of the 200 shares held the whole text
            assert not any("tools" in share for share in proxy_.encoder_bodies)
            assert text in json.dumps(proxy_.pd.bodies[0])  # PD gets the whole request

    asyncio.run(scenario())


def padded(nbytes: int) -> dict:
    """A chat request with one image, padded with text to about `nbytes`."""
    body = chat_body(image(0))
    body["messages"][0]["content"].append({"type": "text", "text": ""})
    body["messages"][0]["content"][-1]["text"] = "x" * (nbytes - len(json.dumps(body)))
    return body


async def chunked(body: dict):
    """The body sent without a Content-Length, in pieces."""
    data, piece = json.dumps(body).encode(), 64 << 10
    for at in range(0, len(data), piece):
        yield data[at : at + piece]


async def until(condition, timeout_s: float = 10.0) -> bool:
    end = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        if asyncio.get_running_loop().time() > end:
            return False
        await asyncio.sleep(0.01)
    return True


def test_a_body_over_the_size_bound_is_refused_before_any_encoder_sees_it():
    async def scenario():
        async with rig(max_body_bytes=100_000) as proxy_:
            status, text = await proxy_.post(padded(150_000))
            assert status == 413 and "over 100000 bytes (the proxy's --max-body-bytes)" in text
            url = proxy_.url + CHAT
            async with proxy_.session.post(url, data=chunked(padded(150_000))) as reply:
                assert reply.status == 413
            assert proxy_.encoder_bodies == []
            assert (await proxy_.post(padded(90_000)))[0] == 200

    asyncio.run(scenario())


def test_bodies_past_the_bound_in_flight_are_turned_away_until_room_is_made():
    async def scenario():
        gate = asyncio.Event()
        bounds = {"max_body_bytes": 600_000, "max_body_bytes_in_flight": 1_000_000}
        async with rig(1, gate=gate, **bounds) as proxy_:
            first = asyncio.create_task(proxy_.post(padded(500_000)))
            assert await until(lambda: proxy_.encoders[0].live[0] == 1)  # its body is held
            url = proxy_.url + CHAT
            async with proxy_.session.post(url, json=padded(550_000)) as reply:
                assert reply.status == 503 and reply.headers["Retry-After"] == "1"
                assert "--max-body-bytes-in-flight (1000000)" in await reply.text()
            async with proxy_.session.post(url, data=chunked(padded(550_000))) as reply:
                assert reply.status == 503
            assert len(proxy_.encoder_bodies) == 1
            gate.set()
            assert (await first)[0] == 200
            assert (await proxy_.post(padded(550_000)))[0] == 200  # its body's room is back

    asyncio.run(scenario())


async def hang_up_after(proxy_: Rig, body: dict, seconds: float) -> bool:
    """Send a request that is not streamed and hang up after `seconds`: whether the
    answer had come by then."""
    try:
        async with proxy_.session.post(
            proxy_.url + CHAT, json=body, timeout=aiohttp.ClientTimeout(total=seconds)
        ) as reply:
            await reply.read()
    except TimeoutError:
        return False
    return True


def test_a_client_that_leaves_ends_its_request_at_pd():
    async def scenario():
        async with rig(pd_delay_s=60) as proxy_:
            assert not await hang_up_after(proxy_, chat_body(image(1)), 0.5)
            assert await until(lambda: proxy_.pd.abandoned == 1)

    asyncio.run(scenario())


def test_a_client_that_leaves_during_encoding_ends_its_encoder_and_pd_requests():
    async def scenario():
        async with rig(delay_s=60, pd_delay_s=60, overlap=True) as proxy_:
            assert not await hang_up_after(proxy_, chat_body(image(1)), 0.5)
            assert await until(lambda: proxy_.pd.abandoned == 1)
            assert await until(lambda: sum(e.abandoned for e in proxy_.encoders) == 1)
            assert len(proxy_.encoder_bodies) == 1

    asyncio.run(scenario())

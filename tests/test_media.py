"""How the proxy names a request's media items (their mm_hash in vLLM) and splits them.

A part is media if vLLM takes it for media, whatever its `type` says: each shape below
is checked against vLLM's own part parser (vllm/renderers/chat_utils.py, as installed),
on what the client sent and on what the proxy forwards.
"""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
from vllm.renderers import chat_utils
from vllm.renderers.chat_utils import BaseMultiModalContentParser

from ec_nixl.proxy.media import (
    KEYS,
    PART_TYPES,
    SOURCES,
    TEXT_TYPES,
    MediaError,
    TooManyItems,
    content_id,
    name_by_content,
    split_by_item,
    without,
)
from integration.client import chat_body, image

A, B = image(1), image(2)
VICTIM = content_id("image", B)  # the name of another tenant's image: what an attacker sends
REMOTE = "https://example.com/cat.png"
AUDIO = "data:audio/wav;base64,UklGRg=="
EMBEDS = "ZW1iZWRkaW5ncw=="  # base64 of a tensor, as a client sends image_embeds


def parts(body) -> list[dict]:
    return [part for message in body["messages"] for part in message["content"]]


def with_part(part) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": [part, "Describe it."]}]}


def forwarded(part) -> dict:
    return parts(name_by_content(with_part(part)).body)[0]


def recording(name: str):
    def record(self, data, uuid=None):
        self.calls.append((name, data, uuid))

    return record


class Recorder(BaseMultiModalContentParser):
    """vLLM's content parser with its media loading replaced by a record of each call:
    (what vLLM would load, its data, the uuid vLLM would take as the mm_hash)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, object, str | None]] = []

    @property
    def model_config(self):
        return SimpleNamespace(enable_prompt_embeds=False)

    parse_image = recording("image")
    parse_image_embeds = recording("image_embeds")
    parse_image_pil = recording("image_pil")
    parse_audio = recording("audio")
    parse_input_audio = recording("input_audio")
    parse_audio_embeds = recording("audio_embeds")
    parse_video = recording("video")
    parse_video_embeds = recording("video_embeds")
    parse_prompt_embeds = recording("prompt_embeds")


def vllm_reads(part) -> list[tuple[str, object, str | None]]:
    """What vLLM 0.32's chat parser does with the part: each media item it would load."""
    recorder = Recorder()
    chat_utils._parse_chat_message_content_part(
        part, recorder, wrap_dicts=True, interleave_strings=False
    )
    return recorder.calls


# The five forms that carried a client's uuid to E and PD, and the other shapes vLLM
# takes for media. NAMED and UNNAMED: the client's part, what vLLM loads from it.
NAMED = {
    "no type, inline data": ({"image_url": {"url": A}, "uuid": VICTIM}, "image", A),
    "DATA: in capitals": (
        {"type": "image_url", "image_url": {"url": "DATA" + A[4:]}, "uuid": VICTIM},
        "image",
        "DATA" + A[4:],
    ),
    "type text with an image_url key": (
        {"type": "text", "text": "hi", "image_url": {"url": A}, "uuid": VICTIM},
        "image",
        A,
    ),
    "image_url as a string": ({"image_url": A, "uuid": VICTIM}, "image", A),
    "a type vLLM does not know": (
        {"type": "picture", "image_url": {"url": A}, "uuid": VICTIM},
        "image",
        A,
    ),
    "a uuid that is a number": (
        {"type": "image_url", "image_url": {"url": A}, "uuid": 7},
        "image",
        A,
    ),
    "input_image (Responses API)": (
        {"type": "input_image", "image_url": A, "detail": "auto"},
        "image",
        A,
    ),
    "input_image with a uuid": (
        {"type": "input_image", "image_url": A, "detail": "auto", "uuid": VICTIM},
        "image",
        A,
    ),
    "audio_url": (
        {"type": "audio_url", "audio_url": {"url": AUDIO}, "uuid": VICTIM},
        "audio",
        AUDIO,
    ),
    "input_audio": (
        {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}, "uuid": 1},
        "input_audio",
        {"data": "UklGRg==", "format": "wav"},
    ),
    "video_url, no type": (
        {"video_url": {"url": "data:video/mp4;base64,AAAA"}, "uuid": VICTIM},
        "video",
        "data:video/mp4;base64,AAAA",
    ),
    "image_embeds": (
        {"type": "image_embeds", "image_embeds": EMBEDS, "uuid": VICTIM},
        "image_embeds",
        EMBEDS,
    ),
    "audio_embeds, a dict": (
        {"audio_embeds": {"audio_embeds": EMBEDS}, "uuid": VICTIM},
        "audio_embeds",
        {"audio_embeds": EMBEDS},
    ),
    "video_embeds, type text": (
        {"type": "text", "video_embeds": EMBEDS, "uuid": VICTIM},
        "video_embeds",
        EMBEDS,
    ),
    "image_pil": (
        {"type": "image_pil", "image_pil": "not a picture", "uuid": VICTIM},
        "image_pil",
        "not a picture",
    ),
    "two media keys: vLLM reads the first": (
        {"type": "audio_url", "audio_url": {"url": REMOTE}, "image_url": {"url": A}, "uuid": 1},
        "image",
        A,
    ),
}
UNNAMED = {
    "typed remote URL": (
        {"type": "image_url", "image_url": {"url": REMOTE}, "uuid": VICTIM},
        "image",
        REMOTE,
    ),
    "remote URL, no type": ({"image_url": REMOTE, "uuid": VICTIM}, "image", REMOTE),
    "file URL": (
        {"type": "video_url", "video_url": {"url": "file:///srv/a.mp4"}, "uuid": VICTIM},
        "video",
        "file:///srv/a.mp4",
    ),
    "remote URL, no uuid": ({"type": "image_url", "image_url": {"url": REMOTE}}, "image", REMOTE),
}
UUID_ONLY = {
    "no type and a uuid only": {"uuid": VICTIM},
    "image_url null": {"image_url": None, "uuid": VICTIM},
    "typed, no data": {"type": "image_url", "uuid": VICTIM},
    "an empty URL": {"type": "image_url", "image_url": {"url": ""}, "uuid": VICTIM},
    "input_audio without data": {
        "type": "input_audio",
        "input_audio": {"data": "", "format": "wav"},
        "uuid": VICTIM,
    },
    "embeddings vLLM does not read": {"type": "image_embeds", "image_embeds": [1], "uuid": VICTIM},
    "a text part with a uuid": {"type": "text", "text": "hi", "uuid": VICTIM},
}


@pytest.mark.parametrize("name", NAMED)
def test_every_inline_item_vllm_reads_is_named_by_its_content_whatever_its_type(name):
    part, loads, data = NAMED[name]
    [sent] = vllm_reads(part)
    assert sent[:2] == (loads, data)  # what vLLM makes of the client's part
    [got] = vllm_reads(forwarded(part))
    assert got[:2] == (loads, data)  # the proxy changed the name, not the item
    assert got[2] not in (None, VICTIM, "7", "1") and got[2] == forwarded(part)["uuid"]
    assert name_by_content(with_part(part)).ids == {(0, 0): got[2]}


@pytest.mark.parametrize("name", UNNAMED)
def test_a_remote_url_is_not_named_and_loses_the_client_uuid(name):
    part, loads, data = UNNAMED[name]
    named = name_by_content(with_part(part))
    assert vllm_reads(forwarded(part)) == [(loads, data, None)]  # vLLM hashes what it fetches
    assert named.ids == {} and named.items == [(0, 0)]
    assert named.replaced_uuids == ("uuid" in part)


@pytest.mark.parametrize("name", UUID_ONLY)
def test_a_uuid_without_data_is_refused(name):
    with pytest.raises(MediaError, match="uuid but no data"):
        name_by_content(with_part(UUID_ONLY[name]))


def test_no_client_uuid_reaches_vllm_whatever_the_part():
    for part, _, _ in (*NAMED.values(), *UNNAMED.values()):
        body = json.dumps(name_by_content(with_part(part)).body)
        assert VICTIM not in body and '"uuid": 7' not in body and '"uuid": 1' not in body


def test_a_uuid_on_a_part_that_is_not_media_is_dropped():
    part = {"type": "text", "prompt_embeds": None, "data": EMBEDS, "uuid": VICTIM}
    assert vllm_reads(part) == vllm_reads(forwarded(part)) == [("prompt_embeds", EMBEDS, None)]
    assert forwarded(part) == {"type": "prompt_embeds", "prompt_embeds": None, "data": EMBEDS}
    assert name_by_content(with_part(part)).replaced_uuids == 1


def test_the_same_data_read_as_two_kinds_of_media_gets_two_names():
    image_part = {"type": "image_url", "image_url": {"url": AUDIO}}
    audio_part = {"type": "audio_url", "audio_url": {"url": AUDIO}}
    assert forwarded(image_part)["uuid"] != forwarded(audio_part)["uuid"]


def test_the_proxy_knows_every_part_type_vllm_knows():
    assert set(chat_utils.MM_PARSER_MAP) == PART_TYPES
    assert TEXT_TYPES == chat_utils.TEXT_PART_TYPES
    assert set(SOURCES) | {"prompt_embeds"} == chat_utils._MEDIA_CONTENT_PART_KEYS
    assert set(KEYS) == chat_utils._MEDIA_CONTENT_PART_KEYS - {"input_image"} | {"tool_reference"}


def test_inline_items_are_named_by_their_content_and_the_request_is_left_as_it_was():
    body = chat_body([A, B, A])
    sent = copy.deepcopy(body)
    named = name_by_content(body)
    assert body == sent
    a, b = content_id("image", A), content_id("image", B)
    assert [part.get("uuid") for part in parts(named.body)] == [a, b, a, None]  # the text part
    assert named.ids == {(0, 0): a, (0, 1): b, (0, 2): a}
    assert named.hashes_known and named.replaced_uuids == 0


def test_a_client_uuid_is_replaced_by_the_content_id_and_counted():
    body = chat_body(A)
    body["messages"][0]["content"][0]["uuid"] = VICTIM
    named = name_by_content(body)
    assert parts(named.body)[0]["uuid"] == content_id("image", A) and named.replaced_uuids == 1


def test_with_processor_kwargs_vllm_hashes_more_than_the_name():
    assert not name_by_content(chat_body(A, mm_processor_kwargs={"size": 1})).hashes_known


def test_a_request_with_more_items_than_the_cap_is_refused():
    assert len(name_by_content(chat_body([A, B, A]), max_items=3).items) == 3
    with pytest.raises(TooManyItems, match="more than 2 media items") as refused:
        name_by_content(chat_body([A, B, A]), max_items=2)
    assert refused.value.cap == 2


def test_without_removes_the_given_items_and_keeps_the_text():
    body = chat_body([A, B])
    assert parts(without(body, [(0, 0)])) == [parts(body)[1], parts(body)[2]]
    assert without(body, []) is body


def test_split_by_item_gives_each_item_a_request_of_its_own():
    body = name_by_content(chat_body([A, B], mm_processor_kwargs={"size": 1})).body
    shares = split_by_item(body)
    assert [vllm_reads(part) for share in shares for part in parts(share)] == [
        [("image", A, content_id("image", A))], [("image", B, content_id("image", B))]
    ]  # fmt: skip
    assert all(share["mm_processor_kwargs"] == {"size": 1} for share in shares)
    assert split_by_item(chat_body(A)) == [chat_body(A)]


def test_shares_carry_each_item_once_and_none_of_the_conversation():
    text = "x" * 80_000
    items = [f"data:image/png;base64,{n:08d}" for n in range(200)]
    body = chat_body(items)
    body["messages"].insert(0, {"role": "system", "content": text})
    body["messages"][1]["content"].append({"type": "text", "text": text})
    shares = split_by_item(name_by_content(body).body)
    assert len(shares) == 200
    overhead = len(json.dumps({**split_by_item(chat_body([A, B]))[0], "messages": []}))
    for share, item in zip(shares, items, strict=True):
        assert len(json.dumps(share)) < overhead + len(item) + 200  # the item, its name

"""How the proxy names a request's media items (their mm_hash in vLLM) and splits them."""

from __future__ import annotations

import copy

import pytest

from ec_nixl.media import MediaError, content_id, name_by_content, split_by_item, without
from integration.client import chat_body, image

A, B = image(1), image(2)


def parts(body) -> list[dict]:
    return [part for message in body["messages"] for part in message["content"]]


def test_inline_items_are_named_by_their_content_and_the_request_is_left_as_it_was():
    body = chat_body([A, B, A])
    sent = copy.deepcopy(body)
    named = name_by_content(body)
    assert body == sent
    assert [part.get("uuid") for part in parts(named.body)] == [
        content_id(A), content_id(B), content_id(A), None  # the text part
    ]  # fmt: skip
    assert named.ids == {(0, 0): content_id(A), (0, 1): content_id(B), (0, 2): content_id(A)}
    assert named.hashes_known and named.replaced_uuids == 0


def test_a_client_uuid_is_replaced_by_the_content_id_and_counted():
    body = chat_body(A)
    body["messages"][0]["content"][0]["uuid"] = content_id(B)  # another image's name
    named = name_by_content(body)
    assert parts(named.body)[0]["uuid"] == content_id(A) and named.replaced_uuids == 1


def test_an_item_named_by_a_uuid_without_its_data_is_refused():
    body = chat_body(A)
    body["messages"][0]["content"][0] = {"type": "image_url", "image_url": None, "uuid": "x"}
    with pytest.raises(MediaError, match="uuid but no data"):
        name_by_content(body)


def test_remote_urls_are_not_named_their_bytes_can_change_behind_them():
    named = name_by_content(chat_body("https://example.com/cat.png"))
    assert named.ids == {} and "uuid" not in parts(named.body)[0]


def test_with_processor_kwargs_vllm_hashes_more_than_the_name():
    assert not name_by_content(chat_body(A, mm_processor_kwargs={"size": 1})).hashes_known


def test_without_removes_the_given_items_and_keeps_the_text():
    body = chat_body([A, B])
    assert parts(without(body, [(0, 0)])) == [parts(body)[1], parts(body)[2]]
    assert without(body, []) is body


def test_split_by_item_gives_each_item_its_own_request():
    shares = split_by_item(chat_body([A, B]))
    assert [[p.get("image_url", {}).get("url") for p in parts(s)] for s in shares] == [
        [A, None], [B, None]
    ]  # fmt: skip
    assert split_by_item(chat_body(A)) == [chat_body(A)]

"""The media items of an OpenAI chat request, as the proxy handles them.

vLLM keys each item's encoder output by its `mm_hash`, and takes a client's
`uuid` for an item as that hash (unless the request carries processor
kwargs, which vLLM hashes in). So a proxy that names each item by its
content knows every item's `mm_hash` before sending the request anywhere:
it can tell which items an encoder already holds. Only inline media
(`data:` URLs) are named: a remote URL's bytes can change behind it, and
each instance hashes what it fetched. A client's own `uuid` is never
trusted (another tenant's image may sit under it): on an inline item it is
replaced, and an item with a `uuid` but no data, which asks vLLM to reuse
whatever it cached under that name, is refused.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

MEDIA_PARTS = ("image_url", "image")
# Request fields vLLM hashes into an item's mm_hash beside a uuid: with them, the
# hash is not the uuid, and the proxy cannot know it beforehand.
HASHED_KWARGS = ("mm_processor_kwargs", "media_io_kwargs")

Position = tuple[int, int]  # (message index, content part index)


class MediaError(ValueError):
    """A request the proxy will not forward, with the reason for the client."""


@dataclass
class Named:
    """A request whose inline media items carry content ids as their `uuid`."""

    body: dict[str, Any]
    ids: dict[Position, str] = field(default_factory=dict)  # each named item's content id
    replaced_uuids: int = 0  # client uuids that differed from the content id
    hashes_known: bool = True  # vLLM will use the ids as mm_hashes


def content_id(url: str) -> str:
    """An inline item's name: the SHA-256 of its data URL."""
    return hashlib.sha256(url.encode()).hexdigest()


def media_positions(body: dict[str, Any]) -> list[Position]:
    messages = body.get("messages")
    if not isinstance(messages, list):
        return []
    return [
        (m, p)
        for m, message in enumerate(messages)
        if isinstance(message, dict) and isinstance(message.get("content"), list)
        for p, part in enumerate(message["content"])
        if isinstance(part, dict) and part.get("type") in MEDIA_PARTS
    ]


def name_by_content(body: dict[str, Any]) -> Named:
    """The request with each inline item's `uuid` set to its content id, or MediaError."""
    named = Named(body={**body}, hashes_known=not any(body.get(k) for k in HASHED_KWARGS))
    positions = media_positions(body)
    if not positions:
        return named
    messages = named.body["messages"] = list(body["messages"])
    for m, p in positions:
        part = messages[m]["content"][p]
        url = _inline_url(part)
        if url is None:
            if part.get("uuid") is not None and not _has_data(part):
                raise MediaError(
                    "a media item with a uuid but no data: this proxy names media by their "
                    "content, send the item itself"
                )
            continue
        uid = content_id(url)
        if part.get("uuid") not in (None, uid):
            named.replaced_uuids += 1
        if messages[m] is body["messages"][m]:  # copy each message once, before changing it
            messages[m] = {**messages[m], "content": list(messages[m]["content"])}
        messages[m]["content"][p] = {**part, "uuid": uid}
        named.ids[(m, p)] = uid
    return named


def _inline_url(part: dict[str, Any]) -> str | None:
    value = part.get(part.get("type"))
    url = value.get("url") if isinstance(value, dict) else value
    return url if isinstance(url, str) and url.startswith("data:") else None


def _has_data(part: dict[str, Any]) -> bool:
    value = part.get(part.get("type"))
    return bool(value.get("url") if isinstance(value, dict) else value)


def without(body: dict[str, Any], drop: Iterable[Position]) -> dict[str, Any]:
    """The request without the media items at `drop` (its text stays)."""
    drop = set(drop)
    if not drop:
        return body
    messages = list(body["messages"])
    for m in {m for m, _ in drop}:
        kept = [part for p, part in enumerate(messages[m]["content"]) if (m, p) not in drop]
        messages[m] = {**messages[m], "content": kept}
    return {**body, "messages": messages}


def split_by_item(body: dict[str, Any]) -> list[dict[str, Any]]:
    """One request per media item (the others removed), or [body] for one item or none.

    An item's mm_hash depends on the item alone, so each encoder can encode its
    share and PD finds every item by the hash it computes itself.
    """
    positions = media_positions(body)
    if len(positions) <= 1:
        return [body]
    return [without(body, [other for other in positions if other != keep]) for keep in positions]

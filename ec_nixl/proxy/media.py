"""The media items of an OpenAI chat request, as the proxy handles them.

vLLM keys each item's encoder output by its `mm_hash`, and takes an item's
`uuid` as that hash (unless the request carries processor kwargs, which vLLM
hashes in). So a proxy that names each item by its content knows every item's
`mm_hash` before sending the request anywhere: it can tell which items an
encoder already holds. A client's `uuid` is never passed on: another tenant's
image may sit under it.

Which content parts are media is vLLM's call, and vLLM reads a part one of two
ways (`_parse_chat_message_content_mm_part`, vllm/renderers/chat_utils.py): a
part with a `uuid`, or without a `type`, by the first media key it holds
(`image_url`, `image_pil`, ...), whatever its `type` says; any other part by its
`type`. The proxy reads each part as vLLM would, and forwards every part it
changes in one form that both ways read alike (its `type` and one media key):
- inline data (a `data:` URL in any case, `input_audio`, embeddings): named by
  the SHA-256 of what vLLM will read, which becomes the part's `uuid`;
- a remote URL (`http(s):`, `file:`): not named, a client's `uuid` dropped; each
  instance hashes the bytes it fetched, which can change behind the URL;
- a `uuid` without data, which asks vLLM to reuse whatever it cached under that
  name: refused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

# vLLM's part types (its MM_PARSER_MAP) that hold text, not media.
TEXT_TYPES = frozenset({"text", "thinking", "input_text", "output_text", "refusal"})
# The keys vLLM looks for, in its order, in a part with a `uuid` or without a `type`.
KEYS = (
    "image_url", "image_pil", "image_embeds", "audio_embeds", "video_embeds", "prompt_embeds",
    "audio_url", "input_audio", "video_url", "tool_reference",
)  # fmt: skip
# Media part types and what vLLM makes of their data: two items with the same source
# and the same data are one item (an `input_audio` becomes an audio `data:` URL).
SOURCES = {
    "image_url": "image", "input_image": "image", "image_pil": "image_pil",
    "image_embeds": "image_embeds", "audio_url": "audio", "input_audio": "audio",
    "audio_embeds": "audio_embeds", "video_url": "video", "video_embeds": "video_embeds",
}  # fmt: skip
URL_TYPES = ("image_url", "audio_url", "video_url")  # their data: {"url": URL}
PART_TYPES = TEXT_TYPES | set(KEYS) | set(SOURCES)
# Request fields vLLM hashes into an item's mm_hash beside a uuid: with them, the
# hash is not the uuid, and the proxy cannot know it beforehand.
HASHED_KWARGS = ("mm_processor_kwargs", "media_io_kwargs")

Position = tuple[int, int]  # (message index, content part index)


class MediaError(ValueError):
    """A request the proxy will not forward, with the reason for the client."""


class TooManyItems(MediaError):
    """A request with more media items than the proxy takes in one."""

    def __init__(self, cap: int) -> None:
        super().__init__(f"more than {cap} media items in one request")
        self.cap = cap


@dataclass
class Named:
    """A request whose inline media items carry content ids as their `uuid`."""

    body: dict[str, Any]
    ids: dict[Position, str] = field(default_factory=dict)  # each named item's content id
    items: list[Position] = field(default_factory=list)  # every media item with data
    replaced_uuids: int = 0  # client uuids dropped or replaced by a different content id
    hashes_known: bool = True  # vLLM will use the ids as mm_hashes


@dataclass(frozen=True)
class Reading:
    """A content part as vLLM reads it."""

    type: str  # the part type vLLM takes it for, whatever its `type` field says
    data: Any  # what vLLM reads: a URL (input_audio's as vLLM builds it), embeddings, ...;
    # falsy for none

    @property
    def key(self) -> str:
        """The part's key that holds the data."""
        return "image_url" if self.type == "input_image" else self.type


def content_id(source: str, data: str) -> str:
    """An inline item's name: the SHA-256 of its source and the data vLLM reads."""
    return hashlib.sha256(f"{source}\n{data}".encode()).hexdigest()


def read(part: Any) -> Reading | None:
    """The part as vLLM 0.32 reads it; None for a plain string or a part vLLM refuses."""
    if not isinstance(part, dict):
        return None
    part_type, uuid = part.get("type"), part.get("uuid")
    if isinstance(part_type, str) and part_type in PART_TYPES and uuid is None:
        kind = part_type
    elif part_type is None or uuid is not None:
        kind = next((key for key in KEYS if key in part), None)
        if kind is None:
            return None  # "Missing 'type' field in multimodal part."
    else:
        return None  # a type vLLM does not know
    if kind in TEXT_TYPES:
        return Reading(kind, part.get(kind))
    if kind == "prompt_embeds":
        return Reading(kind, part.get("data"))
    if kind == "tool_reference":
        return Reading(kind, part.get("name"))
    value = part.get("image_url" if kind == "input_image" else kind)
    if kind in URL_TYPES and isinstance(value, dict):
        value = value.get("url")
    elif kind == "input_audio" and isinstance(value, dict):
        # What vLLM makes of it (MultiModalContentParser.parse_input_audio).
        data = value.get("data", "")
        value = f"data:audio/{value.get('format', '')};base64,{data}" if data else None
    elif kind.endswith("_embeds") and not isinstance(value, dict | str):
        value = None  # vLLM reads no embeddings from anything else
    return Reading(kind, value)


def media_positions(body: dict[str, Any]) -> list[Position]:
    """Where the request's media items with data are, in order."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return []
    return [
        (m, p)
        for m, message in enumerate(messages)
        if isinstance(message, dict) and isinstance(message.get("content"), list)
        for p, part in enumerate(message["content"])
        if _is_item(read(part))
    ]


def _is_item(reading: Reading | None) -> bool:
    return reading is not None and reading.type in SOURCES and bool(reading.data)


def name_by_content(body: dict[str, Any], max_items: int | None = None) -> Named:
    """The request with each inline item named by its content id and no client uuid
    left; MediaError if a part cannot be named, TooManyItems past `max_items`."""
    named = Named(body={**body}, hashes_known=not any(body.get(k) for k in HASHED_KWARGS))
    messages = body.get("messages")
    if not isinstance(messages, list):
        return named
    changed: dict[Position, dict[str, Any]] = {}
    for m, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("content"), list)):
            continue
        for p, part in enumerate(message["content"]):
            reading = read(part)
            uuid = part.get("uuid") if isinstance(part, dict) else None
            if _is_item(reading):
                named.items.append((m, p))
                if max_items is not None and len(named.items) > max_items:
                    raise TooManyItems(max_items)
            elif uuid is not None and (reading is None or reading.type in SOURCES):
                raise MediaError(
                    "a media item with a uuid but no data: this proxy names media by their "
                    "content, send the item itself"
                )
            elif uuid is None:
                continue  # text, or what vLLM refuses by itself
            uid = _name(reading)
            if uuid is not None and uuid != uid:
                named.replaced_uuids += 1
            if uid is not None:
                named.ids[(m, p)] = uid
            if uid is not None or uuid is not None:
                changed[(m, p)] = _canonical(part, reading, uid)
    if changed:
        named.body["messages"] = _replace(messages, changed)
    return named


def _name(reading: Reading) -> str | None:
    """An item's content id; None for a remote URL or a part that is not media."""
    data = reading.data
    if reading.type not in SOURCES:
        return None
    if reading.type in (*URL_TYPES, "input_image", "input_audio"):
        if not isinstance(data, str):
            raise MediaError(f"cannot read a {reading.type} item: its data must be a string")
        if data[:5].lower() != "data:":  # as vLLM's MediaConnector.load_from_url tells
            return None
    else:  # embeddings, image_pil: vLLM reads the value as the proxy forwards it
        data = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return content_id(SOURCES[reading.type], data)


def _canonical(part: dict[str, Any], reading: Reading, uid: str | None) -> dict[str, Any]:
    """The part with only the data vLLM reads, under a `type` that says so: read alike
    with a `uuid` or without one. `uid` becomes its uuid."""
    forwarded = {k: v for k, v in part.items() if k not in KEYS and k not in ("type", "uuid")}
    forwarded["type"] = reading.type
    value = part.get(reading.key)
    if reading.type in URL_TYPES and not isinstance(value, dict):
        value = {"url": value}
    if reading.key in part:
        forwarded[reading.key] = value
    if uid is not None:
        forwarded["uuid"] = uid
    return forwarded


def _replace(messages: list[Any], changed: dict[Position, dict[str, Any]]) -> list[Any]:
    """The messages with the parts at `changed`'s positions replaced; each message
    with a changed part is copied, once."""
    messages = list(messages)
    contents: dict[int, list[Any]] = {}
    for (m, p), part in changed.items():
        if m not in contents:
            contents[m] = list(messages[m]["content"])
            messages[m] = {**messages[m], "content": contents[m]}
        contents[m][p] = part
    return messages


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
    """One request per media item, or [body] for one item or none.

    An item's mm_hash depends on the item alone, so each encoder can encode its
    share and PD finds every item by the hash it computes itself. A share is the
    request's settings and one user message holding its item, nothing else of the
    conversation: the shares together are the size of the request, not that times
    the number of items.
    """
    positions = media_positions(body)
    if len(positions) <= 1:
        return [body]
    settings = {k: v for k, v in body.items() if k != "messages"}
    messages = body["messages"]
    return [
        {**settings, "messages": [{"role": "user", "content": [messages[m]["content"][p]]}]}
        for m, p in positions
    ]

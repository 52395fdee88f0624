"""The `ec_transfer_params` a PD request carries: where its encoder outputs are.

Two forms, from the proxy:
- after the encoders answered, one entry per item,
  `{mm_hash: {"encoder_id": "enc0"}, ...}`; keyed by item, so a proxy that sent
  one request's images to several encoders merges their answers with a plain
  dict union;
- sent at the same time as the request goes to the encoders (so PD's front end
  overlaps the encoding), `{"*": {"encoder_id": "*"}}`: each item not named is
  being encoded, and PD waits for one of its encoders to announce it on its
  event stream.
The request an encoder gets may carry `{"consumer_id": "pd0"}`: the PD that will
serve it, which the encoder then announces the request's items to with a claim
(PD prefetches them; other PDs do not). An encoder is named by id, never by
address: the PD side maps ids to the endpoints it was configured with, so a
client cannot steer it to an arbitrary host. Everything here comes from the
client and is checked as hostile input.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ec_nixl.errors import RefusedError

ENCODER_ID = "encoder_id"
CONSUMER_ID = "consumer_id"
# What vLLM's own connectors report per item (`collect_ec_item_metadata`: the
# placeholder fields a consumer needs to skip media preprocessing), carried
# beside the encoder id so that vLLM's example EPD proxy can use it; unused here.
VLLM_ITEM_KEYS = frozenset({"metadata", "item_indices"})
VLLM_ITEM_LIST = "ec_items"  # vLLM's example EPD proxy adds it to PD's params; unused here
ANNOUNCED = "*"  # as an item key: every item not named; as an encoder id: whichever announces it
MAX_ITEMS = 1024
MAX_ID_LENGTH = 256


@dataclass(frozen=True)
class Sources:
    """Where a request's items come from."""

    items: dict[str, str] = field(default_factory=dict)  # mm_hash -> encoder id holding it
    announced: bool = False  # the items not named will be announced by an encoder


def make_params(encoder_id: str, mm_hashes: Iterable[str]) -> dict[str, dict[str, str]]:
    return {mm_hash: {ENCODER_ID: encoder_id} for mm_hash in mm_hashes}


def announce_params() -> dict[str, dict[str, str]]:
    return {ANNOUNCED: {ENCODER_ID: ANNOUNCED}}


def parse_params(params: Any, known_encoders: Iterable[str]) -> Sources:
    """Where the items are, or RefusedError saying what is wrong (nothing is contacted)."""
    if params is None:
        return Sources()
    if not isinstance(params, dict):
        raise RefusedError(f"ec_transfer_params must be an object, got {type(params).__name__}")
    if len(params) > MAX_ITEMS:
        raise RefusedError(f"ec_transfer_params names {len(params)} items; at most {MAX_ITEMS}")
    known = set(known_encoders)
    items: dict[str, str] = {}
    for key, entry in params.items():
        if key == VLLM_ITEM_LIST and isinstance(entry, list):
            continue
        if not isinstance(key, str) or not 0 < len(key) <= MAX_ID_LENGTH:
            raise RefusedError(f"ec_transfer_params: bad item key {str(key)[:64]!r}")
        encoder_id = entry.get(ENCODER_ID) if isinstance(entry, dict) else None
        if not isinstance(encoder_id, str) or not set(entry) <= {ENCODER_ID, *VLLM_ITEM_KEYS}:
            raise RefusedError(
                f"ec_transfer_params[{key!r}] must be {{{ENCODER_ID!r}: id}}, beside it only "
                "vLLM's metadata and item_indices (params of another connector?)"
            )
        if (key == ANNOUNCED) != (encoder_id == ANNOUNCED):
            raise RefusedError(
                f"ec_transfer_params: {ANNOUNCED!r} goes with {ANNOUNCED!r} only, "
                f"got {key[:64]!r}: {encoder_id[:64]!r}"
            )
        if key != ANNOUNCED and encoder_id not in known:
            raise RefusedError(
                f"ec_transfer_params[{key!r}] names encoder {encoder_id[:64]!r}, "
                f"which is not configured (known: {', '.join(sorted(known))})"
            )
        items[key] = encoder_id
    announced = items.pop(ANNOUNCED, None) is not None
    return Sources(items, announced)


def consumer_params(consumer_id: str) -> dict[str, str]:
    """What the proxy tells an encoder: the PD that will serve this request."""
    return {CONSUMER_ID: consumer_id}


def parse_consumer(params: Any) -> str:
    """The PD an encoder's request is meant for ("" for none), or RefusedError."""
    if params is None:
        return ""
    consumer = params.get(CONSUMER_ID) if isinstance(params, dict) else None
    if (
        not isinstance(consumer, str)
        or len(params) != 1
        or not 0 < len(consumer) <= MAX_ID_LENGTH
        or not consumer.replace("-", "").replace("_", "").isalnum()
    ):
        raise RefusedError(
            f"an encoder's ec_transfer_params must be {{{CONSUMER_ID!r}: name}} "
            f"(letters, digits, '-', '_'), got {str(params)[:64]!r}"
        )
    return consumer

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
(PD prefetches them; other PDs do not), and its answer says so beside each
item's encoder id (`"claimed_for": "pd0"`): a request that reaches that PD
before the announcement waits a moment for its claim instead of resolving.
An encoder is named by id, never by address: the PD side maps ids to the
endpoints it was configured with, so a client cannot steer it to an arbitrary
host. Everything here comes from the
client and is checked as hostile input.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ec_nixl.control.messages import MAX_CONSUMER_ID_LENGTH, consumer_id_problem
from ec_nixl.errors import RefusedError

ENCODER_ID = "encoder_id"
CONSUMER_ID = "consumer_id"
CLAIMED_FOR = "claimed_for"
VLLM_ITEM_LIST = "ec_items"  # vLLM's example EPD proxy adds it to PD's params; unused here
ANNOUNCED = "*"  # as an item key: every item not named; as an encoder id: whichever announces it
MAX_ITEMS = 1024
MAX_ID_LENGTH = 256
MAX_ENTRY_KEYS = 16
MAX_MODALITY_LENGTH = 64


def _is_indices(value: Any) -> bool:
    return (
        isinstance(value, list)
        and all(type(index) is int and index >= 0 for index in value)
        and len(set(value)) == len(value)
    )


# What vLLM's own connectors report per item (`collect_ec_item_metadata`: the
# placeholder fields a consumer needs to skip media preprocessing), carried
# beside the encoder id so that vLLM's example EPD proxy can use it. PD reads
# none of it, but checks its type: a proxy may act on it. `modality` came with
# vLLM 0.33.
VLLM_ITEM_KEYS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "metadata": ("an object", lambda value: isinstance(value, dict)),
    "item_indices": ("a list of distinct indices", _is_indices),
    "modality": (
        "a modality name",
        lambda value: isinstance(value, str) and 0 < len(value) <= MAX_MODALITY_LENGTH,
    ),
}


@dataclass(frozen=True)
class Sources:
    """Where a request's items come from."""

    items: dict[str, str] = field(default_factory=dict)  # mm_hash -> encoder id holding it
    announced: bool = False  # the items not named will be announced by an encoder
    # Keys beside an item's encoder id that neither side knows, e.g. from a newer vLLM
    # on the encoder: followed anyway, like unknown protobuf fields, and reported.
    unknown_keys: frozenset[str] = frozenset()
    # mm_hash -> the PD its encoder announces it to with a claim
    claimed_for: dict[str, str] = field(default_factory=dict)


def make_params(
    encoder_id: str, mm_hashes: Iterable[str], claimed_for: str = ""
) -> dict[str, dict[str, str]]:
    entry = {ENCODER_ID: encoder_id, **({CLAIMED_FOR: claimed_for} if claimed_for else {})}
    return {mm_hash: dict(entry) for mm_hash in mm_hashes}


def announce_params() -> dict[str, dict[str, str]]:
    return {ANNOUNCED: {ENCODER_ID: ANNOUNCED}}


def parse_params(params: Any, known_encoders: Iterable[str]) -> Sources:
    """Where the items are, or RefusedError saying what is wrong (nothing is contacted).

    An item's entry needs our `encoder_id` (without it, it is another connector's);
    vLLM's keys beside it must have their types; any other key is tolerated and
    reported in `Sources.unknown_keys`, so that an encoder on a newer vLLM than PD's
    (a rolling upgrade) does not stop the pulls.
    """
    if params is None:
        return Sources()
    if not isinstance(params, dict):
        raise RefusedError(f"ec_transfer_params must be an object, got {type(params).__name__}")
    if len(params) > MAX_ITEMS:
        raise RefusedError(f"ec_transfer_params names {len(params)} items; at most {MAX_ITEMS}")
    known = set(known_encoders)
    items: dict[str, str] = {}
    claimed_for: dict[str, str] = {}
    unknown: set[str] = set()
    for key, entry in params.items():
        if key == VLLM_ITEM_LIST and isinstance(entry, list):
            continue
        if not isinstance(key, str) or not 0 < len(key) <= MAX_ID_LENGTH:
            raise RefusedError(f"ec_transfer_params: bad item key {str(key)[:64]!r}")
        encoder_id = _encoder_id(key, entry, unknown)
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
        if CLAIMED_FOR in entry:
            claimed_for[key] = _claimed_for(key, entry[CLAIMED_FOR])
    announced = items.pop(ANNOUNCED, None) is not None
    return Sources(items, announced, frozenset(unknown), claimed_for)


def _claimed_for(key: str, consumer: Any) -> str:
    if not isinstance(consumer, str) or not consumer or consumer_id_problem(consumer):
        raise RefusedError(
            f"ec_transfer_params[{key[:64]!r}][{CLAIMED_FOR!r}] must be a consumer id, "
            f"got {str(consumer)[:64]!r}"
        )
    return consumer


def _encoder_id(key: str, entry: Any, unknown: set[str]) -> str:
    """An item entry's encoder id, its vLLM keys checked and its unknown keys noted."""
    encoder_id = entry.get(ENCODER_ID) if isinstance(entry, dict) else None
    if not isinstance(encoder_id, str):
        raise RefusedError(
            f"ec_transfer_params[{key[:64]!r}] must be an object with {ENCODER_ID!r} "
            "(params of another connector?)"
        )
    if len(entry) > MAX_ENTRY_KEYS:
        raise RefusedError(
            f"ec_transfer_params[{key[:64]!r}] has {len(entry)} keys; at most {MAX_ENTRY_KEYS}"
        )
    for name, value in entry.items():
        if name in (ENCODER_ID, CLAIMED_FOR):
            continue
        if not isinstance(name, str) or not 0 < len(name) <= MAX_ID_LENGTH:
            raise RefusedError(f"ec_transfer_params[{key[:64]!r}]: bad key {str(name)[:64]!r}")
        if name not in VLLM_ITEM_KEYS:
            unknown.add(name)
            continue
        expected, valid = VLLM_ITEM_KEYS[name]
        if not valid(value):
            raise RefusedError(
                f"ec_transfer_params[{key[:64]!r}][{name!r}] must be {expected}, "
                f"got {str(value)[:64]!r}"
            )
    return encoder_id


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
        or not consumer
        or consumer_id_problem(consumer)
    ):
        raise RefusedError(
            f"an encoder's ec_transfer_params must be {{{CONSUMER_ID!r}: name}} (at most "
            f"{MAX_CONSUMER_ID_LENGTH} ASCII letters, digits, '-', '_', '.', ':'), got "
            f"{str(params)[:64]!r}"
        )
    return consumer

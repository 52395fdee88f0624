"""The `ec_transfer_params` that travel from the encoder's response to the PD request.

Schema: `{mm_hash: {"encoder_id": "enc0"}, ...}`, one entry per item. Keyed by
item, so a proxy that sent one request's images to several encoders merges
their answers with a plain dict union. An encoder is named by id, never by
address: the PD side maps ids to the endpoints it was configured with, so a
client cannot steer it to an arbitrary host. Everything here comes from the
client and is checked as hostile input.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ec_nixl.errors import RefusedError

ENCODER_ID = "encoder_id"
MAX_ITEMS = 1024
MAX_ID_LENGTH = 256


def make_params(encoder_id: str, mm_hashes: Iterable[str]) -> dict[str, dict[str, str]]:
    return {mm_hash: {ENCODER_ID: encoder_id} for mm_hash in mm_hashes}


def parse_params(params: Any, known_encoders: Iterable[str]) -> dict[str, str]:
    """mm_hash -> encoder id, or RefusedError saying what is wrong (nothing is contacted)."""
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise RefusedError(f"ec_transfer_params must be an object, got {type(params).__name__}")
    if len(params) > MAX_ITEMS:
        raise RefusedError(f"ec_transfer_params names {len(params)} items; at most {MAX_ITEMS}")
    known = set(known_encoders)
    where: dict[str, str] = {}
    for mm_hash, entry in params.items():
        if not isinstance(mm_hash, str) or not 0 < len(mm_hash) <= MAX_ID_LENGTH:
            raise RefusedError(f"ec_transfer_params: bad item key {str(mm_hash)[:64]!r}")
        encoder_id = entry.get(ENCODER_ID) if isinstance(entry, dict) else None
        if not isinstance(encoder_id, str) or len(entry) != 1:
            raise RefusedError(f"ec_transfer_params[{mm_hash!r}] must be {{{ENCODER_ID!r}: id}}")
        if encoder_id not in known:
            raise RefusedError(
                f"ec_transfer_params[{mm_hash!r}] names encoder {encoder_id[:64]!r}, "
                f"which is not configured (known: {', '.join(sorted(known))})"
            )
        where[mm_hash] = encoder_id
    return where

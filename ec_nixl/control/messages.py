"""What crosses the control plane, as dataclasses, and their protobuf forms.

The rest of the package works with these dataclasses; only this module and the
servicer touch generated protobuf classes.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, field, replace
from enum import Enum
from math import prod
from typing import TYPE_CHECKING

from ec_nixl.errors import HandshakeError, RefusedError
from ec_nixl.region import GUARD_BYTES, Region, guard_address
from ec_nixl.v1 import export_pb2 as pb

if TYPE_CHECKING:  # torch is loaded where a descriptor is parsed: the proxy never does
    import torch

# 1: handshake, resolve, release, renew, watch.
# 2: leases count readers (one per consumer rank); a watcher may ask for claims,
#    leased descriptors sent with each announcement; items stay cached after reads.
# 3: ENCODING events: the encoder is about to encode an item.
# 4: descriptors carry a guard, read after the bytes to prove they were still the item's.
PROTOCOL_VERSION = 4

# How a consumer names itself to an exporter, which counts its leases under that name:
# ASCII letters, digits and "-_.:", at most MAX_CONSUMER_ID_LENGTH; "" names nobody.
MAX_CONSUMER_ID_LENGTH = 128
_CONSUMER_ID = re.compile(r"[A-Za-z0-9_.:-]*")

# Embeddings are floating point; anything else in a descriptor is refused.
DTYPES = ("bfloat16", "float16", "float32")


class EventKind(Enum):
    """What an encoder's event says of an item."""

    EXPORTED = "exported"
    EVICTED = "evicted"
    ENCODING = "encoding"  # the encoder's step is about to encode it


def consumer_id_problem(consumer_id: str) -> str | None:
    """What is wrong with a consumer id (never quoting it: it may be megabytes), or None."""
    if len(consumer_id) > MAX_CONSUMER_ID_LENGTH or not _CONSUMER_ID.fullmatch(consumer_id):
        return (
            f"consumer_id must be at most {MAX_CONSUMER_ID_LENGTH} ASCII letters, digits, '-', "
            f"'_', '.' and ':' (got {len(consumer_id)} characters)"
        )
    return None


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise RefusedError(f"dtype {dtype} cannot be exported; supported: {', '.join(DTYPES)}")
    return name


@dataclass(frozen=True)
class PeerInfo:
    """What a handshake taught us about an exporter."""

    agent_name: str
    agent_metadata: bytes
    epoch: int
    regions: tuple[Region, ...]

    @classmethod
    def from_pb(cls, reply: pb.HandshakeResponse) -> PeerInfo:
        """Parse a handshake answer, refusing agent metadata damaged in transit."""
        if hashlib.sha256(reply.agent_metadata).digest() != reply.agent_metadata_sha256:
            raise HandshakeError(f"agent metadata of {reply.agent_name!r} damaged in transit")
        return cls(
            agent_name=reply.agent_name,
            agent_metadata=reply.agent_metadata,
            epoch=reply.epoch,
            regions=tuple(region_from_pb(r) for r in reply.regions),
        )

    def to_pb(self) -> pb.HandshakeResponse:
        return pb.HandshakeResponse(
            protocol_version=PROTOCOL_VERSION,
            agent_name=self.agent_name,
            agent_metadata=self.agent_metadata,
            agent_metadata_sha256=hashlib.sha256(self.agent_metadata).digest(),
            epoch=self.epoch,
            regions=[region_to_pb(r) for r in self.regions],
        )


@dataclass(frozen=True)
class RemoteItem:
    """One leased item of an exporter: where its bytes are and what they mean."""

    mm_hash: str
    agent_name: str
    epoch: int
    region: Region
    dtype: torch.dtype
    shape: tuple[int, ...]
    lease_id: int
    lease_remaining_s: float
    guard: int

    @property
    def guard_region(self) -> Region:
        """Where the exporter keeps `guard` while the item is in its slot."""
        return replace(self.region, address=guard_address(self.region), length=GUARD_BYTES)

    def to_pb(self) -> pb.ItemDescriptor:
        return pb.ItemDescriptor(
            mm_hash=self.mm_hash,
            agent_name=self.agent_name,
            epoch=self.epoch,
            address=self.region.address,
            length=self.region.length,
            device=self.region.device,
            device_id=self.region.device_id,
            dtype=dtype_name(self.dtype),
            shape=self.shape,
            lease_id=self.lease_id,
            lease_remaining_ms=int(self.lease_remaining_s * 1000),
            guard=self.guard,
        )

    @classmethod
    def from_pb(cls, item: pb.ItemDescriptor) -> RemoteItem:
        """Parse a descriptor, refusing one whose dtype, shape and length disagree."""
        if item.dtype not in DTYPES:
            raise RefusedError(f"{item.mm_hash}: unsupported dtype {item.dtype!r}")
        import torch

        dtype = getattr(torch, item.dtype)
        shape = tuple(item.shape)
        if not shape or any(d <= 0 for d in shape):
            raise RefusedError(f"{item.mm_hash}: bad shape {list(shape)}")
        if prod(shape) * dtype.itemsize != item.length:
            raise RefusedError(
                f"{item.mm_hash}: {item.length} bytes do not hold {item.dtype}{list(shape)}"
            )
        return cls(
            mm_hash=item.mm_hash,
            agent_name=item.agent_name,
            epoch=item.epoch,
            region=Region(item.address, item.length, item.device, item.device_id),
            dtype=dtype,
            shape=shape,
            lease_id=item.lease_id,
            lease_remaining_s=item.lease_remaining_ms / 1000,
            guard=item.guard,
        )


@dataclass(frozen=True)
class Announcement:
    """One event of an exporter's stream as a consumer received it; an EXPORTED event
    carries a `claim` when the consumer asked for claims."""

    kind: EventKind
    mm_hash: str
    length: int
    epoch: int = 0  # of the exporter process that sent it
    claim: RemoteItem | None = None
    snapshot: bool = False  # held when the stream began, not a new export
    published_unix_ns: int = field(default=0, compare=False)  # encoder's wall clock; 0: unsaid
    received_at: float = field(default_factory=time.monotonic)


def region_to_pb(region: Region) -> pb.MemoryRegion:
    return pb.MemoryRegion(
        address=region.address,
        length=region.length,
        device=region.device,
        device_id=region.device_id,
    )


def region_from_pb(region: pb.MemoryRegion) -> Region:
    return Region(region.address, region.length, region.device, region.device_id)


# A consumer's READ carries this NIXL notification; on arrival the exporter counts
# one reader of each lease done, so a successful pull needs no release round trip.
READ_DONE_PREFIX = b"ec-nixl-read:"


def read_notification(lease_ids: list[int]) -> bytes:
    return READ_DONE_PREFIX + ",".join(map(str, lease_ids)).encode()


def parse_read_notification(message: bytes) -> list[int]:
    """Lease ids in a read notification; [] for anything else (it is peer input)."""
    if not message.startswith(READ_DONE_PREFIX):
        return []
    try:
        return [int(x) for x in message[len(READ_DONE_PREFIX) :].split(b",")]
    except ValueError:
        return []

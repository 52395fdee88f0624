from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class HandshakeRequest(_message.Message):
    __slots__ = ("protocol_version", "compatibility_hash", "consumer_id")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    COMPATIBILITY_HASH_FIELD_NUMBER: _ClassVar[int]
    CONSUMER_ID_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    compatibility_hash: str
    consumer_id: str
    def __init__(self, protocol_version: _Optional[int] = ..., compatibility_hash: _Optional[str] = ..., consumer_id: _Optional[str] = ...) -> None: ...

class MemoryRegion(_message.Message):
    __slots__ = ("address", "length", "device", "device_id")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    address: int
    length: int
    device: str
    device_id: int
    def __init__(self, address: _Optional[int] = ..., length: _Optional[int] = ..., device: _Optional[str] = ..., device_id: _Optional[int] = ...) -> None: ...

class HandshakeResponse(_message.Message):
    __slots__ = ("protocol_version", "compatibility_hash", "agent_name", "agent_metadata", "agent_metadata_sha256", "epoch", "regions")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    COMPATIBILITY_HASH_FIELD_NUMBER: _ClassVar[int]
    AGENT_NAME_FIELD_NUMBER: _ClassVar[int]
    AGENT_METADATA_FIELD_NUMBER: _ClassVar[int]
    AGENT_METADATA_SHA256_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    compatibility_hash: str
    agent_name: str
    agent_metadata: bytes
    agent_metadata_sha256: bytes
    epoch: int
    regions: _containers.RepeatedCompositeFieldContainer[MemoryRegion]
    def __init__(self, protocol_version: _Optional[int] = ..., compatibility_hash: _Optional[str] = ..., agent_name: _Optional[str] = ..., agent_metadata: _Optional[bytes] = ..., agent_metadata_sha256: _Optional[bytes] = ..., epoch: _Optional[int] = ..., regions: _Optional[_Iterable[_Union[MemoryRegion, _Mapping]]] = ...) -> None: ...

class ResolveRequest(_message.Message):
    __slots__ = ("mm_hashes", "consumer_id", "lease_ms", "readers")
    MM_HASHES_FIELD_NUMBER: _ClassVar[int]
    CONSUMER_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    READERS_FIELD_NUMBER: _ClassVar[int]
    mm_hashes: _containers.RepeatedScalarFieldContainer[str]
    consumer_id: str
    lease_ms: int
    readers: int
    def __init__(self, mm_hashes: _Optional[_Iterable[str]] = ..., consumer_id: _Optional[str] = ..., lease_ms: _Optional[int] = ..., readers: _Optional[int] = ...) -> None: ...

class ItemDescriptor(_message.Message):
    __slots__ = ("mm_hash", "agent_name", "epoch", "address", "length", "device", "device_id", "dtype", "shape", "lease_id", "lease_remaining_ms", "guard")
    MM_HASH_FIELD_NUMBER: _ClassVar[int]
    AGENT_NAME_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_REMAINING_MS_FIELD_NUMBER: _ClassVar[int]
    GUARD_FIELD_NUMBER: _ClassVar[int]
    mm_hash: str
    agent_name: str
    epoch: int
    address: int
    length: int
    device: str
    device_id: int
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    lease_id: int
    lease_remaining_ms: int
    guard: int
    def __init__(self, mm_hash: _Optional[str] = ..., agent_name: _Optional[str] = ..., epoch: _Optional[int] = ..., address: _Optional[int] = ..., length: _Optional[int] = ..., device: _Optional[str] = ..., device_id: _Optional[int] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., lease_id: _Optional[int] = ..., lease_remaining_ms: _Optional[int] = ..., guard: _Optional[int] = ...) -> None: ...

class ResolveResponse(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ItemDescriptor]
    def __init__(self, items: _Optional[_Iterable[_Union[ItemDescriptor, _Mapping]]] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("lease_ids",)
    LEASE_IDS_FIELD_NUMBER: _ClassVar[int]
    lease_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, lease_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: int
    def __init__(self, released: _Optional[int] = ...) -> None: ...

class WatchEventsRequest(_message.Message):
    __slots__ = ("consumer_id", "claim", "readers")
    CONSUMER_ID_FIELD_NUMBER: _ClassVar[int]
    CLAIM_FIELD_NUMBER: _ClassVar[int]
    READERS_FIELD_NUMBER: _ClassVar[int]
    consumer_id: str
    claim: bool
    readers: int
    def __init__(self, consumer_id: _Optional[str] = ..., claim: _Optional[bool] = ..., readers: _Optional[int] = ...) -> None: ...

class ExportEvent(_message.Message):
    __slots__ = ("kind", "mm_hash", "length", "epoch", "claim", "snapshot", "published_unix_ns", "seq")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[ExportEvent.Kind]
        EXPORTED: _ClassVar[ExportEvent.Kind]
        EVICTED: _ClassVar[ExportEvent.Kind]
        ENCODING: _ClassVar[ExportEvent.Kind]
    KIND_UNSPECIFIED: ExportEvent.Kind
    EXPORTED: ExportEvent.Kind
    EVICTED: ExportEvent.Kind
    ENCODING: ExportEvent.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    MM_HASH_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    CLAIM_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    kind: ExportEvent.Kind
    mm_hash: str
    length: int
    epoch: int
    claim: ItemDescriptor
    snapshot: bool
    published_unix_ns: int
    seq: int
    def __init__(self, kind: _Optional[_Union[ExportEvent.Kind, str]] = ..., mm_hash: _Optional[str] = ..., length: _Optional[int] = ..., epoch: _Optional[int] = ..., claim: _Optional[_Union[ItemDescriptor, _Mapping]] = ..., snapshot: _Optional[bool] = ..., published_unix_ns: _Optional[int] = ..., seq: _Optional[int] = ...) -> None: ...

class AcknowledgeRequest(_message.Message):
    __slots__ = ("watch_id", "seq")
    WATCH_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    watch_id: int
    seq: int
    def __init__(self, watch_id: _Optional[int] = ..., seq: _Optional[int] = ...) -> None: ...

class AcknowledgeResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

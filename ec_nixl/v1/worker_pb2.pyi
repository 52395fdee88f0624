from ec_nixl.v1 import export_pb2 as _export_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PullRequest(_message.Message):
    __slots__ = ("exporter_address", "peer", "items", "timeout_ms", "valid_for_ms")
    EXPORTER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    VALID_FOR_MS_FIELD_NUMBER: _ClassVar[int]
    exporter_address: str
    peer: _export_pb2.HandshakeResponse
    items: _containers.RepeatedCompositeFieldContainer[_export_pb2.ItemDescriptor]
    timeout_ms: int
    valid_for_ms: int
    def __init__(self, exporter_address: _Optional[str] = ..., peer: _Optional[_Union[_export_pb2.HandshakeResponse, _Mapping]] = ..., items: _Optional[_Iterable[_Union[_export_pb2.ItemDescriptor, _Mapping]]] = ..., timeout_ms: _Optional[int] = ..., valid_for_ms: _Optional[int] = ...) -> None: ...

class PullResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DropRequest(_message.Message):
    __slots__ = ("mm_hashes",)
    MM_HASHES_FIELD_NUMBER: _ClassVar[int]
    mm_hashes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, mm_hashes: _Optional[_Iterable[str]] = ...) -> None: ...

class DropResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

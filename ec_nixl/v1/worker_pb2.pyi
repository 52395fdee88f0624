from ec_nixl.v1 import export_pb2 as _export_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerCall(_message.Message):
    __slots__ = ("pull", "drop", "meet")
    PULL_FIELD_NUMBER: _ClassVar[int]
    DROP_FIELD_NUMBER: _ClassVar[int]
    MEET_FIELD_NUMBER: _ClassVar[int]
    pull: PullRequest
    drop: DropRequest
    meet: MeetRequest
    def __init__(self, pull: _Optional[_Union[PullRequest, _Mapping]] = ..., drop: _Optional[_Union[DropRequest, _Mapping]] = ..., meet: _Optional[_Union[MeetRequest, _Mapping]] = ...) -> None: ...

class WorkerAnswer(_message.Message):
    __slots__ = ("pull", "drop", "failure", "meet")
    PULL_FIELD_NUMBER: _ClassVar[int]
    DROP_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    MEET_FIELD_NUMBER: _ClassVar[int]
    pull: PullResponse
    drop: DropResponse
    failure: Failure
    meet: MeetResponse
    def __init__(self, pull: _Optional[_Union[PullResponse, _Mapping]] = ..., drop: _Optional[_Union[DropResponse, _Mapping]] = ..., failure: _Optional[_Union[Failure, _Mapping]] = ..., meet: _Optional[_Union[MeetResponse, _Mapping]] = ...) -> None: ...

class Failure(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("encoder_id", "items", "timeout_ms", "num_embeds", "valid_ms", "pull_id", "peer")
    ENCODER_ID_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    NUM_EMBEDS_FIELD_NUMBER: _ClassVar[int]
    VALID_MS_FIELD_NUMBER: _ClassVar[int]
    PULL_ID_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    encoder_id: str
    items: _containers.RepeatedCompositeFieldContainer[_export_pb2.ItemDescriptor]
    timeout_ms: int
    num_embeds: _containers.RepeatedScalarFieldContainer[int]
    valid_ms: int
    pull_id: int
    peer: _export_pb2.HandshakeResponse
    def __init__(self, encoder_id: _Optional[str] = ..., items: _Optional[_Iterable[_Union[_export_pb2.ItemDescriptor, _Mapping]]] = ..., timeout_ms: _Optional[int] = ..., num_embeds: _Optional[_Iterable[int]] = ..., valid_ms: _Optional[int] = ..., pull_id: _Optional[int] = ..., peer: _Optional[_Union[_export_pb2.HandshakeResponse, _Mapping]] = ...) -> None: ...

class PullResponse(_message.Message):
    __slots__ = ("bytes", "read_us")
    BYTES_FIELD_NUMBER: _ClassVar[int]
    READ_US_FIELD_NUMBER: _ClassVar[int]
    bytes: int
    read_us: int
    def __init__(self, bytes: _Optional[int] = ..., read_us: _Optional[int] = ...) -> None: ...

class DropRequest(_message.Message):
    __slots__ = ("mm_hashes", "pull_id")
    MM_HASHES_FIELD_NUMBER: _ClassVar[int]
    PULL_ID_FIELD_NUMBER: _ClassVar[int]
    mm_hashes: _containers.RepeatedScalarFieldContainer[str]
    pull_id: int
    def __init__(self, mm_hashes: _Optional[_Iterable[str]] = ..., pull_id: _Optional[int] = ...) -> None: ...

class DropResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MeetRequest(_message.Message):
    __slots__ = ("encoder_id", "peer", "timeout_ms")
    ENCODER_ID_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    encoder_id: str
    peer: _export_pb2.HandshakeResponse
    timeout_ms: int
    def __init__(self, encoder_id: _Optional[str] = ..., peer: _Optional[_Union[_export_pb2.HandshakeResponse, _Mapping]] = ..., timeout_ms: _Optional[int] = ...) -> None: ...

class MeetResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class PullRequest(_message.Message):
    __slots__ = ("encoder_id", "mm_hashes", "timeout_ms", "num_embeds")
    ENCODER_ID_FIELD_NUMBER: _ClassVar[int]
    MM_HASHES_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    NUM_EMBEDS_FIELD_NUMBER: _ClassVar[int]
    encoder_id: str
    mm_hashes: _containers.RepeatedScalarFieldContainer[str]
    timeout_ms: int
    num_embeds: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, encoder_id: _Optional[str] = ..., mm_hashes: _Optional[_Iterable[str]] = ..., timeout_ms: _Optional[int] = ..., num_embeds: _Optional[_Iterable[int]] = ...) -> None: ...

class PullResponse(_message.Message):
    __slots__ = ("bytes", "resolve_us", "read_us", "rows")
    BYTES_FIELD_NUMBER: _ClassVar[int]
    RESOLVE_US_FIELD_NUMBER: _ClassVar[int]
    READ_US_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    bytes: int
    resolve_us: int
    read_us: int
    rows: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, bytes: _Optional[int] = ..., resolve_us: _Optional[int] = ..., read_us: _Optional[int] = ..., rows: _Optional[_Iterable[int]] = ...) -> None: ...

class DropRequest(_message.Message):
    __slots__ = ("mm_hashes",)
    MM_HASHES_FIELD_NUMBER: _ClassVar[int]
    mm_hashes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, mm_hashes: _Optional[_Iterable[str]] = ...) -> None: ...

class DropResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

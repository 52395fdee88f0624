"""One table between typed errors and gRPC status codes, used in both directions
(and by the worker link, which carries the same codes over its own socket)."""

from __future__ import annotations

import grpc

from ec_nixl.errors import (
    AuthError,
    DeadlineExceededError,
    ECNixlError,
    HandshakeError,
    NotFoundError,
    PeerDeadError,
    PoolFullError,
    RefusedError,
    StaleDataError,
)

_TABLE: tuple[tuple[type[ECNixlError], grpc.StatusCode], ...] = (
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (AuthError, grpc.StatusCode.UNAUTHENTICATED),
    (HandshakeError, grpc.StatusCode.FAILED_PRECONDITION),
    (DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (PeerDeadError, grpc.StatusCode.UNAVAILABLE),
    (PoolFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (RefusedError, grpc.StatusCode.INVALID_ARGUMENT),
    (StaleDataError, grpc.StatusCode.ABORTED),
)
_ERROR_OF = {code: error for error, code in _TABLE} | {grpc.StatusCode.PERMISSION_DENIED: AuthError}


def status_of(exc: ECNixlError) -> grpc.StatusCode:
    return next(
        (code for error, code in _TABLE if isinstance(exc, error)), grpc.StatusCode.INTERNAL
    )


def error_of(code: grpc.StatusCode, message: str) -> ECNixlError:
    """The typed error for a status code; a code we do not map means an unusable peer."""
    return _ERROR_OF.get(code, PeerDeadError)(message)


def translate(exc: grpc.RpcError, peer: str) -> ECNixlError:
    """The typed error for a failed call; the message names the peer."""
    code = exc.code()
    return error_of(code, f"{peer}: {code.name}: {exc.details()}")

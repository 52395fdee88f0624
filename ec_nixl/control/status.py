"""One table between typed errors and gRPC status codes, used in both directions."""

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


def translate(exc: grpc.RpcError, peer: str) -> ECNixlError:
    """The typed error for a failed call; the message names the peer."""
    code = exc.code()
    error = _ERROR_OF.get(code, PeerDeadError)
    return error(f"{peer}: {code.name}: {exc.details()}")

"""Who may talk to an exporter: an optional shared token and optional TLS.

The token travels as `authorization: Bearer <token>` metadata and is compared
in constant time; health checks stay open so orchestrators can probe.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from pathlib import Path

import grpc

from ec_nixl.errors import ConfigError

AUTH_HEADER = "authorization"
OPEN_METHODS = ("/grpc.health.v1.Health/",)


@dataclass(frozen=True)
class Security:
    """Token and TLS files; all optional. A server needs cert and key, a client the CA."""

    token: str | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_ca_file: Path | None = None

    def __post_init__(self) -> None:
        # Half a pair would silently serve plaintext, and clients would send the token in it.
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            given, missing = (
                ("tls_cert_file", "tls_key_file")
                if self.tls_cert_file
                else ("tls_key_file", "tls_cert_file")
            )
            raise ConfigError(
                f"{given} is set but {missing} is not: TLS needs both (else the control plane "
                "would serve plaintext)"
            )

    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        return ((AUTH_HEADER, f"Bearer {self.token}"),) if self.token else ()

    def server_credentials(self) -> grpc.ServerCredentials | None:
        if not (self.tls_cert_file and self.tls_key_file):
            return None
        pair = (Path(self.tls_key_file).read_bytes(), Path(self.tls_cert_file).read_bytes())
        return grpc.ssl_server_credentials([pair])

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        if not self.tls_ca_file:
            return None
        return grpc.ssl_channel_credentials(root_certificates=Path(self.tls_ca_file).read_bytes())


class TokenInterceptor(grpc.ServerInterceptor):
    """Aborts every call without the shared token with UNAUTHENTICATED."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith(OPEN_METHODS):
            return continuation(handler_call_details)
        presented = dict(handler_call_details.invocation_metadata or ()).get(AUTH_HEADER, "")
        if hmac.compare_digest(presented.encode(), self._expected):
            return continuation(handler_call_details)
        return _deny(continuation(handler_call_details))


def _deny(handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler | None:
    if handler is None:
        return None

    def abort(request, context: grpc.ServicerContext):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token")

    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(
            abort, handler.request_deserializer, handler.response_serializer
        )
    return grpc.unary_unary_rpc_method_handler(
        abort, handler.request_deserializer, handler.response_serializer
    )

"""Who may talk to an exporter: an optional shared token and optional TLS.

The token travels as `authorization: Bearer <token>` metadata and is compared
in constant time; health checks stay open so orchestrators can probe.
"""

from __future__ import annotations

import argparse
import hmac
import os
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc

from ec_nixl.errors import ConfigError

AUTH_HEADER = "authorization"
TOKEN_ENV = "EC_NIXL_TOKEN"  # where commands that call encoders take the token from
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


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    """`--token` and `--tls-ca` for a command that calls encoders' control planes."""
    parser.add_argument(
        "--token", default=os.environ.get(TOKEN_ENV),
        help=f"the encoders' control-plane token (default: ${TOKEN_ENV}, which keeps it "
        "out of the process list)",
    )  # fmt: skip
    parser.add_argument(
        "--tls-ca", type=Path, metavar="FILE",
        help="CA that signed the encoders' control-plane certificates (TLS)",
    )  # fmt: skip


def client_security(args: argparse.Namespace) -> Security:
    return Security(token=args.token, tls_ca_file=args.tls_ca)


class AccessInterceptor(grpc.ServerInterceptor):
    """Who gets a server thread, and when.

    A gRPC server thread that runs a unary method waits for the request body, and
    a caller may never send it. So a call without the token (when one is set) is
    turned away before its body is read, holding a thread for microseconds; and
    the open health checks, which anyone may call, run on threads of their own:
    calls held open there never take the export service's.
    """

    def __init__(self, token: str | None, open_threads: futures.ThreadPoolExecutor) -> None:
        self._expected = f"Bearer {token}".encode() if token else None
        self._open_threads = open_threads

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        if handler_call_details.method.startswith(OPEN_METHODS):
            return _on_threads(handler, self._open_threads)
        if self._expected is None:
            return handler
        presented = dict(handler_call_details.invocation_metadata or ()).get(AUTH_HEADER, "")
        if hmac.compare_digest(presented.encode(), self._expected):
            return handler
        return _deny(handler)


def _on_threads(
    handler: grpc.RpcMethodHandler, threads: futures.ThreadPoolExecutor
) -> grpc.RpcMethodHandler:
    """`handler` run on `threads`. A non-blocking method (health's Watch: it answers
    through a callback and returns at once) stays non-blocking, else each open Watch
    would hold one of the few threads that Check needs."""
    behavior = handler.unary_unary or handler.unary_stream
    if behavior is None:
        return handler  # health has no request-streaming method

    def run(request, context, *callback):
        return behavior(request, context, *callback)

    run.experimental_thread_pool = threads  # grpc's hook for a per-method pool
    run.experimental_non_blocking = getattr(behavior, "experimental_non_blocking", False)
    make = (
        grpc.unary_stream_rpc_method_handler
        if handler.response_streaming
        else grpc.unary_unary_rpc_method_handler
    )
    return make(run, handler.request_deserializer, handler.response_serializer)


def _deny(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler that answers UNAUTHENTICATED at once: it takes the request as a stream
    it never reads, so gRPC runs it without waiting for a body."""

    def abort(requests, context: grpc.ServicerContext):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token")

    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(
            abort, handler.request_deserializer, handler.response_serializer
        )
    return grpc.stream_unary_rpc_method_handler(
        abort, handler.request_deserializer, handler.response_serializer
    )

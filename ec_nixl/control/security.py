"""Who may talk to an exporter: an optional shared token and optional TLS.

The token travels as `authorization: Bearer <token>` metadata and is compared
in constant time; health checks stay open so orchestrators can probe. Every
component takes it from one place, `resolve_token`: an explicit value first
(ec_connector_extra_config `token`, `--token`), else a token file readable by
its owner alone (`token_file`, `--token-file`), else $EC_NIXL_TOKEN. An
explicit value is best left out: it sits in the process list, where every user
of the host can read it, and in vLLM's log of its arguments. No log line or
error message here ever holds the token.
"""

from __future__ import annotations

import argparse
import hmac
import logging
import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError

from ec_nixl.errors import ConfigError

logger = logging.getLogger(__name__)

AUTH_HEADER = "authorization"
TOKEN_ENV = "EC_NIXL_TOKEN"
MAX_TOKEN_BYTES = 4096
OPEN_METHODS = ("/grpc.health.v1.Health/",)


class TokenSource(Enum):
    NONE = "none"
    EXPLICIT = "explicit"  # the config's `token`, or `--token`: in the process list
    FILE = "file"
    ENV = "env"


def resolve_token(
    explicit: str | None, token_file: str | Path | None, environ: Mapping[str, str] = os.environ
) -> tuple[str | None, TokenSource]:
    """The control-plane token and where it came from: `explicit` if given, else the
    contents of `token_file` if given, else $EC_NIXL_TOKEN if set, else None.
    ConfigError, naming the source and never the token, for a token that is empty or
    not printable ASCII, and for a token file that is missing, unreadable, not a
    regular file, or open to its group or others (chmod 600)."""
    if explicit is not None:
        return _checked(explicit, "token"), TokenSource.EXPLICIT
    if token_file is not None:
        return read_token_file(token_file), TokenSource.FILE
    if environ.get(TOKEN_ENV):
        return _checked(environ[TOKEN_ENV], f"${TOKEN_ENV}"), TokenSource.ENV
    return None, TokenSource.NONE


def read_token_file(path: str | Path) -> str:
    """The token in `path` (surrounding whitespace dropped), read once."""
    if not isinstance(path, str | Path) or not str(path):
        raise ConfigError(f"token_file must name a file, got {type(path).__name__}")
    try:
        # Non-blocking: a FIFO put there must not hang the start; the mode checked is
        # that of the file read.
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as file:
            mode = os.fstat(file.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise ConfigError(f"token_file {path} is not a regular file")
            if mode & 0o077:
                raise ConfigError(
                    f"token_file {path} is open to its group or others (mode "
                    f"{stat.S_IMODE(mode):03o}): other users could read the token; make it "
                    "readable by its owner alone (chmod 600; a Kubernetes secret: "
                    "defaultMode 0400)"
                )
            data = file.read(MAX_TOKEN_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"token_file {path} cannot be read: {exc.strerror}") from None
    # Bytes that are not ASCII become U+FFFD, which the check refuses without quoting them.
    return _checked(data.decode("ascii", "replace").strip(), f"token_file {path}")


def _checked(token: object, source: str) -> str:
    """The token, if gRPC can send it as a header value: 1 to MAX_TOKEN_BYTES printable
    ASCII characters, no spaces (gRPC would fail every call with a vague INTERNAL)."""
    if not isinstance(token, str) or not token:
        raise ConfigError(f"{source}: the token must be a non-empty string")
    if len(token) > MAX_TOKEN_BYTES or not all("!" <= c <= "~" for c in token):
        raise ConfigError(
            f"{source}: the token must be 1 to {MAX_TOKEN_BYTES} printable ASCII characters "
            f"without spaces (got {len(token)} characters)"
        )
    return token


def is_loopback(address: str) -> bool:
    """Whether HOST:PORT stays on this host (0.0.0.0 and :: listen on every interface)."""
    host = address.rpartition(":")[0].strip("[]")
    return host == "localhost" or host == "::1" or host.startswith("127.")


@dataclass(frozen=True)
class Security:
    """Token and TLS files; all optional. A server needs cert and key, a client the CA.
    With `require_tls`, a control plane beyond loopback without TLS is refused, not
    warned about (see `transport_risk`)."""

    token: str | None = field(default=None, repr=False)
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_ca_file: Path | None = None
    require_tls: bool = False

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

    def transport_risk(self, serves: Iterable[str] = (), calls: Iterable[str] = ()) -> str | None:
        """Why the token would cross a network in plaintext, serving on `serves` and
        calling `calls` (HOST:PORT each), or None. With `require_tls`, a ConfigError
        instead for any of them beyond loopback without TLS, token or not."""
        plain = [a for a in serves if not self.tls_cert_file]
        plain += [a for a in calls if not self.tls_ca_file]
        exposed = [a for a in plain if not is_loopback(a)]
        if not exposed:
            return None
        where = ", ".join(exposed)
        if self.require_tls:
            raise ConfigError(
                f"require_tls is set, and the control plane on {where} would run without TLS: "
                "give the encoder tls_cert_file and tls_key_file, and its callers tls_ca_file "
                "(--tls-ca)"
            )
        if not self.token:
            return None
        return (
            f"the control-plane token would cross the network in plaintext on {where}: anyone "
            "who can watch that network can read it and call the encoder. Set up TLS "
            "(tls_cert_file and tls_key_file on the encoder, tls_ca_file or --tls-ca on its "
            "callers), and require_tls (--require-tls) to refuse to run without it."
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
    """The token and TLS flags of a command that calls encoders' control planes."""
    parser.add_argument(
        "--token-file", type=Path, metavar="FILE",
        help="file holding the encoders' control-plane token, readable by its owner alone "
        f"(chmod 600). The token is taken from --token, else --token-file, else ${TOKEN_ENV}",
    )  # fmt: skip
    parser.add_argument(
        "--token",
        help=f"the token itself: prefer --token-file or ${TOKEN_ENV}, since a value given "
        "here is in the process list, where every user of this host can read it",
    )  # fmt: skip
    parser.add_argument(
        "--tls-ca", type=Path, metavar="FILE",
        help="CA that signed the encoders' control-plane certificates (TLS)",
    )  # fmt: skip
    parser.add_argument(
        "--require-tls", action="store_true",
        help="refuse to call an encoder beyond loopback without TLS (default: a warning "
        "when the token would cross the network in plaintext)",
    )  # fmt: skip


def client_security(args: argparse.Namespace, calls: Iterable[str]) -> Security:
    """The Security of a command that calls the encoders at `calls` (HOST:PORT each), from
    its flags and environment; warns of a token on the command line or one that would
    travel in plaintext. ConfigError for a bad token source, or a plaintext call under
    --require-tls."""
    token, source = resolve_token(args.token, args.token_file)
    security = Security(token, tls_ca_file=args.tls_ca, require_tls=args.require_tls)
    if source is TokenSource.EXPLICIT:
        logger.warning(
            "--token is in this command's process list, where every user of the host can "
            "read it; give it in --token-file or $%s instead", TOKEN_ENV
        )  # fmt: skip
    if risk := security.transport_risk(calls=calls):
        logger.warning("%s", risk)
    return security


class AccessInterceptor(grpc.aio.ServerInterceptor):
    """Turns away a call without the token (when one is set) before its body is read,
    and a body that is not the method's message with INVALID_ARGUMENT; health checks
    stay open to anyone, so orchestrators can probe. Calls are coroutines on the
    server's loop: one held open costs no thread."""

    def __init__(self, token: str | None) -> None:
        self._expected = f"Bearer {token}".encode() if token else None

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_METHODS):
            return handler
        presented = dict(handler_call_details.invocation_metadata or ()).get(AUTH_HEADER, "")
        if self._expected is None or hmac.compare_digest(presented.encode(), self._expected):
            return _parsing(handler)
        return _deny(handler)


def _parsing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """`handler` with its request parsed here: gRPC's own parse would answer bytes that
    are no such message with UNKNOWN, which says nothing to the caller."""
    parse, behavior = handler.request_deserializer, handler.unary_unary or handler.unary_stream

    async def run(raw: bytes, context: grpc.aio.ServicerContext):
        try:
            request = parse(raw)
        except DecodeError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {exc}")
        return await behavior(request, context)

    make = (
        grpc.unary_stream_rpc_method_handler
        if handler.response_streaming
        else grpc.unary_unary_rpc_method_handler
    )
    return make(run, None, handler.response_serializer)


def _deny(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler that answers UNAUTHENTICATED at once: it takes the request as a stream
    it never reads, so gRPC runs it without waiting for a body."""

    async def abort(requests, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token")

    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(
            abort, handler.request_deserializer, handler.response_serializer
        )
    return grpc.stream_unary_rpc_method_handler(
        abort, handler.request_deserializer, handler.response_serializer
    )

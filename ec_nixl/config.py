"""`ec_connector_extra_config` of ECNixlConnector: parsed and checked at start-up.

A typo in a key or a bad value must stop the instance with a message that
names the key, not surface later as a request that silently never hits.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ec_nixl.control.messages import consumer_id_problem
from ec_nixl.control.security import TOKEN_ENV, Security, TokenSource, is_loopback, resolve_token
from ec_nixl.errors import ConfigError

ROLES = ("ec_producer", "ec_consumer", "ec_both")
# What PD does with an item it cannot pull: run the vision encoder itself, or end
# the request with a retryable error (a PD that must not encode, or has no media).
LOAD_FAILURE_POLICIES = ("encode", "fail")
DEFAULT_POOL_BYTES = 256 << 20
# How long an encoder keeps an item for a consumer that leased it and has not read it.
DEFAULT_LEASE_S = 30.0
# One pull's deadline, first call to last byte.
DEFAULT_PULL_TIMEOUT_S = 10.0
DEFAULT_RECEIVE_BYTES = 256 << 20
# Event streams one encoder serves at once: each PD, the proxy's directory, routers.
DEFAULT_MAX_WATCHERS = 64


@dataclass(frozen=True)
class ConnectorConfig:
    role: str
    # producer
    encoder_id: str | None = None
    control_address: str | None = None
    pool_bytes: int = DEFAULT_POOL_BYTES
    lease_s: float = DEFAULT_LEASE_S
    metrics_address: str | None = None
    max_watchers: int = DEFAULT_MAX_WATCHERS
    # consumer: encoder id -> HOST:PORT, the only endpoints it will ever contact
    encoders: dict[str, str] = field(default_factory=dict)
    # the name this PD goes by at its encoders (a proxy names it to route items to it)
    consumer_id: str | None = None
    receive_bytes: int = DEFAULT_RECEIVE_BYTES
    pull_timeout_s: float = DEFAULT_PULL_TIMEOUT_S
    # pull everything the encoders export before a request asks (PD is their only consumer)
    prefetch: bool = False
    # an item that cannot be pulled: "encode" it here, or "fail" the request (retryable)
    load_failure_policy: str = "encode"
    # both
    security: Security = field(default_factory=Security)
    # what is risky about running like this, one sentence each: the instance warns of them
    risks: tuple[str, ...] = field(default=(), compare=False)

    @property
    def is_producer(self) -> bool:
        return self.role in ("ec_producer", "ec_both")

    @property
    def is_consumer(self) -> bool:
        return self.role in ("ec_consumer", "ec_both")

    @classmethod
    def parse(cls, role: str | None, extra: dict[str, Any] | None) -> ConnectorConfig:
        if role not in ROLES:
            raise ConfigError(f"ec_role must be one of {', '.join(ROLES)}, got {role!r}")
        extra = dict(extra or {})
        producer, consumer = role in ("ec_producer", "ec_both"), role in ("ec_consumer", "ec_both")
        checks = {**_COMMON, **(_PRODUCER if producer else {}), **(_CONSUMER if consumer else {})}
        unknown = sorted(set(extra) - set(checks))
        if unknown:
            raise ConfigError(
                f"unknown ec_connector_extra_config key(s) for {role}: {', '.join(unknown)}; "
                f"known: {', '.join(sorted(checks))}"
            )
        values: dict[str, Any] = {"role": role}
        for key, value in extra.items():
            values[key] = checks[key](key, value)
        if producer:
            for key in ("encoder_id", "control_address"):
                if key not in values:
                    raise ConfigError(f"ec_connector_extra_config.{key} is required for {role}")
        if consumer and not values.get("encoders"):
            raise ConfigError(
                f"ec_connector_extra_config.encoders is required for {role}: "
                '{"enc0": "HOST:PORT"}'
            )
        token, source = resolve_token(values.pop("token", None), values.pop("token_file", None))
        security = Security(
            token=token,
            tls_cert_file=values.pop("tls_cert_file", None),
            tls_key_file=values.pop("tls_key_file", None),
            tls_ca_file=values.pop("tls_ca_file", None),
            require_tls=values.pop("require_tls", False),
        )
        config = cls(security=security, **values)
        return replace(config, risks=config._risks(source))

    def _risks(self, token_source: TokenSource) -> tuple[str, ...]:
        """What to warn of; ConfigError where `require_tls` forbids it."""
        serves = [self.control_address] if self.is_producer else []
        calls = list(self.encoders.values()) if self.is_consumer else []
        risks = [risk] if (risk := self.security.transport_risk(serves, calls)) else []
        if token_source is TokenSource.EXPLICIT:
            risks.append(
                "ec_connector_extra_config.token is in this instance's arguments, which every "
                "user of the host can read in the process list and which vLLM logs: give it "
                f"in token_file or ${TOKEN_ENV} instead"
            )
        exposed = [a for a in serves + calls if not is_loopback(a)]
        if not self.security.token and exposed:
            # Without a token, anyone who reaches a control-plane address beyond loopback
            # can resolve, release and evict items.
            risks.append(
                f"the control plane runs without a token on {', '.join(exposed)}: anyone who "
                "reaches it can resolve, release and evict encoder outputs, and a forged "
                "handshake can reach NIXL. Give every instance the same token (token_file or "
                f"${TOKEN_ENV}), and TLS."
            )
        return tuple(risks)


def _identifier(key: str, value: Any) -> str:
    if (
        not isinstance(value, str)
        or not value
        or not value.replace("-", "").replace("_", "").isalnum()
    ):
        raise ConfigError(
            f"{key} must be a non-empty name of letters, digits, '-' and '_': {value!r}"
        )
    return value


def _address(key: str, value: Any) -> str:
    host, sep, port = value.rpartition(":") if isinstance(value, str) else ("", "", "")
    if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
        raise ConfigError(f"{key} must be HOST:PORT, got {value!r}")
    return value


def _positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{key} must be a positive integer (bytes), got {value!r}")
    return value


def _positive_float(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(f"{key} must be a positive number of seconds, got {value!r}")
    return float(value)


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return value


def _load_failure_policy(key: str, value: Any) -> str:
    if value not in LOAD_FAILURE_POLICIES:
        raise ConfigError(
            f"{key} must be one of {', '.join(map(repr, LOAD_FAILURE_POLICIES))}, got {value!r}"
        )
    return value


def _encoders(key: str, value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not value:
        raise ConfigError(
            f'{key} must map encoder ids to HOST:PORT, e.g. {{"enc0": "10.0.0.1:7100"}}'
        )
    return {_identifier(f"{key} id", k): _address(f"{key}.{k}", v) for k, v in value.items()}


def _as_is(key: str, value: Any) -> Any:
    return value


def _consumer_id(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key} must be a non-empty name, got {value!r}")
    if problem := consumer_id_problem(value):
        raise ConfigError(f"{problem}: {value[:64]!r}")
    return value


def _file(key: str, value: Any) -> Path:
    path = Path(value) if isinstance(value, str) else None
    if path is None or not path.is_file():
        raise ConfigError(f"{key} must name a readable file, got {value!r}")
    return path


# token and token_file are checked where every component's token is resolved (resolve_token)
_COMMON = {
    "token": _as_is,
    "token_file": _as_is,
    "tls_cert_file": _file,
    "tls_key_file": _file,
    "tls_ca_file": _file,
    "require_tls": _bool,
}
_PRODUCER = {
    "encoder_id": _identifier,
    "control_address": _address,
    "pool_bytes": _positive_int,
    "lease_s": _positive_float,
    "metrics_address": _address,
    "max_watchers": _positive_int,
}
_CONSUMER = {
    "encoders": _encoders,
    "consumer_id": _consumer_id,
    "receive_bytes": _positive_int,
    "pull_timeout_s": _positive_float,
    "prefetch": _bool,
    "load_failure_policy": _load_failure_policy,
}

"""ECNixlConnector's extra config: required keys, defaults, and errors that name the key."""

import pytest

from ec_nixl.connector_config import DEFAULT_POOL_BYTES, ConnectorConfig
from ec_nixl.errors import ConfigError

PRODUCER = {"encoder_id": "enc0", "control_address": "127.0.0.1:7100"}
CONSUMER = {"encoders": {"enc0": "127.0.0.1:7100", "enc-1": "10.0.0.2:7100"}}


def test_producer_needs_only_its_id_and_address():
    config = ConnectorConfig.parse("ec_producer", PRODUCER)
    assert config.is_producer and not config.is_consumer
    assert (config.encoder_id, config.control_address) == ("enc0", "127.0.0.1:7100")
    assert config.pool_bytes == DEFAULT_POOL_BYTES and config.security.token is None


def test_consumer_knows_exactly_the_configured_encoders():
    config = ConnectorConfig.parse("ec_consumer", {**CONSUMER, "token": "t", "pull_timeout_s": 3})
    assert config.encoders == CONSUMER["encoders"]
    assert config.security.token == "t" and config.pull_timeout_s == 3.0


def test_a_consumer_may_name_itself_for_its_encoders():
    assert ConnectorConfig.parse("ec_consumer", {**CONSUMER, "consumer_id": "pd-0"}).consumer_id
    assert ConnectorConfig.parse("ec_consumer", CONSUMER).consumer_id is None


def test_a_consumer_encodes_what_it_cannot_pull_unless_told_to_fail_the_request():
    assert ConnectorConfig.parse("ec_consumer", CONSUMER).load_failure_policy == "encode"
    fail = ConnectorConfig.parse("ec_consumer", {**CONSUMER, "load_failure_policy": "fail"})
    assert fail.load_failure_policy == "fail"


def test_ec_both_takes_producer_and_consumer_keys():
    config = ConnectorConfig.parse("ec_both", {**PRODUCER, **CONSUMER})
    assert config.is_producer and config.is_consumer


@pytest.mark.parametrize(
    "role, extra, names",
    [
        ("ec_producer", {"control_address": "h:1"}, "encoder_id"),
        ("ec_producer", {**PRODUCER, "encoders": {}}, "encoders"),
        ("ec_producer", {**PRODUCER, "pool_byte": 1}, "pool_byte"),
        ("ec_producer", {**PRODUCER, "control_address": "nohost"}, "control_address"),
        ("ec_producer", {**PRODUCER, "control_address": "h:99999"}, "control_address"),
        ("ec_producer", {**PRODUCER, "pool_bytes": -1}, "pool_bytes"),
        ("ec_producer", {**PRODUCER, "pool_bytes": True}, "pool_bytes"),
        ("ec_producer", {**PRODUCER, "encoder_id": "a b"}, "encoder_id"),
        ("ec_consumer", {}, "encoders"),
        ("ec_consumer", {"encoders": ["127.0.0.1:7100"]}, "encoders"),
        ("ec_consumer", {"encoders": {"enc0": "127.0.0.1"}}, "encoders.enc0"),
        ("ec_consumer", {**CONSUMER, "pull_timeout_s": "fast"}, "pull_timeout_s"),
        ("ec_consumer", {**CONSUMER, "consumer_id": "pd a"}, "consumer_id"),
        ("ec_consumer", {**CONSUMER, "load_failure_policy": "recompute"}, "load_failure_policy"),
        ("ec_consumer", {**CONSUMER, "tls_ca_file": "/no/such/file"}, "tls_ca_file"),
        ("kv_both", PRODUCER, "ec_role"),
        ("ec_producer", {**PRODUCER, "tls_cert_file": __file__}, "tls_key_file"),
        ("ec_consumer", {**CONSUMER, "tls_key_file": __file__}, "tls_cert_file"),
    ],
)
def test_bad_config_fails_at_start_up_naming_the_key(role, extra, names):
    with pytest.raises(ConfigError, match=names):
        ConnectorConfig.parse(role, extra)


@pytest.mark.parametrize(
    "role, extra, exposed",
    [
        ("ec_producer", {**PRODUCER, "control_address": "0.0.0.0:7100"}, "0.0.0.0:7100"),
        ("ec_consumer", CONSUMER, "10.0.0.2:7100"),  # enc-1 is on another host
        ("ec_consumer", {"encoders": {"enc0": "localhost:7100"}}, None),
        ("ec_producer", PRODUCER, None),  # loopback
        ("ec_consumer", {**CONSUMER, "token": "t"}, None),
    ],
)
def test_a_control_plane_beyond_loopback_without_a_token_is_named_as_a_risk(role, extra, exposed):
    risk = ConnectorConfig.parse(role, extra).exposure()
    if exposed is None:
        assert risk is None
    else:
        assert exposed in risk and "without a token" in risk

"""ECNixlConnector's extra config: required keys, defaults, and errors that name the key;
where the control-plane token comes from, and what running like this risks."""

import pytest

from ec_nixl.config import DEFAULT_POOL_BYTES, ConnectorConfig
from ec_nixl.control.security import TOKEN_ENV
from ec_nixl.errors import ConfigError

TOKEN = "c0ntrol-plane-t0ken"


@pytest.fixture(autouse=True)
def no_token_in_the_environment(monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)


def token_file(tmp_path, text: str = TOKEN + "\n", mode: int = 0o600):
    path = tmp_path / "token"
    path.write_text(text)
    path.chmod(mode)
    return str(path)


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
        ("ec_producer", {**PRODUCER, "max_watchers": 0}, "max_watchers"),
        ("ec_producer", {**PRODUCER, "encoder_id": "a b"}, "encoder_id"),
        ("ec_consumer", {}, "encoders"),
        ("ec_consumer", {"encoders": ["127.0.0.1:7100"]}, "encoders"),
        ("ec_consumer", {"encoders": {"enc0": "127.0.0.1"}}, "encoders.enc0"),
        ("ec_consumer", {**CONSUMER, "pull_timeout_s": "fast"}, "pull_timeout_s"),
        ("ec_consumer", {**CONSUMER, "consumer_id": "pd a"}, "consumer_id"),
        ("ec_consumer", {**CONSUMER, "consumer_id": "p" * 129}, "consumer_id .*at most 128"),
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
    risks = [r for r in ConnectorConfig.parse(role, extra).risks if "without a token" in r]
    if exposed is None:
        assert risks == []
    else:
        assert len(risks) == 1 and exposed in risks[0]


def test_a_token_file_readable_by_its_owner_alone_gives_the_token(tmp_path):
    config = ConnectorConfig.parse("ec_producer", {**PRODUCER, "token_file": token_file(tmp_path)})
    assert config.security.token == TOKEN and config.risks == ()
    assert TOKEN not in repr(config)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o644])
def test_a_token_file_open_to_others_is_refused_naming_the_file_not_the_token(tmp_path, mode):
    path = token_file(tmp_path, mode=mode)
    with pytest.raises(ConfigError, match="open to its group or others.*chmod 600") as caught:
        ConnectorConfig.parse("ec_producer", {**PRODUCER, "token_file": path})
    assert path in str(caught.value) and TOKEN not in str(caught.value)


@pytest.mark.parametrize(
    "name, problem",
    [("no-such-file", "cannot be read: No such file"), (".", "cannot be read: Is a directory")],
)
def test_a_token_file_that_cannot_be_read_is_a_clear_config_error(tmp_path, name, problem):
    with pytest.raises(ConfigError, match=f"token_file .*{problem}"):
        ConnectorConfig.parse("ec_consumer", {**CONSUMER, "token_file": str(tmp_path / name)})


def test_the_connector_takes_the_token_from_the_environment(monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    config = ConnectorConfig.parse("ec_producer", PRODUCER)
    assert config.security.token == TOKEN and config.risks == ()


def test_the_config_token_wins_over_the_token_file_which_wins_over_the_environment(
    tmp_path, monkeypatch
):
    monkeypatch.setenv(TOKEN_ENV, "from-the-environment")
    path = token_file(tmp_path, "from-the-file")
    both = {**PRODUCER, "token": "from-the-config", "token_file": path}
    assert ConnectorConfig.parse("ec_producer", both).security.token == "from-the-config"
    from_file = ConnectorConfig.parse("ec_producer", {**PRODUCER, "token_file": path})
    assert from_file.security.token == "from-the-file"
    assert ConnectorConfig.parse("ec_producer", PRODUCER).security.token == "from-the-environment"


def test_a_token_in_the_config_is_named_as_a_risk_with_the_safer_sources():
    [risk] = ConnectorConfig.parse("ec_producer", {**PRODUCER, "token": TOKEN}).risks
    assert "process list" in risk and "token_file" in risk and TOKEN_ENV in risk
    assert TOKEN not in risk


@pytest.mark.parametrize("bad", ["two words", "line\nbreak", "caf\u00e9", "x" * 5000])
def test_a_token_grpc_cannot_send_is_refused_without_quoting_it(tmp_path, monkeypatch, bad):
    refusals = []
    for extra in ({"token": bad}, {"token_file": token_file(tmp_path, bad)}, {}):
        monkeypatch.setenv(TOKEN_ENV, bad)
        with pytest.raises(ConfigError, match="printable ASCII") as caught:
            ConnectorConfig.parse("ec_producer", {**PRODUCER, **extra})
        refusals.append(str(caught.value))
    assert not any(bad.strip() in refusal for refusal in refusals)


@pytest.mark.parametrize(
    "role, extra, where",
    [
        ("ec_producer", {**PRODUCER, "control_address": "0.0.0.0:7100"}, "0.0.0.0:7100"),
        ("ec_consumer", CONSUMER, "10.0.0.2:7100"),
    ],
)
def test_a_token_that_would_cross_the_network_in_plaintext_is_named_as_a_risk(
    monkeypatch, role, extra, where
):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    [risk] = ConnectorConfig.parse(role, extra).risks
    assert f"plaintext on {where}" in risk and "require_tls" in risk
    assert "127.0.0.1" not in risk and TOKEN not in risk


ANYWHERE = {**PRODUCER, "control_address": "0.0.0.0:7100"}
TLS_PAIR = {"tls_cert_file": __file__, "tls_key_file": __file__}


@pytest.mark.parametrize(
    "role, extra, where",
    [
        ("ec_producer", ANYWHERE, "0.0.0.0:7100"),
        ("ec_consumer", CONSUMER, "10.0.0.2:7100"),
        ("ec_consumer", {**CONSUMER, "tls_ca_file": __file__}, None),
        ("ec_producer", {**ANYWHERE, **TLS_PAIR}, None),
        ("ec_producer", PRODUCER, None),  # loopback
    ],
)
def test_require_tls_refuses_a_control_plane_beyond_loopback_without_tls(
    monkeypatch, role, extra, where
):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    extra = {**extra, "require_tls": True}
    if where is None:
        assert ConnectorConfig.parse(role, extra).risks == ()
    else:
        with pytest.raises(ConfigError, match=f"require_tls is set.*on {where}"):
            ConnectorConfig.parse(role, extra)

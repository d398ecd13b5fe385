"""Configuration (app/config.py): every ELEMTA_* value is checked once, when the app is created.

Values come from the environment here (the path production takes): they are kept as the exact
string given, converted by kind, and a bad one is refused with a message naming the variable. The
``flask`` CLI and gunicorn turn that refusal into one line (wsgi.py), checked in subprocesses.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
from pathlib import Path

import pytest
from flask import Flask

from app import create_app
from app.config import ConfigError, load_config, parse_host_port
from app.delivery.routing import Router
from tests.smtpd_helpers import make_certificate

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.fixture
def environ(monkeypatch: pytest.MonkeyPatch):
    """Make these the only ELEMTA_* variables (for this test alone: monkeypatch restores)."""

    def setenv(**values: str) -> None:
        for name in list(os.environ):
            if name.startswith("ELEMTA_"):
                monkeypatch.delenv(name)
        for key, value in values.items():
            monkeypatch.setenv(f"ELEMTA_{key}", value)

    return setenv


@pytest.fixture
def load(environ, tmp_path):
    """The checked configuration of an app built from these environment variables."""

    def loader(**values: str) -> dict:
        environ(**values)
        app = Flask("elemta-config-test", instance_path=str(tmp_path / "instance"))
        app.testing = True
        load_config(app, None)
        return app.config

    return loader


def refused(load, **values: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load(**values)
    return str(caught.value)


# ------------------------------------------------------------------ bad values, one per kind

@pytest.mark.parametrize("key, value, message", [
    # host:port
    ("RELAY_HOST", "host:notaport", "ELEMTA_RELAY_HOST: 'host:notaport' is not host:port"),
    ("RELAY_HOST", "relay.example:70000", "the port must be 1-65535"),
    ("RELAY_HOST", "[2001:db8::1", "ELEMTA_RELAY_HOST: '[2001:db8::1' is not host:port"),
    ("RELAY_HOST", "relay example:25", "is not host:port"),
    ("SMTP_LISTEN", "nowhere", "ELEMTA_SMTP_LISTEN: 'nowhere' is not host:port"),
    ("SMTP_LISTEN", "127.0.0.1:0", "the port must be 1-65535"),
    ("SMTP_LISTEN", "not a host:2525", "is not host:port"),
    ("DNS_SERVERS", "127.0.0.1:30053,ns.example",
     "ELEMTA_DNS_SERVERS: 'ns.example' is not a name server address (ip or ip:port)"),
    ("SENDING_IPS", "192.0.2.10, 198.51.100.0/24",
     "ELEMTA_SENDING_IPS: '198.51.100.0/24' is not an IP address"),
    ("RELAY_TLS_CA_FILE", "/nonexistent/ca.pem", "ELEMTA_RELAY_TLS_CA_FILE: "
                                                 "'/nonexistent/ca.pem' is not a file"),
    # whole numbers and their ranges
    ("MAX_RECIPIENTS", "ten", "ELEMTA_MAX_RECIPIENTS: 'ten' is not a whole number"),
    ("MAX_REQUEST_BYTES", "1.5", "is not a whole number"),
    ("WORKER_CONCURRENCY", "0", "ELEMTA_WORKER_CONCURRENCY: '0' must be at least 1"),
    ("LOG_RETENTION", "-1", "must be at least 0"),
    ("SMTP_PORT", "70000", "ELEMTA_SMTP_PORT: '70000' must be at most 65535"),
    ("LOG_QUEUE_SIZE", "-3", "ELEMTA_LOG_QUEUE_SIZE: '-3' must be at least 1"),
    ("STREAM_QUEUE_SIZE", "many", "is not a whole number"),
    ("API_THREADS", "0", "must be at least 1"),
    ("SMTPD_CLIENT_CONNECTION_COUNT_LIMIT", "-1", "must be at least 0"),
    ("SMTPD_CLIENT_CONNECTION_RATE_LIMIT", "lots", "is not a whole number"),
    ("SMTPD_TRUSTED_RESERVE", "100", "ELEMTA_SMTPD_TRUSTED_RESERVE: 100 must be below "
                                     "ELEMTA_SMTPD_MAX_SESSIONS (100)"),
    ("SMTPD_STRESS_IDLE_TIMEOUT", "0", "must be at least 1"),
    # seconds
    ("LOG_FLUSH_INTERVAL", "0", "ELEMTA_LOG_FLUSH_INTERVAL: '0' must be a number above 0"),
    ("LOG_PRUNE_INTERVAL", "soon", "ELEMTA_LOG_PRUNE_INTERVAL: 'soon' is not a number"),
    ("LOG_PRUNE_INTERVAL", "nan", "must be a number above 0"),
    ("STREAM_POLL_INTERVAL", "-1", "must be a number above 0"),
    ("RETRY_SCHEDULE", "60,soon", "ELEMTA_RETRY_SCHEDULE: 'soon' is not a whole number"),
    ("RETRY_SCHEDULE", "60,0", "must be at least 1"),
    ("RETRY_SCHEDULE", ",", "needs at least one positive number of seconds"),
    # booleans and enumerations
    ("SEND_BOUNCES", "maybe", "ELEMTA_SEND_BOUNCES: 'maybe' must be true or false"),
    ("UI", "maybe", "ELEMTA_UI: 'maybe' must be on or off"),
    ("LOG_TO_DATABASE", "perhaps", "must be true or false"),
    ("SMTPD_PROXY_PROTOCOL", "", "must be true or false"),
    ("AUTH_MODE", "none", "ELEMTA_AUTH_MODE: 'none' must be one of admin, all, off"),
    ("RELAY_TLS", "ssl", "must be one of none, starttls, tls"),
    ("LOG_LEVEL", "verbose", "ELEMTA_LOG_LEVEL: 'verbose' must be one of debug, info"),
    ("RATELIMIT_STRATEGY", "leaky-bucket", "must be one of fixed-window"),
    ("RATELIMIT_DEFAULT", "lots", "ELEMTA_RATELIMIT_DEFAULT: 'lots' is not a rate limit"),
    ("RATELIMIT_STRICT", "10 per fortnight", "is not a rate limit"),
    # URLs, origins, networks, names
    ("RATELIMIT_STORAGE_URI", "http://cache:80", "'http://cache:80' is not a storage URI"),
    ("RATELIMIT_STORAGE_URI", "localhost:6379", "is not a storage URI"),
    ("DATABASE_URL", "mysql://elemta@db/elemta", "is not a sqlite:// or postgresql:// URL"),
    ("DATABASE_URL", "not a url", "ELEMTA_DATABASE_URL: 'not a url' is not a sqlite://"),
    ("DATABASE_URL", "sqlite://", "is an in-memory SQLite database"),
    ("DATABASE_URL", "sqlite:///:memory:", "is an in-memory SQLite database"),
    ("CORS_ORIGINS", '["https://a.example"]',
     "ELEMTA_CORS_ORIGINS: '[\"https://a.example\"]' is not an origin"),
    ("CORS_ORIGINS", "https://ok.example, ftp://files.example", "'ftp://files.example' is not"),
    ("CORS_ORIGINS", "https://admin.example/ui", "is not an origin"),
    ("RELAY_NETWORKS", "127.0.0.0/8,10.0.0.0/33", "ELEMTA_RELAY_NETWORKS: '10.0.0.0/33' is not"),
    ("SMTP_HOSTNAME", "mail example", "ELEMTA_SMTP_HOSTNAME: 'mail example' is not a host name"),
    ("TLS_CERT", "/nonexistent/cert.pem", "ELEMTA_TLS_CERT: '/nonexistent/cert.pem' is not a file"),
])
def test_a_bad_value_is_refused_naming_the_variable(load, key, value, message):
    assert message in refused(load, **{key: value})


def test_a_password_in_a_refused_url_is_never_shown(load):
    for key, url in [("DATABASE_URL", "mysql://elemta:hunter2@db/elemta"),
                     ("RATELIMIT_STORAGE_URI", "ftp://:hunter2@cache:6379")]:
        message = refused(load, **{key: url})
        assert "hunter2" not in message and "***" in message, message


def test_tls_needs_a_readable_pair_that_belongs_together(load, tmp_path):
    cert, key = make_certificate(tmp_path)
    assert "STARTTLS needs both" in refused(load, TLS_CERT=cert)
    assert "STARTTLS needs both" in refused(load, TLS_KEY=key)
    assert "ELEMTA_TLS_KEY: " in refused(load, TLS_CERT=cert, TLS_KEY=str(tmp_path))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key\n")
    assert "cannot load" in refused(load, TLS_CERT=cert, TLS_KEY=str(garbage))
    config = load(TLS_CERT=cert, TLS_KEY=key)
    assert (config["TLS_CERT"], config["TLS_KEY"]) == (cert, key)


# ------------------------------------------------------------------ good values

@pytest.mark.parametrize("value", ["12345", "true", "1e3", "null", '["a"]', '{"a": 1}', " x "])
def test_secrets_and_names_stay_the_exact_string(load, value):
    config = load(RELAY_PASSWORD=value, RELAY_USERNAME=value, RATELIMIT_KEY_PREFIX=value)
    for key in ("RELAY_PASSWORD", "RELAY_USERNAME", "RATELIMIT_KEY_PREFIX"):
        assert config[key] == value and type(config[key]) is str


def test_values_are_converted_by_kind(load):
    config = load(MAX_RECIPIENTS=" 42 ", LOG_FLUSH_INTERVAL="1e-1", SEND_BOUNCES="OFF",
                  LOG_TO_DATABASE="yes", AUTH_MODE="ALL", LOG_LEVEL="Warning",
                  RETRY_SCHEDULE="30, 60,", RELAY_NETWORKS="10.0.0.0/8, ::1",
                  CORS_ORIGINS="https://a.example, http://b.example:8080",
                  RATELIMIT_STORAGE_URI="redis://:pw@127.0.0.1:6379/0",
                  DATABASE_URL="postgres://elemta@db/elemta", SMTP_LISTEN=":2525",
                  SMTP_HOSTNAME="mail.example.com", STREAM_POLL_INTERVAL="0.2",
                  SENDING_IPS="203.0.113.25, 2001:db8:0::25", DNS_SERVERS="127.0.0.1:5353, ::1")
    assert config["MAX_RECIPIENTS"] == 42
    assert config["SENDING_IPS"] == ["203.0.113.25", "2001:db8::25"]
    assert config["DNS_SERVERS"] == [("127.0.0.1", 5353), ("::1", 53)]
    assert config["LOG_FLUSH_INTERVAL"] == 0.1
    assert config["SEND_BOUNCES"] is False and config["LOG_TO_DATABASE"] is True
    assert (config["AUTH_MODE"], config["LOG_LEVEL"]) == ("all", "warning")
    assert config["RETRY_SCHEDULE"] == [30, 60]
    assert config["RELAY_NETWORKS"] == [ipaddress.ip_network("10.0.0.0/8"),
                                        ipaddress.ip_network("::1")]
    assert config["CORS_ORIGINS"] == ["https://a.example", "http://b.example:8080"]
    assert config["RATELIMIT_STORAGE_URI"] == "redis://:pw@127.0.0.1:6379/0"
    assert config["SQLALCHEMY_DATABASE_URI"] == "postgresql+psycopg://elemta@db/elemta"
    assert config["SMTP_LISTEN"] == ":2525" and config["STREAM_POLL_INTERVAL"] == 0.2


def test_defaults_without_environment(load):
    config = load()
    assert config["LOG_TO_DATABASE"] is False  # TESTING; on otherwise
    assert config["CORS_ORIGINS"] == [] and config["RELAY_HOST"] == ""
    assert config["LOG_QUEUE_SIZE"] == 10_000 and config["RATELIMIT_ENABLED"] is True
    assert "STREAM_POLL_INTERVAL" not in config  # app/stream/ keeps its own default


@pytest.mark.parametrize("text, expected", [
    ("relay.example", ("relay.example", 25)),
    ("relay.example:2525", ("relay.example", 2525)),
    ("[2001:db8::1]:587", ("2001:db8::1", 587)),
    ("[2001:db8::1]", ("2001:db8::1", 25)),
    ("2001:db8::1", ("2001:db8::1", 25)),
])
def test_relay_host_forms(load, text, expected):
    assert parse_host_port(text, 25) == expected
    assert load(RELAY_HOST=text)["RELAY_HOST"] == text


def test_create_app_refuses_and_the_router_reads_the_checked_value(environ, tmp_path):
    overrides = {"TESTING": True, "DATABASE_URL": f"sqlite:///{tmp_path / 'config.db'}"}
    environ(RELAY_HOST="host:notaport")
    with pytest.raises(ConfigError, match="ELEMTA_RELAY_HOST"):
        create_app(overrides)
    environ(RELAY_HOST="[2001:db8::1]:2525", RELAY_TLS="tls", RELAY_PASSWORD="1e3")
    app = create_app(overrides)
    router = Router(app.config)
    assert router.relay == ("2001:db8::1", 2525) and router.password == "1e3"


# ------------------------------------------------------------------ one line for operators

def _run(command: list[str], timeout: float = 120, **values: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ELEMTA_")}
    env.update({f"ELEMTA_{k}": v for k, v in values.items()}, FLASK_APP="wsgi.py")
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("command", [["queue", "stats"], ["worker", "--once"], ["db", "upgrade"]])
def test_the_cli_prints_one_line_and_exits_2(command):
    done = _run([str(BIN / "flask"), *command], RELAY_HOST="host:notaport")
    assert done.returncode == 2, done.stderr
    assert done.stderr == "Error: ELEMTA_RELAY_HOST: 'host:notaport' is not host:port\n"
    assert done.stdout == ""


def test_smtpd_refuses_a_bad_certificate_before_announcing_itself(tmp_path):
    done = _run([str(BIN / "flask"), "smtpd"], TLS_CERT=str(tmp_path / "missing.pem"),
                TLS_KEY=str(tmp_path / "missing.key"))
    assert done.returncode == 2
    assert done.stderr.startswith("Error: ELEMTA_TLS_CERT: ") and done.stderr.count("\n") == 1
    assert "listening" not in done.stderr + done.stdout


@pytest.mark.slow
def test_gunicorn_halts_with_the_reason_in_its_log():
    done = _run([str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", "wsgi:app"],
                API_LISTEN="127.0.0.1:0", LOG_QUEUE_SIZE="lots", LOG_TO_DATABASE="false")
    output = done.stdout + done.stderr
    assert done.returncode == 4, output  # gunicorn's "App failed to load": no respawning
    assert "Error: ELEMTA_LOG_QUEUE_SIZE: 'lots' is not a whole number" in done.stderr
    assert "configuration refused: ELEMTA_LOG_QUEUE_SIZE" in done.stdout  # the JSON log
    assert "Traceback" not in output
    # Refused once, by the master, before any worker is forked (gunicorn.conf.py)
    assert "Booting worker" not in output and output.count("configuration refused") == 1


def test_a_misspelt_variable_is_named_in_a_warning(monkeypatch, caplog, tmp_path):
    """An unknown ELEMTA_* name is almost always a typo of a setting that then silently keeps
    its default: say so at start, as postconf warns of unused parameters."""
    monkeypatch.setenv("ELEMTA_RELAY_HOTS", "smarthost.example:587")
    monkeypatch.setenv("ELEMTA_API_LISTEN", "127.0.0.1:8025")  # gunicorn.conf.py's, not unknown
    with caplog.at_level("WARNING", logger="elemta.config"):
        create_app({"TESTING": True, "DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}"})
    warned = [r.getMessage() for r in caplog.records if r.name == "elemta.config"]
    assert warned == ["ELEMTA_RELAY_HOTS is not an Elemta setting and is ignored (misspelt?)"]


def test_postgresql_connections_get_keepalives_and_a_tcp_user_timeout(load):
    # A dead peer must fail a connection in tens of seconds, not the kernel's ~15 minutes: a
    # delivery outcome's commit hanging that long outlives the worker's lease (DELIVERY.md).
    args = load(DATABASE_URL="postgresql://elemta@db/elemta")[
        "SQLALCHEMY_ENGINE_OPTIONS"]["connect_args"]
    assert args["keepalives"] == 1 and args["tcp_user_timeout"] > 0
    assert args["keepalives_idle"] > 0 and args["keepalives_interval"] > 0
    assert args["keepalives_count"] > 0 and args["connect_timeout"] == 5
    # What the operator's URL gives is left to the URL (connect_args would override it).
    url = ("postgresql://elemta@db/elemta?connect_timeout=9&tcp_user_timeout=120000"
           "&keepalives_idle=60")
    args = load(DATABASE_URL=url)["SQLALCHEMY_ENGINE_OPTIONS"]["connect_args"]
    assert "connect_timeout" not in args and "tcp_user_timeout" not in args
    assert "keepalives_idle" not in args and args["keepalives"] == 1
    # SQLite has none of them.
    args = load(DATABASE_URL="sqlite:////tmp/elemta-config.db")[
        "SQLALCHEMY_ENGINE_OPTIONS"]["connect_args"]
    assert "keepalives" not in args and "tcp_user_timeout" not in args


def test_connect_args_given_to_the_app_override_the_postgresql_defaults(tmp_path):
    app = create_app({"DATABASE_URL": "postgresql://elemta@db/elemta", "TESTING": True,
                      "SQLALCHEMY_ENGINE_OPTIONS": {"connect_args": {"keepalives_idle": 99}}})
    args = app.config["SQLALCHEMY_ENGINE_OPTIONS"]["connect_args"]
    assert args["keepalives_idle"] == 99 and args["tcp_user_timeout"] > 0

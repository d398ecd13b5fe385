"""Configuration: safe defaults, overridden by ``ELEMTA_*`` environment variables.

Flask's ``from_prefixed_env("ELEMTA")`` reads ``ELEMTA_FOO`` into ``FOO`` (values are parsed
as JSON when they can be, so ``ELEMTA_SEND_BOUNCES=false`` is a bool). Everything is then
checked once, here, so a typo stops the process at start instead of at 3 a.m.
"""

from __future__ import annotations

import ipaddress
import os
from typing import Any

from flask import Flask

DEFAULTS: dict[str, Any] = {
    "DATABASE_URL": None,  # None -> sqlite file under the instance folder
    "MAX_REQUEST_BYTES": 1024 * 1024,
    "FAILED_RETENTION": 604800,
    "LOG_RETENTION": 1209600,
    "LOG_LEVEL": "info",
    "AUTH_MODE": "admin",
    "RATELIMIT_DEFAULT": "600 per minute",
    "RATELIMIT_STRICT": "10 per minute",
    "RATELIMIT_STORAGE_URI": "memory://",
    "TRUSTED_PROXIES": 0,
    "CORS_ORIGINS": "",
    "WORKER_LEASE_SECONDS": 300,
    "WORKER_CONCURRENCY": 8,
    "MAX_CONNECTIONS_PER_DOMAIN": 10,
    "RELAY_HOST": "",
    "RELAY_USERNAME": "",
    "RELAY_PASSWORD": "",
    "RELAY_TLS": "none",
    "RETRY_SCHEDULE": "60,300,900,3600,10800,21600",
    "MAX_QUEUE_LIFETIME": 432000,
    "SEND_BOUNCES": True,
    # Delivery worker (see docs/DELIVERY.md): seconds to wait for an SMTP peer, the port of
    # MX delivery (tests point it at a loopback sink) and seconds for one DNS lookup.
    "SMTP_TIMEOUT": 60,
    "SMTP_PORT": 25,
    "DNS_TIMEOUT": 10,
    "SMTP_LISTEN": "127.0.0.1:2525",
    "SMTP_HOSTNAME": "",
    "MAX_MESSAGE_BYTES": 26214400,
    "MAX_RECIPIENTS": 1000,
    "RELAY_NETWORKS": "127.0.0.0/8,::1",
    "TLS_CERT": "",
    "TLS_KEY": "",
    "SMTPD_MAX_SESSIONS": 100,  # listener: concurrent SMTP sessions; more get 421
    "SMTPD_IDLE_TIMEOUT": 300,  # listener: seconds a client may stay idle (RFC 5321 4.5.3.2.7)
    "SMTPD_PROXY_PROTOCOL": False,  # listener: expect a PROXY header (behind HAProxy)
}

AUTH_MODES = ("admin", "all", "off")
RELAY_TLS_MODES = ("none", "starttls", "tls")

_INT_KEYS = (
    "MAX_REQUEST_BYTES",
    "FAILED_RETENTION",
    "LOG_RETENTION",
    "TRUSTED_PROXIES",
    "WORKER_LEASE_SECONDS",
    "WORKER_CONCURRENCY",
    "MAX_CONNECTIONS_PER_DOMAIN",
    "MAX_QUEUE_LIFETIME",
    "MAX_MESSAGE_BYTES",
    "MAX_RECIPIENTS",
    "SMTP_TIMEOUT",
    "SMTP_PORT",
    "DNS_TIMEOUT",
)


class ConfigError(ValueError):
    """A configuration value that cannot be used."""


def load_config(app: Flask, overrides: dict[str, Any] | None) -> None:
    """Fill ``app.config`` from defaults, the environment, then explicit overrides."""
    app.config.from_mapping(DEFAULTS)
    app.config.from_prefixed_env("ELEMTA")
    if overrides:
        app.config.from_mapping(overrides)
    _normalise(app)


def _normalise(app: Flask) -> None:
    cfg = app.config
    for key in _INT_KEYS:
        cfg[key] = _as_int(key, cfg[key])
    cfg["SEND_BOUNCES"] = _as_bool("SEND_BOUNCES", cfg["SEND_BOUNCES"])
    cfg["SMTPD_PROXY_PROTOCOL"] = _as_bool("SMTPD_PROXY_PROTOCOL", cfg["SMTPD_PROXY_PROTOCOL"])

    mode = str(cfg["AUTH_MODE"]).lower()
    if mode not in AUTH_MODES:
        raise ConfigError(f"ELEMTA_AUTH_MODE must be one of {', '.join(AUTH_MODES)}")
    cfg["AUTH_MODE"] = mode

    tls = str(cfg["RELAY_TLS"]).lower()
    if tls not in RELAY_TLS_MODES:
        raise ConfigError(f"ELEMTA_RELAY_TLS must be one of {', '.join(RELAY_TLS_MODES)}")
    cfg["RELAY_TLS"] = tls

    cfg["RETRY_SCHEDULE"] = parse_retry_schedule(str(cfg["RETRY_SCHEDULE"]))
    cfg["RELAY_NETWORKS"] = _parse_networks(str(cfg["RELAY_NETWORKS"]))
    cfg["CORS_ORIGINS"] = [o.strip() for o in str(cfg["CORS_ORIGINS"] or "").split(",") if o.strip()]

    url = cfg["DATABASE_URL"] or _default_sqlite_url(app)
    cfg["SQLALCHEMY_DATABASE_URI"] = normalise_database_url(str(url))
    cfg.setdefault("SQLALCHEMY_ENGINE_OPTIONS", {})
    if cfg["SQLALCHEMY_DATABASE_URI"].startswith("sqlite"):
        # WAL + busy timeout are set per connection in extensions.py; here only the pool side.
        cfg["SQLALCHEMY_ENGINE_OPTIONS"].setdefault("connect_args", {"timeout": 30})
    else:
        cfg["SQLALCHEMY_ENGINE_OPTIONS"].setdefault("pool_pre_ping", True)
        cfg["SQLALCHEMY_ENGINE_OPTIONS"].setdefault("pool_size", 10)
        cfg["SQLALCHEMY_ENGINE_OPTIONS"].setdefault("max_overflow", 20)
        # A database host that drops packets must make /readyz answer 503, not hang. A
        # connect_timeout given in the URL is left to the URL (connect_args would override it).
        if "connect_timeout=" not in cfg["SQLALCHEMY_DATABASE_URI"]:
            cfg["SQLALCHEMY_ENGINE_OPTIONS"].setdefault("connect_args", {"connect_timeout": 5})
    # Flask's own request-size limit produces the 413 of the contract.
    cfg["MAX_CONTENT_LENGTH"] = cfg["MAX_REQUEST_BYTES"]
    cfg["SQLALCHEMY_TRACK_MODIFICATIONS"] = False


def normalise_database_url(url: str) -> str:
    """Make ``postgres://`` and bare ``postgresql://`` use psycopg 3 explicitly."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def parse_retry_schedule(text: str) -> list[int]:
    try:
        steps = [int(part.strip()) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise ConfigError("ELEMTA_RETRY_SCHEDULE must be comma-separated seconds") from exc
    if not steps or any(step <= 0 for step in steps):
        raise ConfigError("ELEMTA_RETRY_SCHEDULE needs at least one positive number of seconds")
    return steps


def _parse_networks(text: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    try:
        return [ipaddress.ip_network(p.strip(), strict=False) for p in text.split(",") if p.strip()]
    except ValueError as exc:
        raise ConfigError(f"ELEMTA_RELAY_NETWORKS: {exc}") from exc


def _as_int(key: str, value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"ELEMTA_{key} must be an integer, got {value!r}") from exc
    if number < 0:
        raise ConfigError(f"ELEMTA_{key} must not be negative")
    return number


def _as_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"ELEMTA_{key} must be true or false, got {value!r}")


def _default_sqlite_url(app: Flask) -> str:
    os.makedirs(app.instance_path, exist_ok=True)
    return "sqlite:///" + os.path.join(app.instance_path, "elemta.db")

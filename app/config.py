"""Configuration: safe defaults, overridden by ``ELEMTA_*`` environment variables.

Flask's ``from_prefixed_env("ELEMTA")`` reads ``ELEMTA_FOO`` into ``FOO``. Its default parses
values as JSON, which would turn a password ``12345`` into an int and ``1e3`` into ``1000.0``:
here every value is read as the exact string given, and ``SETTINGS`` converts and checks each one
(type, range, format) once, when the app is created, so a typo stops the process at start instead
of at 3 a.m. Every other module reads the converted values from ``app.config``.

A refused value raises ``ConfigError`` naming the variable and the value (never a secret's);
wsgi.py turns it into one line and a non-zero exit for the ``flask`` CLI and gunicorn.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import socket
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import sqlalchemy as sa
from flask import Flask
from limits import parse_many
from limits.storage import SCHEMES as LIMITS_STORAGE_SCHEMES

from .logging_setup import FORMATS as LOG_FORMATS
from .logs.levels import ACCEPTED as LOG_LEVELS

AUTH_MODES = ("admin", "all", "off")
RELAY_TLS_MODES = ("none", "starttls", "tls")
RATELIMIT_STRATEGIES = ("fixed-window", "moving-window", "sliding-window-counter")
DATABASE_SCHEMES = ("sqlite", "postgresql", "postgres")
CORS_SCHEMES = ("http", "https")
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")

_HOSTNAME = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?$")
_INTEGER = re.compile(r"^[+-]?[0-9]+$")
_URL_PASSWORD = re.compile(r"(//[^/@:]*:)[^/@]*@")


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the variable."""


def _refuse(key: str, value: Any, problem: str, *, secret: bool = False) -> ConfigError:
    shown = "" if secret else f" {value!r}"
    return ConfigError(f"ELEMTA_{key}:{shown} {problem}")


# --------------------------------------------------------------------------- value kinds
# Each kind takes (key, value) and returns the value to store or raises ConfigError. A value is
# a string from the environment, or any Python value given to create_app(config) (tests).

Parser = Callable[[str, Any], Any]


def integer(minimum: int = 0, maximum: int | None = None) -> Parser:
    def parse(key: str, value: Any) -> int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif isinstance(value, str) and _INTEGER.match(value.strip()):
            number = int(value.strip())
        else:
            raise _refuse(key, value, "is not a whole number")
        if number < minimum:
            raise _refuse(key, value, f"must be at least {minimum}")
        if maximum is not None and number > maximum:
            raise _refuse(key, value, f"must be at most {maximum}")
        return number

    return parse


def positive_number(key: str, value: Any) -> float:
    """Seconds (fractions allowed), more than zero."""
    try:
        if isinstance(value, bool):
            raise ValueError(value)
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise _refuse(key, value, "is not a number") from None
    if not math.isfinite(number) or number <= 0:
        raise _refuse(key, value, "must be a number above 0")
    return number


def process_count(key: str, value: Any) -> int | str:
    """``auto`` (kept as the word: app/smtpd/server.py resolves it) or a whole number 1-64."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        return integer(1, 64)(key, value)
    except ConfigError:
        raise _refuse(key, value, "must be auto or a whole number from 1 to 64") from None


def boolean(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE_WORDS:
        return True
    if text in FALSE_WORDS:
        return False
    raise _refuse(key, value, "must be true or false")


def switch(key: str, value: Any) -> bool:
    """``on`` or ``off`` (the boolean words are accepted too)."""
    try:
        return boolean(key, value)
    except ConfigError:
        raise _refuse(key, value, "must be on or off") from None


def choice(options: tuple[str, ...]) -> Parser:
    def parse(key: str, value: Any) -> str:
        text = str(value).strip().lower()
        if text not in options:
            raise _refuse(key, value, f"must be one of {', '.join(options)}")
        return text

    return parse


def text(key: str, value: Any) -> str:
    """Kept exactly as given: no JSON, no stripping (user names, key prefixes)."""
    return value if isinstance(value, str) else str(value)


def secret(key: str, value: Any) -> str:
    """Like ``text``; a separate kind so no message ever shows the value."""
    return value if isinstance(value, str) else str(value)


def local_hostname(configured: str = "") -> str:
    """The name this MTA gives itself (EHLO, Message-ID, Reporting-MTA): ``SMTP_HOSTNAME``,
    else this host's FQDN, asked when called (never at import: a slow resolver would slow every
    process's start), else ``localhost``. Here, not with the mail service, so that the worker
    needs no module that imports dkimpy or the queue's services to name itself."""
    return configured or socket.getfqdn() or "localhost"


def hostname(key: str, value: Any) -> str:
    """A DNS name for EHLO/HELO and the Received: lines; empty = this host's FQDN."""
    name = text(key, value)
    if name and not _HOSTNAME.match(name):
        raise _refuse(key, value, "is not a host name")
    return name


def parse_host_port(value: str, default_port: int) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]``, ``[v6]:port`` or a bare IPv6 address.

    Raises ``ValueError`` with the reason; ``relay_host`` checks ELEMTA_RELAY_HOST with it at
    start, so the worker (app/delivery/routing.py) only ever parses a value known to be good.
    """
    spec = value.strip()
    if spec.startswith("["):
        host, bracket, rest = spec[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError("is not host:port")
        _check_ip(host, 6)
        port = rest[1:] if rest else None
    elif spec.count(":") == 1:
        host, port = spec.split(":")
    elif ":" in spec:  # a bare IPv6 address: no port can follow it
        _check_ip(spec, 6)
        host, port = spec, None
    else:
        host, port = spec, None
    if not host or not (_HOSTNAME.match(host) or ":" in host):
        raise ValueError("is not host:port")
    if port is None:
        return host, default_port
    if not port.isdigit():
        raise ValueError("is not host:port")
    if not 0 < int(port) < 65536:
        raise ValueError("is not host:port (the port must be 1-65535)")
    return host, int(port)


def _check_ip(text_: str, version: int) -> None:
    try:
        if ipaddress.ip_address(text_).version != version:
            raise ValueError(text_)
    except ValueError:
        raise ValueError("is not host:port") from None


def relay_host(key: str, value: Any) -> str:
    spec = text(key, value)
    if spec.strip():
        try:
            parse_host_port(spec, 25)
        except ValueError as exc:
            raise _refuse(key, value, str(exc)) from None
    return spec


def listen_address(key: str, value: Any) -> str:
    """``host:port``, ``[v6]:port`` or ``:port`` (every interface): a port is required."""
    spec = text(key, value)
    host, sep, port = spec.strip().rpartition(":")
    if not sep or not port.isdigit():
        raise _refuse(key, value, "is not host:port")
    if not 0 < int(port) < 65536:
        raise _refuse(key, value, "is not host:port (the port must be 1-65535)")
    if host.startswith("["):
        if not host.endswith("]"):
            raise _refuse(key, value, "is not host:port")
        host = host[1:-1]
    if host and not _HOSTNAME.match(host):
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise _refuse(key, value, "is not host:port") from None
    return spec


def retry_schedule(key: str, value: Any) -> list[int]:
    parts = value if isinstance(value, (list, tuple)) else str(value).split(",")
    steps = []
    for part in parts:
        if isinstance(part, str) and not part.strip():
            continue
        steps.append(integer(1)(key, part if not isinstance(part, str) else part.strip()))
    if not steps:
        raise _refuse(key, value, "needs at least one positive number of seconds")
    return steps


def networks(key: str, value: Any) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    parts = value if isinstance(value, (list, tuple)) else str(value).split(",")
    result = []
    for part in parts:
        if isinstance(part, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
            result.append(part)
            continue
        if not str(part).strip():
            continue
        try:
            result.append(ipaddress.ip_network(str(part).strip(), strict=False))
        except ValueError:
            raise _refuse(key, str(part).strip(), "is not an IP network") from None
    return result


def cors_origins(key: str, value: Any) -> list[str]:
    """``*`` or ``scheme://host[:port]``, comma-separated: what browsers send as Origin."""
    parts = value if isinstance(value, (list, tuple)) else str(value or "").split(",")
    origins = []
    for part in parts:
        origin = str(part).strip()
        if not origin:
            continue
        if origin != "*":
            try:
                url = urlsplit(origin)
                url.port  # noqa: B018  (raises ValueError for a bad port)
            except ValueError:
                url = None
            if (url is None or url.scheme not in CORS_SCHEMES or not url.hostname
                    or url.path or url.query or url.fragment or url.username):
                raise _refuse(key, origin, "is not an origin (http[s]://host[:port], or *)")
        origins.append(origin)
    return origins


def public_url(key: str, value: Any) -> str:
    """``http[s]://host[:port][/prefix]`` or empty; kept without a trailing slash."""
    given = str(value or "").strip()
    if not given:
        return ""
    try:
        url = urlsplit(given)
        url.port  # noqa: B018  (raises ValueError for a bad port)
    except ValueError:
        url = None
    if (url is None or url.scheme not in CORS_SCHEMES or not url.hostname
            or url.query or url.fragment or url.username):
        raise _refuse(key, given, "is not a base URL (http[s]://host[:port][/path])")
    return given.rstrip("/")


def rate_limit(key: str, value: Any) -> str:
    spec = str(value).strip()
    try:
        if not parse_many(spec):
            raise ValueError(spec)
    except ValueError:
        raise _refuse(key, value, "is not a rate limit such as '600 per minute'") from None
    return spec


def redact_url(url: str) -> str:
    """The URL without its password, for messages."""
    return _URL_PASSWORD.sub(r"\1***@", url)


def ratelimit_storage(key: str, value: Any) -> str:
    uri = text(key, value).strip()
    scheme = uri.partition("://")[0].lower() if "://" in uri else ""
    if scheme not in LIMITS_STORAGE_SCHEMES or scheme.startswith("async+"):
        raise ConfigError(f"ELEMTA_{key}: {redact_url(uri)!r} is not a storage URI "
                          "(memory://, redis://host:port, ...)")
    return uri


def database_url(key: str, value: Any) -> str | None:
    """Empty: a SQLite file in the instance folder."""
    if value is None or not str(value).strip():
        return None
    url = str(value).strip()
    try:
        backend = sa.make_url(url).get_backend_name()
    except Exception:  # sqlalchemy raises ArgumentError, ValueError, ... for malformed URLs
        backend = ""
    if backend not in DATABASE_SCHEMES:
        raise ConfigError(f"ELEMTA_{key}: {redact_url(url)!r} is not a sqlite:// or "
                          "postgresql:// URL")
    if backend == "sqlite" and sa.make_url(url).database in (None, "", ":memory:"):
        # Every connection (and every process: API workers, worker, listener) would get its
        # own empty database, and all of it is lost at exit: a queue cannot live there.
        raise ConfigError(f"ELEMTA_{key}: {url!r} is an in-memory SQLite database; "
                          "give a file (sqlite:////path/to/elemta.db)")
    return url


def comma_list(convert: Callable[[str], Any], problem: str) -> Parser:
    """Comma-separated items, each converted by ``convert`` (ValueError: refused with
    ``problem``); blanks skipped; a list given by create_app(config) is taken as already
    converted."""

    def parse(key: str, value: Any) -> list[Any]:
        if isinstance(value, (list, tuple)):
            return list(value)
        result = []
        for item in (part.strip() for part in str(value or "").split(",")):
            if not item:
                continue
            try:
                result.append(convert(item))
            except ValueError:
                raise _refuse(key, item, problem) from None
        return result

    return parse


def _name_server(item: str) -> tuple[str, int]:
    host, port = parse_host_port(item, 53)
    ipaddress.ip_address(host)
    return host, port


# IPv4/IPv6 addresses (no networks), in their compressed form.
ip_addresses = comma_list(lambda item: str(ipaddress.ip_address(item)), "is not an IP address")
# Name servers ``ip``, ``ip:port`` or ``[v6]:port``; empty: the system's.
dns_servers = comma_list(_name_server, "is not a name server address (ip or ip:port)")


def readable_file(key: str, value: Any) -> str:
    path = text(key, value)
    if path and not (os.path.isfile(path) and os.access(path, os.R_OK)):
        problem = "is not a file" if not os.path.exists(path) or os.path.isdir(path) \
            else "cannot be read by this process"
        raise _refuse(key, value, problem)
    return path


@dataclass(frozen=True)
class Setting:
    default: Any
    parse: Parser


OPTIONAL = object()  # no default here: the module reading it has one; checked when set

SETTINGS: dict[str, Setting] = {
    "DATABASE_URL": Setting(None, database_url),  # None -> SQLite file under instance/
    "MAX_REQUEST_BYTES": Setting(1024 * 1024, integer(1)),
    "FAILED_RETENTION": Setting(604800, integer(0)),
    "LOG_RETENTION": Setting(1209600, integer(0)),  # 0 keeps every record
    "LOG_LEVEL": Setting("info", choice(LOG_LEVELS)),
    # auto: text on a terminal, JSON on a pipe or under systemd (app/logging_setup.py).
    "LOG_FORMAT": Setting("auto", choice(LOG_FORMATS)),
    # Database logging (docs/LOGS.md): None -> on, off under TESTING.
    "LOG_TO_DATABASE": Setting(None, boolean),
    "LOG_QUEUE_SIZE": Setting(10_000, integer(1)),
    "LOG_FLUSH_INTERVAL": Setting(0.5, positive_number),
    "LOG_PRUNE_INTERVAL": Setting(300.0, positive_number),
    "AUTH_MODE": Setting("admin", choice(AUTH_MODES)),
    "RATELIMIT_ENABLED": Setting(True, boolean),  # read by Flask-Limiter itself
    "RATELIMIT_DEFAULT": Setting("600 per minute", rate_limit),
    "RATELIMIT_STRICT": Setting("10 per minute", rate_limit),
    "RATELIMIT_STORAGE_URI": Setting("memory://", ratelimit_storage),
    "RATELIMIT_STRATEGY": Setting("fixed-window", choice(RATELIMIT_STRATEGIES)),
    "RATELIMIT_KEY_PREFIX": Setting("elemta", text),
    "TRUSTED_PROXIES": Setting(0, integer(0)),
    "CORS_ORIGINS": Setting("", cors_origins),
    # Where clients reach the API (docs/SECURITY.md): absolute Link headers are built on it;
    # empty, they are relative. Never the client's Host header.
    "PUBLIC_URL": Setting("", public_url),
    "WORKER_LEASE_SECONDS": Setting(300, integer(1)),
    "WORKER_CONCURRENCY": Setting(8, integer(1)),  # SMTP deliveries at once (SPEC.md §10)
    # Delivery threads of a worker process (``worker_threads``: four times the concurrency
    # unless set; at least the concurrency): the threads beyond it wait for their last outcome's
    # commit while others are in SMTP (docs/DELIVERY.md, "Threads and deliveries at once").
    "WORKER_THREADS": Setting(OPTIONAL, integer(1)),
    # ``flask worker`` processes (app/delivery/processes.py); 0: one per CPU core.
    "WORKER_PROCESSES": Setting(1, integer(0)),
    "MAX_CONNECTIONS_PER_DOMAIN": Setting(10, integer(1)),
    "RELAY_HOST": Setting("", relay_host),
    "RELAY_USERNAME": Setting("", secret),
    "RELAY_PASSWORD": Setting("", secret),
    "RELAY_TLS": Setting("none", choice(RELAY_TLS_MODES)),
    # A private CA (PEM) trusted for the relay's certificate, instead of the system's CAs.
    "RELAY_TLS_CA_FILE": Setting("", readable_file),
    "RETRY_SCHEDULE": Setting("60,300,900,3600,10800,21600", retry_schedule),
    "MAX_QUEUE_LIFETIME": Setting(432000, integer(0)),
    "SEND_BOUNCES": Setting(True, boolean),
    # Delivery worker (see docs/DELIVERY.md): seconds to wait for an SMTP peer, the port of
    # MX delivery (tests point it at a loopback sink) and seconds for one DNS lookup.
    "SMTP_TIMEOUT": Setting(60, integer(1)),
    "SMTP_PORT": Setting(25, integer(1, 65535)),
    "DNS_TIMEOUT": Setting(10, integer(1)),
    # Name servers for MX routing and the domain check; empty: /etc/resolv.conf.
    "DNS_SERVERS": Setting("", dns_servers),
    # The public addresses mail leaves this host from (domain check: SPF, reverse DNS).
    "SENDING_IPS": Setting("", ip_addresses),
    # Seconds a domain check report is reused before DNS is asked again (docs/DKIM.md).
    "DOMAIN_CHECK_CACHE": Setting(300, integer(0)),
    "SMTP_LISTEN": Setting("127.0.0.1:2525", listen_address),
    "SMTP_HOSTNAME": Setting("", hostname),
    "MAX_MESSAGE_BYTES": Setting(26214400, integer(0)),  # 0: no SIZE limit
    "MAX_RECIPIENTS": Setting(1000, integer(1)),
    "RELAY_NETWORKS": Setting("127.0.0.0/8,::1", networks),
    "TLS_CERT": Setting("", readable_file),
    "TLS_KEY": Setting("", readable_file),
    "SMTPD_MAX_SESSIONS": Setting(100, integer(1)),  # listener: concurrent sessions; more: 421
    "SMTPD_IDLE_TIMEOUT": Setting(300, integer(1)),  # listener: idle seconds (RFC 5321 4.5.3.2.7)
    "SMTPD_PROXY_PROTOCOL": Setting(False, boolean),  # listener: expect a PROXY header
    # Listener processes sharing the port (docs/SMTPD.md, "Listener processes"); auto: one per
    # two CPUs the process may run on, at least 1, at most 4; 1: one process, no parent.
    "SMTPD_PROCESSES": Setting("auto", process_count),
    # Listener connection limits (docs/SMTPD.md, app/smtpd/admission.py). The reserve and the
    # per-client count default to a fifth and a half of SMTPD_MAX_SESSIONS (app/smtpd/server.py).
    "SMTPD_TRUSTED_RESERVE": Setting(OPTIONAL, integer(0)),
    "SMTPD_CLIENT_CONNECTION_COUNT_LIMIT": Setting(OPTIONAL, integer(0)),  # 0: no limit
    "SMTPD_CLIENT_CONNECTION_RATE_LIMIT": Setting(120, integer(0)),  # per minute; 0: no limit
    "SMTPD_STRESS_IDLE_TIMEOUT": Setting(10, integer(1)),  # idle seconds near the session cap
    # WebSocket streams (docs/STREAMS.md); the defaults live in app/stream/.
    "STREAM_POLL_INTERVAL": Setting(OPTIONAL, positive_number),
    "STREAM_HOLE_TIMEOUT": Setting(OPTIONAL, positive_number),
    "STREAM_QUEUE_SIZE": Setting(OPTIONAL, integer(1)),
    "STREAM_PING_INTERVAL": Setting(OPTIONAL, positive_number),
    "STREAM_SEND_TIMEOUT": Setting(OPTIONAL, positive_number),
    # Read by gunicorn.conf.py from the environment; checked here too so that every process
    # sharing the env file refuses the same typo.
    "API_THREADS": Setting(OPTIONAL, integer(1)),
    # The webhook dispatcher (docs/WEBHOOKS.md); the defaults live in app/webhooks/.
    "WEBHOOK_TIMEOUT": Setting(OPTIONAL, positive_number),
    "WEBHOOK_CONCURRENCY": Setting(OPTIONAL, integer(1, 64)),
    "WEBHOOK_RETRY_BASE": Setting(OPTIONAL, positive_number),
    "WEBHOOK_RETRY_MAX_DELAY": Setting(OPTIONAL, positive_number),
    "WEBHOOK_RETRY_WINDOW": Setting(OPTIONAL, integer(1)),
    "WEBHOOK_POLL_INTERVAL": Setting(OPTIONAL, positive_number),
    "WEBHOOK_HOLE_TIMEOUT": Setting(OPTIONAL, positive_number),
    "WEBHOOK_RETENTION": Setting(OPTIONAL, integer(0)),  # 0 keeps every finished delivery
    # The web dashboard at /ui (docs/DASHBOARD.md): on or off.
    "UI": Setting(True, switch),
}
DEFAULTS: dict[str, Any] = {k: s.default for k, s in SETTINGS.items() if s.default is not OPTIONAL}


def _as_given(value: str) -> str:
    return value


def load_config(app: Flask, overrides: dict[str, Any] | None) -> None:
    """Fill ``app.config`` from defaults, the environment, then explicit overrides; check all."""
    app.config.from_mapping(DEFAULTS)
    app.config.from_prefixed_env("ELEMTA", loads=_as_given)
    if overrides:
        app.config.from_mapping(overrides)
    validate(app)


# ELEMTA_* variables that are not application settings: read by gunicorn.conf.py, the process
# wrappers, the test suite and the benchmark.
NOT_SETTINGS = frozenset({"API_LISTEN", "ACCESS_LOG", "PROCESS_ROLE", "STARTED_AT",
                          "METRICS_DIR_OWNER", "ENV_FILE", "HOME", "TEST_DATABASE_URL",
                          "E2E_DATABASE_URL", "E2E_KEEP", "BENCH_DATABASE_URL",
                          "BENCH_PG_SERVER"})


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """``ELEMTA_*`` names that nothing reads: usually a misspelt setting, silently ignored."""
    return sorted(name for name in environ if name.startswith("ELEMTA_")
                  and name[7:] not in SETTINGS and name[7:] not in NOT_SETTINGS)


def validate(app: Flask) -> None:
    """Convert and check every setting in place; raise ``ConfigError`` at the first bad one."""
    cfg = app.config
    if cfg["LOG_TO_DATABASE"] is None:
        cfg["LOG_TO_DATABASE"] = not app.testing
    for key, setting in SETTINGS.items():
        if key in cfg:
            cfg[key] = setting.parse(key, cfg[key])
    _check_tls_pair(cfg["TLS_CERT"], cfg["TLS_KEY"])
    _check_trusted_reserve(cfg)
    _check_worker_threads(cfg)

    url = cfg["DATABASE_URL"] or _default_sqlite_url(app)
    cfg["SQLALCHEMY_DATABASE_URI"] = normalise_database_url(url)
    cfg.setdefault("SQLALCHEMY_ENGINE_OPTIONS", {})
    if cfg["SQLALCHEMY_DATABASE_URI"].startswith("sqlite"):
        # WAL + busy timeout are set per connection in extensions.py; here only the pool side.
        cfg["SQLALCHEMY_ENGINE_OPTIONS"].setdefault("connect_args", {"timeout": 30})
        if not _sqlite_in_memory(cfg["SQLALCHEMY_DATABASE_URI"]):
            # SQLAlchemy's pool for a file: 5 kept + 10 overflow, 15 at once; a worker with
            # more delivery threads needs more (an in-memory database has one, StaticPool).
            cfg["SQLALCHEMY_ENGINE_OPTIONS"].setdefault(
                "max_overflow", max(10, worker_connections(cfg) - 5))
    else:
        # No pool_pre_ping: app/database.py checks a pooled connection at checkout without a
        # round trip unless the server has sent something on it (a terminated backend).
        # 30 kept connections and no overflow: the ceiling of the former 10 + 20 overflow, but
        # a burst no longer opens overflow connections only to close them on return (with 32
        # API threads, ~80 PostgreSQL sessions opened and closed in 6 s; docs/PERFORMANCE.md,
        # "HTTP, thread switches around the stats read"). A process keeps what its busiest
        # moment opened; one with fewer threads (listener, worker) never opens more than those.
        # A worker with more delivery threads than that (ELEMTA_WORKER_THREADS, or a raised
        # concurrency) gets a connection for each, or its threads would queue for the pool.
        cfg["SQLALCHEMY_ENGINE_OPTIONS"].setdefault("pool_size",
                                                    max(30, worker_connections(cfg)))
        cfg["SQLALCHEMY_ENGINE_OPTIONS"].setdefault("max_overflow", 0)
        # A database host that drops packets must make /readyz answer 503 and a delivery
        # outcome's commit fail (then the recorder renews its leases: docs/DELIVERY.md), not
        # hang (``POSTGRESQL_CONNECT_ARGS``). A parameter given in the URL is left to the URL
        # (connect_args would override it); connect_args given to the app override these.
        query = sa.engine.make_url(cfg["SQLALCHEMY_DATABASE_URI"]).query
        options = cfg["SQLALCHEMY_ENGINE_OPTIONS"]
        options["connect_args"] = {
            **{k: v for k, v in POSTGRESQL_CONNECT_ARGS.items() if k not in query},
            **options.get("connect_args", {})}
    # Flask's own request-size limit produces the 413 of the contract.
    cfg["MAX_CONTENT_LENGTH"] = cfg["MAX_REQUEST_BYTES"]
    cfg["SQLALCHEMY_TRACK_MODIFICATIONS"] = False


# libpq's connection parameters for every PostgreSQL connection (API, listener, worker). A
# connection whose peer vanished (a host gone, a firewall dropping its packets) otherwise
# waits for the kernel's TCP retransmissions, about 15 minutes, longer than the worker's lease
# (ELEMTA_WORKER_LEASE_SECONDS): a delivery outcome's commit hanging that long, unnoticed,
# would let another worker claim and send again what was delivered. tcp_user_timeout (ms):
# data sent and not acknowledged for that long fails the connection; the keepalives probe a
# connection waiting for an answer (10 s idle, then 3 probes 5 s apart). A live server that is
# merely slow answers the probes: a long statement is not cut. Both are Linux's; elsewhere
# libpq ignores tcp_user_timeout. Unix-domain sockets ignore them.
POSTGRESQL_CONNECT_ARGS: dict[str, Any] = {
    "connect_timeout": 5, "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
    "keepalives_count": 3, "tcp_user_timeout": 30000}

THREADS_PER_SLOT = 4  # WORKER_THREADS's default: this many times WORKER_CONCURRENCY


def worker_threads(cfg: Mapping[str, Any]) -> int:
    """A delivery worker process's threads: ``WORKER_THREADS``, else four times the concurrency.

    ``WORKER_CONCURRENCY`` of them at most are in an SMTP transaction; the others wait for
    their last outcome's commit meanwhile (app/delivery/worker.py). Four times, not twice: a
    commit then carries ~13-28 outcomes instead of ~10-15, and delivery ran +10 to +78 % faster
    (docs/PERFORMANCE.md, "Delivery, the default of the delivery threads")."""
    threads = cfg.get("WORKER_THREADS")
    return int(threads) if threads else THREADS_PER_SLOT * int(cfg["WORKER_CONCURRENCY"])


WORKER_OTHER_CONNECTIONS = 3  # the main thread's, the recorder's, one to spare


def worker_connections(cfg: Mapping[str, Any]) -> int:
    """Database connections a worker process may hold at once: one per delivery thread (at
    most one each: a content read, a claim given back, a control check), and its others."""
    return worker_threads(cfg) + WORKER_OTHER_CONNECTIONS


def _check_worker_threads(cfg: Mapping[str, Any]) -> None:
    """Each delivery at once runs on a thread of its own: fewer threads than the concurrency
    would quietly lower it."""
    threads = cfg.get("WORKER_THREADS")
    if threads is not None and threads < cfg["WORKER_CONCURRENCY"]:
        raise _refuse("WORKER_THREADS", threads, "must be at least ELEMTA_WORKER_CONCURRENCY "
                      f"({cfg['WORKER_CONCURRENCY']}): each delivery at once needs a thread")


def _sqlite_in_memory(url: str) -> bool:
    database = sa.engine.make_url(url).database
    return not database or ":memory:" in database or "mode=memory" in url


def _check_trusted_reserve(cfg: Mapping[str, Any]) -> None:
    """Untrusted clients must keep at least one session, or the listener refuses them all."""
    reserve = cfg.get("SMTPD_TRUSTED_RESERVE")
    if reserve is not None and reserve >= cfg["SMTPD_MAX_SESSIONS"]:
        raise _refuse("SMTPD_TRUSTED_RESERVE", reserve,
                      f"must be below ELEMTA_SMTPD_MAX_SESSIONS ({cfg['SMTPD_MAX_SESSIONS']})")


def _check_tls_pair(cert: str, key: str) -> None:
    """STARTTLS needs both files, and they must belong together: found here, not at the first
    client's STARTTLS (or after the listener has announced itself)."""
    if not cert and not key:
        return
    if not (cert and key):
        raise ConfigError("ELEMTA_TLS_CERT and ELEMTA_TLS_KEY: STARTTLS needs both "
                          f"(only {'ELEMTA_TLS_CERT' if cert else 'ELEMTA_TLS_KEY'} is set)")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"ELEMTA_TLS_CERT/ELEMTA_TLS_KEY: cannot load {cert!r} with {key!r} "
                          f"({exc.strerror or exc})") from None


def normalise_database_url(url: str) -> str:
    """Make ``postgres://`` and bare ``postgresql://`` use psycopg 3 explicitly."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def _default_sqlite_url(app: Flask) -> str:
    os.makedirs(app.instance_path, exist_ok=True)
    return "sqlite:///" + os.path.join(app.instance_path, "elemta.db")

"""End-to-end check of the production path: ``make e2e``.

A fresh PostgreSQL database, migrated with ``flask db upgrade``; gunicorn (2 gthread workers)
behind a real nginx running ``deploy/nginx/elemta.conf`` itself (ports, paths and a throw-away
TLS certificate substituted); the delivery worker and the SMTP listener, relaying to a local
SMTP sink. One message goes from SMTP in to the sink out, and every step is checked through
nginx: REST (queue, logs, stats, health, metrics) and both WebSocket streams. Everything it
started is stopped and the database dropped, pass or fail.

Exit status 0 when every check passed, 1 with an ``e2e: FAILED: ...`` line otherwise. Parts of
the product that are not there yet are reported as ``e2e: SKIPPED: ...`` (never silently).

Environment: ``ELEMTA_E2E_DATABASE_URL`` (else ``ELEMTA_TEST_DATABASE_URL``, else
postgresql+psycopg://postgres@127.0.0.1:5432/postgres) names the server; ``ELEMTA_E2E_KEEP=1``
keeps the temporary directory with every process's log.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import psycopg
import simple_websocket
import sqlalchemy as sa
from aiosmtpd.controller import Controller

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SITE_TEMPLATE = ROOT / "deploy" / "nginx" / "elemta.conf"
DEFAULT_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
STEP_TIMEOUT = 30.0


class Failed(Exception):
    """A check that did not hold; its message says which and what was seen."""


SKIPPED: list[str] = []


def say(text: str) -> None:
    print(f"e2e: {text}", flush=True)


def skip(text: str) -> None:
    SKIPPED.append(text)
    say(f"SKIPPED: {text}")


def check(condition: bool, message: str) -> None:
    if not condition:
        raise Failed(message)


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = STEP_TIMEOUT) -> Any:
    """Poll until ``predicate()`` is truthy; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = predicate()
            if result:
                return result
        except (OSError, Failed, ValueError, KeyError) as exc:
            last_error = exc
        time.sleep(0.2)
    raise Failed(f"timed out after {timeout:.0f}s waiting for {what}"
                 + (f" (last error: {last_error})" if last_error else ""))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------- the pieces


class KeepDataReply(smtplib.SMTP):
    """smtplib's client, keeping the reply to DATA that ``send_message()`` drops: its text
    carries the queue id (API.md §11)."""

    data_reply: tuple[int, bytes] = (0, b"")

    def data(self, msg: Any) -> tuple[int, bytes]:
        self.data_reply = super().data(msg)
        return self.data_reply


class Sink:
    """The remote mail server the worker relays to: aiosmtpd on loopback, keeping what it got."""

    def __init__(self, port: int) -> None:
        self.messages: list[dict[str, Any]] = []
        self.controller = Controller(self, hostname="127.0.0.1", port=port)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append({"from": envelope.mail_from, "to": list(envelope.rcpt_tos),
                              "data": envelope.content.decode("utf-8", "replace")})
        return "250 2.0.0 OK: kept by the e2e sink"

    def start(self) -> None:
        self.controller.start()

    def stop(self) -> None:
        self.controller.stop()


def find_nginx() -> str:
    found = shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        say("nginx is missing; installing nginx-light with apt-get")
        for args in (["apt-get", "install", "-y", "nginx-light"], ["apt-get", "update"],
                     ["apt-get", "install", "-y", "nginx-light"]):
            done = subprocess.run(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
            if done.returncode == 0 and args[1] == "install":
                break
        found = shutil.which("nginx") or (
            "/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if not found:
        raise Failed("nginx is not installed and could not be installed "
                     "(apt-get install nginx-light)")
    return found


def make_certificate(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "tls.crt", directory / "tls.key"
    done = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
         "-keyout", str(key), "-out", str(cert)], capture_output=True)
    if done.returncode != 0:
        raise Failed(f"openssl could not make a test certificate: {done.stderr.decode()[-300:]}")
    return cert, key


def render_site(api_port: int, http_port: int, https_port: int, cert: Path, key: Path,
                access_log: Path) -> str:
    """deploy/nginx/elemta.conf with loopback ports, the test certificate and a log path."""
    site = SITE_TEMPLATE.read_text()
    replacements = [
        ("server 127.0.0.1:8025;", f"server 127.0.0.1:{api_port};"),
        ("listen 80;", f"listen 127.0.0.1:{http_port};"),
        ("listen [::]:80;", ""),
        ("listen 443 ssl http2;", f"listen 127.0.0.1:{https_port} ssl http2;"),
        ("listen [::]:443 ssl http2;", ""),
        ("/etc/ssl/certs/elemta.example.com.fullchain.pem", str(cert)),
        ("/etc/ssl/private/elemta.example.com.key", str(key)),
        ("/var/log/nginx/elemta.access.log", str(access_log)),
    ]
    for old, new in replacements:
        if old not in site:
            raise Failed(f"{SITE_TEMPLATE.relative_to(ROOT)} no longer contains {old!r}; "
                         "update scripts/e2e.py with it")
        site = site.replace(old, new)
    return site


def nginx_main_config(tmp: Path, site: Path) -> str:
    user = "user root;" if os.geteuid() == 0 else ""
    temp = "\n".join(f"    {name}_temp_path {tmp / ('nginx-' + name)};"
                     for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""
daemon off;
master_process on;
worker_processes 1;
{user}
pid {tmp / 'nginx.pid'};
error_log {tmp / 'nginx-error.log'} info;
events {{ worker_connections 256; }}
http {{
    access_log {tmp / 'nginx-access.log'};
{temp}
    include {site};
}}
"""


class Processes:
    """The children, each in its own session, with stdout and stderr in files."""

    def __init__(self, tmp: Path, env: dict[str, str]) -> None:
        self.tmp = tmp
        self.env = env
        self.children: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str]) -> None:
        with open(self.tmp / f"{name}.out", "wb") as out, \
                open(self.tmp / f"{name}.err", "wb") as err:
            self.children[name] = subprocess.Popen(argv, cwd=ROOT, env=self.env, stdout=out,
                                                   stderr=err, start_new_session=True)

    def check_alive(self) -> None:
        for name, child in self.children.items():
            if child.poll() is not None:
                raise Failed(f"{name} exited early with status {child.returncode} "
                             f"(see its log below)")

    def stop_all(self) -> dict[str, int | None]:
        # nginx first (no new requests), then the listener, the worker and the API.
        for child in reversed(list(self.children.values())):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        for name, child in self.children.items():
            try:
                codes[name] = child.wait(timeout=40)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                codes[name] = child.wait()
        return codes

    def tail(self, lines: int = 25) -> str:
        parts = []
        for name in self.children:
            for stream in ("out", "err"):
                path = self.tmp / f"{name}.{stream}"
                text = path.read_text(errors="replace").splitlines(
                )[-lines:] if path.exists() else []
                if text:
                    parts.append(
                        f"---- {name} {stream} (last {len(text)} lines)\n" +
                        "\n".join(text))
        for log in ("nginx-error.log",):
            path = self.tmp / log
            if path.exists():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"---- {log}\n" + "\n".join(text))
        return "\n".join(parts)


class Client:
    """HTTPS through nginx, trusting the test certificate."""

    def __init__(self, base: str, cert: Path) -> None:
        self.base = base
        self.context = ssl.create_default_context(cafile=str(cert))
        self.admin_key: str | None = None

    def call(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
             admin: bool = False) -> tuple[int, dict[str, str], Any]:
        data = json.dumps(body).encode() if body is not None else None
        all_headers = {"Accept": "application/json", **(headers or {})}
        if data is not None:
            all_headers["Content-Type"] = "application/json"
        if admin and self.admin_key:
            all_headers["Authorization"] = f"Bearer {self.admin_key}"
        request = urllib.request.Request(self.base + path, data=data, method=method,
                                         headers=all_headers)
        try:
            with urllib.request.urlopen(request, timeout=15, context=self.context) as response:
                return response.status, dict(response.headers), _decode(response)
        except urllib.error.HTTPError as error:
            with error:
                return error.code, dict(error.headers), _decode(error)

    def get_ok(self, path: str, **kwargs: Any) -> Any:
        status, _headers, body = self.call("GET", path, **kwargs)
        check(status == 200, f"GET {path} answered {status}: {str(body)[:300]}")
        return body


def _decode(response: Any) -> Any:
    raw = response.read()
    if "json" in (response.headers.get("Content-Type") or ""):
        return json.loads(raw)
    return raw.decode("utf-8", "replace")


class Stream:
    """A WebSocket client collecting every JSON frame in a background thread."""

    def __init__(self, url: str, context: ssl.SSLContext) -> None:
        self.url = url
        self.frames: list[dict[str, Any]] = []
        self.error: Exception | None = None
        self.ws = simple_websocket.Client.connect(url, ssl_context=context)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            while True:
                text = self.ws.receive()
                if text is None:
                    continue
                self.frames.append(json.loads(text))
        except simple_websocket.ConnectionClosed:
            pass
        except Exception as exc:  # noqa: BLE001 - reported by the checks that wait on frames
            self.error = exc

    def find(self, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
        if self.error:
            raise Failed(f"WebSocket {self.url} failed: {self.error!r}")
        return next((f for f in list(self.frames) if predicate(f)), None)

    def close(self) -> None:
        try:
            self.ws.close()
        except Exception:  # noqa: BLE001 - already closed by the server
            pass
        self.thread.join(timeout=5)


def metric_value(text: str, name: str, **labels: str) -> float | None:
    wanted = {f'{k}="{v}"' for k in labels for v in [labels[k]]}
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, label_text = head.partition("{")
        if metric != name:
            continue
        if wanted <= set(label_text.rstrip("}").split(",")) - {""}:
            return float(value)
    return None


def feature(argv: list[str], env: dict[str, str]) -> bool:
    """True when ``flask <command> --help`` answers (the command exists)."""
    return subprocess.run([str(BIN / "flask"), *argv, "--help"], cwd=ROOT, env=env,
                          capture_output=True).returncode == 0


# --------------------------------------------------------------------------- the run


def run(tmp: Path) -> None:
    server = (os.environ.get("ELEMTA_E2E_DATABASE_URL")
              or os.environ.get("ELEMTA_TEST_DATABASE_URL")
              or DEFAULT_SERVER)
    server_url = sa.make_url(server.replace("postgresql://", "postgresql+psycopg://", 1))
    if server_url.get_backend_name() != "postgresql":
        raise Failed(f"the e2e needs a PostgreSQL server, got {server}")
    admin_dsn = server_url.set(drivername="postgresql").render_as_string(hide_password=False)
    dbname = f"elemta_e2e_{secrets.token_hex(4)}"
    database_url = server_url.set(database=dbname).render_as_string(hide_password=False)

    nginx = find_nginx()
    cert, key = make_certificate(tmp)
    ports = {name: free_port() for name in ("api", "http", "https", "smtp", "sink")}
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("ELEMTA_")},
        "FLASK_APP": "wsgi.py",
        "ELEMTA_DATABASE_URL": database_url,
        "ELEMTA_API_LISTEN": f"127.0.0.1:{ports['api']}",
        "WEB_CONCURRENCY": "2",
        "ELEMTA_API_THREADS": "8",
        "ELEMTA_TRUSTED_PROXIES": "1",
        "ELEMTA_SMTP_LISTEN": f"127.0.0.1:{ports['smtp']}",
        "ELEMTA_RELAY_HOST": f"127.0.0.1:{ports['sink']}",
        "ELEMTA_RELAY_TLS": "none",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp / "metrics"),
        "ELEMTA_LOG_LEVEL": "info",
    }
    env.pop("ELEMTA_STARTED_AT", None)

    say(f"creating database {dbname}")
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{dbname}"')
    processes = Processes(tmp, env)
    sink = Sink(ports["sink"])
    streams: list[Stream] = []
    try:
        _run_checks(tmp, env, nginx, cert, key, ports, processes, sink, streams)
    except Failed:
        say("logs of the processes:\n" + processes.tail())
        raise
    finally:
        for stream in streams:
            stream.close()
        codes = processes.stop_all()
        if sink.controller._thread is not None:  # started
            sink.stop()
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        say(f"stopped everything ({', '.join(f'{n} exit {c}' for n, c in codes.items())}); "
            f"dropped {dbname}")


def _run_checks(tmp: Path, env: dict[str, str], nginx: str, cert: Path, key: Path,
                ports: dict[str, int], processes: Processes, sink: Sink,
                streams: list[Stream]) -> None:
    flask = str(BIN / "flask")
    upgrade = subprocess.run([flask, "db", "upgrade"], cwd=ROOT, env=env, capture_output=True)
    check(upgrade.returncode == 0, f"flask db upgrade failed: {upgrade.stderr.decode()[-500:]}")
    say("migrated (flask db upgrade)")

    client = Client(f"https://127.0.0.1:{ports['https']}", cert)
    created = subprocess.run([flask, "apikey", "create", "--name", "e2e-admin", "--role", "admin"],
                             cwd=ROOT, env=env, capture_output=True, text=True)
    if created.returncode == 0 and created.stdout.strip().startswith("elemta_"):
        client.admin_key = created.stdout.strip().splitlines()[-1]
        say("admin API key created (flask apikey create)")
    else:
        skip("flask apikey create is not available: mutating REST calls are not exercised")

    has_worker = feature(["worker"], env)
    has_smtpd = feature(["smtpd"], env)
    sink.start()
    processes.start("api", [str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", "wsgi:app"])
    if has_worker:
        processes.start("worker", [flask, "worker"])
    else:
        skip("flask worker does not exist yet: no delivery to the sink")
    if has_smtpd:
        processes.start("smtpd", [flask, "smtpd"])
    else:
        skip("flask smtpd does not exist yet: the message enters through POST /api/send-test")

    site = tmp / "elemta-site.conf"
    site.write_text(render_site(ports["api"], ports["http"], ports["https"], cert, key,
                                tmp / "nginx-access.log"))
    main = tmp / "nginx.conf"
    main.write_text(nginx_main_config(tmp, site))
    tested = subprocess.run([nginx, "-t", "-p", str(tmp), "-e", str(tmp / "nginx-error.log"),
                             "-c", str(main)], capture_output=True, text=True)
    check(tested.returncode == 0, f"nginx -t refused the site: {tested.stderr[-800:]}")
    processes.start("nginx", [nginx, "-p", str(tmp), "-e", str(tmp / "nginx-error.log"),
                              "-c", str(main)])
    say(f"started gunicorn (2 workers) on :{ports['api']}, nginx TLS on :{ports['https']}"
        + (f", worker, smtpd on :{ports['smtp']}" if has_smtpd else "")
        + f", sink on :{ports['sink']}")

    def ready() -> bool:
        processes.check_alive()
        return client.call("GET", "/readyz")[0] == 200

    wait_for(ready, "GET /readyz through nginx")
    check(client.get_ok("/livez") == {"status": "alive"}, "GET /livez did not answer alive")
    status, headers, _ = client.call("GET", "/readyz", headers={"X-Request-ID": "e2e-probe-1"})
    check(headers.get("X-Request-ID") == "e2e-probe-1",
          f"X-Request-ID not echoed through nginx: {headers.get('X-Request-ID')}")
    redirect = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                               f"http://127.0.0.1:{ports['http']}/api/health"],
                              capture_output=True, text=True)
    if redirect.returncode == 0:
        check(redirect.stdout == "301", f"plain HTTP is not redirected to HTTPS: {redirect.stdout}")
    say("nginx proxies /livez, /readyz (request id echoed), HTTP redirects to HTTPS")

    # What nginx refuses itself is the API's JSON error too (its error_page blocks).
    for what, (status, expected, call) in {
            "a 9 kB request line": (414, "URI_TOO_LONG",
                                    lambda: client.call("GET", "/api/queue/all?x=" + "a" * 9000)),
            "a 3 MB body": (413, "PAYLOAD_TOO_LARGE",
                            lambda: client.call("POST", "/api/send-test", body="x" * 3_000_000)),
    }.items():
        got, headers, body = call()
        check(got == status and isinstance(body, dict) and body.get("code") == expected
              and set(body) == {"error", "code", "details"},
              f"nginx answered {what} with {got} {headers.get('Content-Type')}: {str(body)[:200]}")
    say("nginx's own 413 and 414 are the contract's JSON errors")

    if has_worker:
        health = wait_for(lambda: (lambda h: h if h["status"] == "healthy" else None)(
            client.get_ok("/api/health")), "GET /api/health to say healthy (worker heartbeat)")
        check(health["worker"]["status"] == "running", f"worker not running: {health['worker']}")
    else:
        health = client.get_ok("/api/health")
        check(health["status"] == "degraded", f"health without a worker: {health['status']}")
    check(health["database"]["status"] == "ok", f"database in health: {health['database']}")
    say(f"health {health['status']}: database {health['database']['latency_ms']} ms, "
        f"worker {health['worker']['status']}, queue {health['queue']}")

    # Live streams through nginx's WebSocket upgrade.
    ws_base = f"wss://127.0.0.1:{ports['https']}"
    key_param = f"?api_key={client.admin_key}" if client.admin_key else ""
    try:
        queue_ws = Stream(f"{ws_base}/api/queue/ws{key_param}", client.context)
        streams.append(queue_ws)
        logs_ws = Stream(f"{ws_base}/api/logs/ws{key_param}", client.context)
        streams.append(logs_ws)
    except (simple_websocket.ConnectionError, ConnectionError) as exc:
        queue_ws = logs_ws = None
        skip(f"WebSocket streams not available through nginx ({exc}): stream checks skipped")
    if queue_ws:
        wait_for(lambda: queue_ws.find(lambda f: f.get("type") == "queue_stats"),
                 "the queue_stats frame on /api/queue/ws")
        say("WebSocket /api/queue/ws and /api/logs/ws connected through nginx "
            "(queue_stats received)")

    # The message: SMTP in (or send-test when there is no listener yet).
    subject = f"e2e {secrets.token_hex(6)}"
    if has_smtpd:
        wait_for(lambda: socket.create_connection(("127.0.0.1", ports["smtp"]), timeout=1).close()
                 or True, "the SMTP listener to accept connections")
        mail = EmailMessage()
        mail["From"], mail["To"], mail["Subject"] = "alice@example.com", "bob@example.net", subject
        mail.set_content("Sent by make e2e.\n")
        with KeepDataReply("127.0.0.1", ports["smtp"], timeout=15) as smtp:
            smtp.ehlo("e2e.example")
            # As a user's client sends: send_message() takes the envelope from the headers
            # and serialises the message itself (raising on a refused sender or data).
            refused = smtp.send_message(mail)
        check(not refused, f"recipients refused: {refused}")
        code, reply = smtp.data_reply
        check(code == 250, f"DATA answered {code} {reply!r}")
        found = re.search(rb"msg-[A-Za-z0-9_-]+", reply)
        check(found is not None, f"the 250 reply does not carry the queue id: {reply!r}")
        message_id = found.group().decode()
        say(f"SMTP accepted the message: 250 {reply.decode()}")
    else:
        check(client.admin_key is not None,
              "neither smtpd nor an admin key: nothing can queue mail")
        status, _, body = client.call("POST", "/api/send-test", admin=True, body={
            "from": "alice@example.com", "to": "bob@example.net", "subject": subject})
        check(status == 200, f"POST /api/send-test answered {status}: {body}")
        message_id = body["message_id"]
        say(f"queued through POST /api/send-test: {message_id}")

    events = client.get_ok(f"/api/logs/messages?message_id={message_id}")
    check(any(e["event_type"] == "reception" for e in events["logs"]),
          f"no reception event for {message_id}: {events}")
    say("reception event listed by GET /api/logs/messages")

    if has_worker:
        wait_for(lambda: [m for m in sink.messages if f"Subject: {subject}" in m["data"]],
                 "the message to reach the sink")
        delivered = next(m for m in sink.messages if f"Subject: {subject}" in m["data"])
        check(delivered["to"] == ["bob@example.net"], f"sink got recipients {delivered['to']}")
        if has_smtpd:
            check("Received:" in delivered["data"], "no Received: header added by the listener")
        say(f"the sink received it (envelope {delivered['from']} -> {delivered['to']})")

        def delivery_event() -> dict[str, Any] | None:
            body = client.get_ok(f"/api/logs/messages?message_id={message_id}&event_type=delivery")
            return body["logs"][0] if body["logs"] else None

        event = wait_for(delivery_event, "the delivery event")
        check(event["recipient"] == "bob@example.net" and event["smtp_code"] == 250,
              f"delivery event: {event}")
        status, _, body = client.call("GET", f"/api/queue/message/{message_id}")
        check(status == 404 and body.get("code") == "MESSAGE_NOT_FOUND",
              f"the delivered message is still queued: {status} {body}")
        stats = client.get_ok("/api/queue/stats")
        check(stats["total"] == 0, f"queue not empty after delivery: {stats}")
        delivery = client.get_ok("/api/stats/delivery?timeScale=hour")
        check(delivery["total_delivered"] >= 1 and delivery["data"][0]["delivered"] >= 1,
              f"stats do not count the delivery: {delivery['total_delivered']}")
        say("REST: delivery event (250), message left the queue, queue stats 0, "
            f"stats total_delivered={delivery['total_delivered']}")

        if queue_ws and logs_ws:
            for action in ("queued", "delivered"):
                wait_for(lambda a=action: queue_ws.find(
                    lambda f: f.get("type") == "queue_event"
                    and f["data"].get("message_id") == message_id and f["data"].get("action") == a),
                    f"queue_event {action} on /api/queue/ws")
            for event_type in ("reception", "delivery"):
                wait_for(lambda t=event_type: logs_ws.find(
                    lambda f: f.get("type") == "message_event"
                    and f["data"].get("message_id") == message_id
                    and f["data"].get("event_type") == t),
                    f"message_event {event_type} on /api/logs/ws")
            say("WebSocket: queue_event queued+delivered and message_event reception+delivery")

    # System logs persisted by every process, and their JSON lines on stdout.
    status, _, logs = client.call("GET", "/api/logs?limit=1000")
    if status == 200:
        check(logs["count"] >= 1, "GET /api/logs is empty")
        say(f"GET /api/logs: {logs['count']} records")
    else:
        skip(f"GET /api/logs answered {status}: system log endpoint not checked")
    _check_json_logs(tmp, processes)
    _check_stream_location_and_access_log(tmp, client, streams)

    metrics = client.call("GET", "/metrics")
    check(metrics[0] == 200, f"GET /metrics through nginx answered {metrics[0]}")
    text = metrics[2]
    for state in ("pending", "deferred", "held", "failed"):
        check(metric_value(text, "elemta_queue_messages", state=state) is not None,
              f"no elemta_queue_messages{{state={state}}}")
        age = metric_value(text, "elemta_queue_oldest_message_age_seconds", state=state)
        check(age is not None,
              f"no oldest-age gauge for {state}")
    check(metric_value(text, "elemta_build_info") == 1, "no elemta_build_info")
    requests = metric_value(text, "elemta_http_request_duration_seconds_count",
                            endpoint="/api/health", method="GET", status="200")
    check(bool(requests), "HTTP request durations do not count /api/health")
    if has_worker:
        check((metric_value(text, "elemta_delivery_outcomes_total", outcome="delivered") or 0) >= 1,
              "elemta_delivery_outcomes_total{outcome=delivered} is 0")

        # The worker is another process: its observation reaches the API's scrape through
        # the shared PROMETHEUS_MULTIPROC_DIR (written right after the outcome commits).
        def latency_count() -> float:
            status, _, scraped = client.call("GET", "/metrics")
            check(status == 200, f"GET /metrics through nginx answered {status}")
            return metric_value(scraped, "elemta_delivery_latency_seconds_count") or 0

        latency = wait_for(latency_count, "elemta_delivery_latency_seconds_count >= 1 in /metrics")
        say(f"metrics: delivery latency histogram count {latency:.0f}")
    say("metrics through nginx: queue depth and age per state, outcomes, HTTP durations, "
        "build info")


def _check_json_logs(tmp: Path, processes: Processes) -> None:
    """Every stdout line of every Elemta process is JSON; the API's carry our request id."""
    for name in processes.children:
        if name == "nginx":
            continue
        lines = [line for line in (tmp / f"{name}.out").read_text().splitlines() if line.strip()]
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                raise Failed(f"{name} wrote a non-JSON line to stdout: {line[:200]}") from None
            check("level" in record and "message" in record, f"{name}: odd log line {line[:200]}")
        if name == "api":
            check(any(json.loads(line).get("request_id") == "e2e-probe-1" for line in lines),
                  "the API's logs do not carry the request id given through nginx")
    say("every process logs JSON lines to stdout; the API's carry the request id")


def _check_stream_location_and_access_log(tmp: Path, client: Client,
                                          streams: list[Stream]) -> None:
    """The WebSocket location forwards like the others; nginx logs no query (no ?api_key=)."""
    # A stream request refused before the upgrade (bad parameter) takes the WebSocket location
    # too, and unlike an upgraded one it gets a line in the API's access log to look at.
    status, headers, body = client.call("GET", "/api/queue/ws?since_event=bogus")
    check(status == 400, f"GET /api/queue/ws?since_event=bogus answered {status}: {body}")
    request_id = headers.get("X-Request-ID") or "-"

    def api_record() -> dict[str, Any] | None:
        for line in (tmp / "api.out").read_text().splitlines():
            record = json.loads(line) if line.startswith("{") else {}
            if record.get("path") == "/api/queue/ws" and record.get("request_id") == request_id:
                return record
        return None

    record = wait_for(api_record, "the API's access log line of the refused stream request")
    check(record.get("forwarded_for") == "127.0.0.1",
          f"X-Forwarded-For did not reach the API from the WebSocket location: {record}")
    access_log = tmp / "nginx-access.log"
    wait_for(lambda: f"rid={request_id}" in access_log.read_text(),
             "nginx's own request id to reach the API from the WebSocket location")
    # nginx logs an upgraded connection when it ends; the streams were opened with ?api_key=.
    for stream in streams:
        stream.close()
    if streams:
        wait_for(lambda: "GET /api/queue/ws HTTP" in access_log.read_text()
                 and "GET /api/logs/ws HTTP" in access_log.read_text(),
                 "nginx's access log lines of the closed streams")
    check("api_key" not in access_log.read_text(), "nginx's access log contains an api_key")
    say("nginx: the WebSocket location forwards X-Forwarded-For and X-Request-ID; "
        "its access log has no query strings (no api_key)")


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="elemta-e2e-"))
    os.chmod(tmp, 0o755)
    started = time.monotonic()
    try:
        run(tmp)
    except Failed as exc:
        say(f"FAILED: {exc}")
        return 1
    finally:
        if os.environ.get("ELEMTA_E2E_KEEP") == "1":
            say(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    summary = f"passed in {time.monotonic() - started:.1f}s"
    if SKIPPED:
        summary += f", {len(SKIPPED)} part(s) skipped:\n  - " + "\n  - ".join(SKIPPED)
    say(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())

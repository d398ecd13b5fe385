"""SMTP listener acceptance rate (API.md §13: >= 300 messages/s from a local client).

``flask smtpd`` runs as its own process, as in production, on a fresh database of each kind
(a temporary SQLite file; a PostgreSQL database created for the run and dropped after it).
Local clients (threads with smtplib, one persistent connection each) send ~1 KiB messages
with two recipients; every message counts only once its 250 (sent after the commit) is back,
and the suite checks afterwards that the database holds exactly the acknowledged messages.
The figures are messages accepted per second of wall-clock time: one connection sending one
message after the other (information: the latency of one acceptance), and CLIENTS connections
at once (the target).
"""

from __future__ import annotations

import os
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from email.message import EmailMessage
from typing import Any

import psycopg
import sqlalchemy as sa

from bench.common import Result, percentile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLASK = os.path.join(os.path.dirname(sys.executable), "flask")
PG_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
TARGET = 300.0
CLIENTS = int(os.environ.get("BENCH_SMTP_CLIENTS", "16"))
MESSAGES = {"small": 600, "full": 5000}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _message(n: int) -> bytes:
    msg = EmailMessage()
    msg["From"] = "bench@example.com"
    msg["To"] = "one@example.net, two@example.org"
    msg["Subject"] = f"Benchmark message {n}"
    msg.set_content("Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 16 + "\n")
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))


def _migrate(url: str, env: dict[str, str]) -> None:
    subprocess.run([FLASK, "db", "upgrade"], cwd=ROOT, env=env | {"ELEMTA_DATABASE_URL": url},
                   check=True, capture_output=True)


def _count_messages(url: str) -> int:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            query = sa.text("SELECT count(*) FROM messages WHERE origin = 'smtp'")
            return conn.execute(query).scalar_one()
    finally:
        engine.dispose()


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"flask smtpd exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.recv(512)  # the greeting: the listener is serving
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("flask smtpd did not start listening")


def _send_all(port: int, total: int, clients: int = CLIENTS) -> tuple[float, list[float], int]:
    """Send ``total`` messages over ``clients`` connections; (seconds, latencies ms, failures)."""
    payloads = [_message(n) for n in range(total)]
    latencies: list[float] = []
    failures = [0]
    lock = threading.Lock()
    start_line = threading.Barrier(clients + 1)

    def client(share: list[bytes]) -> None:
        mine: list[float] = []
        with smtplib.SMTP("127.0.0.1", port, local_hostname="bench.local", timeout=60) as smtp:
            smtp.ehlo()
            start_line.wait()
            for payload in share:
                began = time.perf_counter()
                try:
                    smtp.sendmail("bench@example.com", ["one@example.net", "two@example.org"],
                                  payload)
                except smtplib.SMTPException:
                    with lock:
                        failures[0] += 1
                    continue
                mine.append((time.perf_counter() - began) * 1000)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(payloads[i::clients],))
               for i in range(clients)]
    for thread in threads:
        thread.start()
    start_line.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    return time.perf_counter() - began, latencies, failures[0]


def _result(label: str, clients: int, total: int, seconds: float, latencies: list[float],
            failures: int, target: float | None) -> Result:
    return Result(
        name=f"SMTP acceptance, {label}, {clients} connection{'s' if clients > 1 else ''}",
        value=round((total - failures) / seconds, 1), unit="messages/s",
        target=target, higher_is_better=True,
        notes=f"{total} messages of ~1 KiB, 2 recipients each",
        extra={"p50_ms": round(statistics.median(latencies), 2),
               "p95_ms": round(percentile(latencies, 95), 2), "failed": failures})


def _measure(label: str, url: str, total: int) -> list[Result]:
    env = dict(os.environ)
    env.pop("ELEMTA_SMTP_LISTEN", None)
    env.update({"FLASK_APP": "wsgi.py", "ELEMTA_LOG_LEVEL": "info"})
    _migrate(url, env)
    port = _free_port()
    process = subprocess.Popen(
        [FLASK, "smtpd", "--listen", f"127.0.0.1:{port}"], cwd=ROOT,
        env=env | {"ELEMTA_DATABASE_URL": url}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    try:
        _wait_for_port(port, process)
        _send_all(port, 50)  # warm-up: connections, caches
        # One client sending one message after the other: the latency of one acceptance.
        serial = _send_all(port, total // 4, clients=1)
        # A relaying MTA's usual parallelism (Postfix: up to 20 per destination).
        cpu_before = _cpu_seconds(process.pid)
        parallel = _send_all(port, total)
        listener_cpu_ms = (_cpu_seconds(process.pid) - cpu_before) * 1000 / total
    finally:
        process.terminate()
        process.wait(timeout=60)
    expected = 50 + total // 4 + total - serial[2] - parallel[2]
    stored = _count_messages(url)
    if stored != expected:
        raise RuntimeError(f"{label}: {stored} messages stored, {expected} acknowledged")
    under_load = _result(label, CLIENTS, total, *parallel, target=TARGET)
    # CPU the listener process spent per message: the figure that does not depend on what
    # else the machine is doing (the client and the database share the same cores).
    under_load.extra["listener_cpu_ms_per_msg"] = round(listener_cpu_ms, 2)
    return [_result(label, 1, total // 4, *serial, target=None), under_load]


def _postgres_database(options: Any) -> tuple[str, str | None]:
    """(url, name of a database created for this run or None when one was given)."""
    given = getattr(options, "database_url", None) or os.environ.get("ELEMTA_BENCH_DATABASE_URL")
    if given:
        return given, None
    name = f"elemta_bench_smtpd_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin = sa.make_url(PG_SERVER).set(drivername="postgresql").render_as_string(False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return sa.make_url(PG_SERVER).set(database=name).render_as_string(False), name


def _drop(name: str) -> None:
    admin = sa.make_url(PG_SERVER).set(drivername="postgresql").render_as_string(False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def run(options: Any) -> list[Result]:
    total = MESSAGES[getattr(options, "scale", "small")]
    results = []
    with tempfile.TemporaryDirectory(prefix="elemta-bench-smtpd-") as tmp:
        results.extend(_measure("SQLite", f"sqlite:///{tmp}/bench.db", total))
    url, created = _postgres_database(options)
    try:
        results.extend(_measure("PostgreSQL", url, total))
    finally:
        if created:
            _drop(created)
    return results

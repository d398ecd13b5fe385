"""End-to-end delivery throughput (API.md §13: >= 300 messages/s): worker -> local SMTP sink.

For each backend (SQLite file, PostgreSQL) the suite queues N messages (one recipient each,
~1 KB, through the queue service's data model in bulk: queueing is not what is measured), starts
a counting aiosmtpd sink in its own process, and times ``Worker.run(once=True)`` - claim, SMTP
transaction over pooled connections (``ELEMTA_RELAY_HOST`` = the sink), outcome recording with
its event and rollup bump, the message leaving the queue - until the queue is empty. The
figure is messages delivered per second of wall time; the sink's own count confirms every
message arrived.

PostgreSQL: ``--database-url`` / ``ELEMTA_BENCH_DATABASE_URL``, else a fresh database on
``ELEMTA_BENCH_PG_SERVER`` (default 127.0.0.1:5432, user postgres), dropped afterwards.

``ELEMTA_BENCH_DELIVERY_POLICY=1`` adds a run on each backend under a default destination
policy whose limits never bind (8 shared connection slots, 1,000,000 messages a minute): the
cost of the policy checks themselves (a slot per connection, rate counters per message;
docs/DELIVERY.md, "Delivery control"). ``ELEMTA_BENCH_DELIVERY_ROUNDS=N`` (default 1) repeats
the pair N times per backend, alternating which goes first, and adds the medians of worker CPU
per message with and without the policy (the machine's load moves wall time by tens of
percent; CPU per message, same run, interleaved, is the comparison that holds).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa

from bench.common import Result, free_port, percentile, postgres_database

SIZES = {"small": 1000, "full": 10000}
TARGET = 300.0


def log(text: str) -> None:
    print(f"[delivery] {text}", file=sys.stderr, flush=True)


@contextmanager
def sink() -> Iterator[tuple[int, dict[str, int]]]:
    """A counting sink process; yields its port and, after exit, its counts."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "bench.sink", str(port)],
                               stdout=subprocess.PIPE, text=True,
                               cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert process.stdout is not None
    process.stdout.readline()  # "ready"
    counts: dict[str, int] = {}
    try:
        yield port, counts
    finally:
        process.terminate()
        out, _ = process.communicate(timeout=30)
        cpu, connections, messages, recipients = out.split()[-4:]
        counts.update(messages=int(messages), recipients=int(recipients),
                      connections=int(connections))
        counts["sink_cpu_s"] = float(cpu)  # type: ignore[assignment]


def queue_messages(app: Any, count: int) -> None:
    """Bulk-insert queued messages shaped exactly as ``accept_message`` makes them."""
    from app.extensions import db
    from app.models import Message, MessageContent, Recipient
    from app.queue.service import new_message_id
    from app.timeutil import utcnow
    from tests.helpers import raw_message

    raw = raw_message(subject="Benchmark") + b"x" * 700 + b"\r\n"
    now = utcnow()
    with app.app_context():
        for start in range(0, count, 1000):
            ids = [new_message_id() for _ in range(min(1000, count - start))]
            db.session.execute(sa.insert(Message), [
                {"id": i, "sender": "bench@example.com", "subject": "Benchmark", "size": len(raw),
                 "priority": 0, "queue_state": "pending", "attempts": 0, "origin": "api",
                 "created_at": now, "updated_at": now, "next_attempt_at": now} for i in ids])
            db.session.execute(sa.insert(MessageContent),
                               [{"message_id": i, "raw": raw} for i in ids])
            db.session.execute(sa.insert(Recipient), [
                {"message_id": i, "address": f"rcpt{n}@example.net", "domain": "example.net",
                 "status": "pending", "attempts": 0, "next_attempt_at": now}
                for n, i in enumerate(ids)])
            db.session.commit()
        db.session.remove()


POLICY = {"kind": "default", "max_connections": 8, "messages_per_minute": 1_000_000}


def measure(url: str, count: int, label: str, policy: dict[str, Any] | None = None) -> Result:
    from flask_migrate import upgrade

    from app import create_app
    from app.delivery.worker import Worker
    from app.extensions import db
    from app.models import Message

    with sink() as (port, counts):
        app = create_app({"DATABASE_URL": url, "RELAY_HOST": f"127.0.0.1:{port}",
                          "LOG_LEVEL": "warning"})
        with app.app_context():
            upgrade()
            if policy:
                from app.control.policies import create_policy
                create_policy(db.session, policy, "bench")
                db.session.remove()
        queue_messages(app, count)
        log(f"{label}: {count} messages queued; delivering")
        worker = Worker(app)
        control_cpu = _time_control(worker)
        start, cpu_start = time.perf_counter(), time.process_time()
        worker.run(once=True)
        elapsed = time.perf_counter() - start
        worker_cpu = time.process_time() - cpu_start
        with app.app_context():
            left = db.session.scalar(sa.select(sa.func.count()).select_from(Message))
            db.session.remove()
            db.engine.dispose()
    rate = count / elapsed
    log(f"{label}: {rate:.0f} messages/s ({elapsed:.2f} s, worker CPU {worker_cpu:.2f} s), "
        f"sink got {counts}, left {left}")
    return Result(name=f"end-to-end delivery, {label}", value=round(rate, 1), unit="messages/s",
                  target=TARGET, higher_is_better=True,
                  notes=f"{count} messages, concurrency {app.config['WORKER_CONCURRENCY']}, "
                        f"relay to the sink with connection reuse",
                  extra={"seconds": round(elapsed, 2), "sink_messages": counts.get("messages"),
                         "smtp_connections": counts.get("connections"),
                         "left_in_queue": left,
                         "worker_cpu_ms_per_msg": round(1000 * worker_cpu / count, 2),
                         "control_cpu_ms_per_msg": round(1000 * sum(control_cpu) / count, 3),
                         "sink_cpu_ms_per_msg": round(1000 * counts["sink_cpu_s"] / count, 2),
                         "load_avg_1m": round(os.getloadavg()[0], 1)})


CONTROL_CALLS = ("needs_hosts", "limits_for", "admit", "refund", "slot_busy", "take_slot",
                 "give_slot", "observe", "housekeeping", "close")


def _time_control(worker: Any) -> list[float]:
    """The CPU time of the worker's delivery-control calls (``control/gate.py``: policy
    lookup, admission, rate reservations, connection slots, backoff, housekeeping), per
    thread (``time.thread_time``), summed: the policy checks themselves, apart from the rest
    of the worker. Wraps the calls on this worker's instance only."""
    spent: list[float] = []
    control = worker.control
    for name in CONTROL_CALLS:
        call = getattr(control, name)

        def timed(*args: Any, _call: Any = call, **kwargs: Any) -> Any:
            begun = time.thread_time()
            try:
                return _call(*args, **kwargs)
            finally:
                spent.append(time.thread_time() - begun)  # list.append is thread-safe

        setattr(control, name, timed)
    return spent


def run(options: Any) -> list[Result]:
    count = SIZES[getattr(options, "scale", "small")]
    results = []
    policies: list[tuple[str, dict[str, Any] | None]] = [("", None)]
    if os.environ.get("ELEMTA_BENCH_DELIVERY_POLICY"):
        policies.append((", default policy", POLICY))
    rounds = max(1, int(os.environ.get("ELEMTA_BENCH_DELIVERY_ROUNDS", "1")))
    given = getattr(options, "database_url", None) or os.environ.get("ELEMTA_BENCH_DATABASE_URL")
    cpu: dict[tuple[str, str], list[float]] = {}
    control: dict[tuple[str, str], list[float]] = {}
    for n in range(rounds):
        for suffix, policy in policies if n % 2 == 0 else policies[::-1]:
            for backend in ("SQLite", "PostgreSQL"):
                if backend == "SQLite":
                    with tempfile.TemporaryDirectory() as tmp:
                        result = measure(f"sqlite:///{tmp}/bench.db", count, backend + suffix,
                                         policy)
                else:
                    with postgres_database(given, "delivery") as url:
                        result = measure(url, count, backend + suffix, policy)
                results.append(result)
                cpu.setdefault((backend, suffix), []).append(
                    result.extra["worker_cpu_ms_per_msg"])
                control.setdefault((backend, suffix), []).append(
                    result.extra["control_cpu_ms_per_msg"])
    if len(policies) > 1:
        for backend in ("SQLite", "PostgreSQL"):
            without, with_policy = (percentile(cpu[(backend, s)], 50) for s, _ in policies)
            checks = percentile(control[(backend, policies[1][0])], 50) - percentile(
                control[(backend, "")], 50)
            results.append(Result(
                name=f"policy checks' own CPU per message, share of the worker's, {backend}",
                value=round(100 * checks / without, 1), unit="%", target=5.0,
                notes=f"delivery-control calls timed per thread: median {checks:.3f} ms more "
                      f"per message with the policy than without; worker {without:.2f} ms",
                extra={"with": control[(backend, policies[1][0])],
                       "without": control[(backend, "")]}))
            results.append(Result(
                name=f"worker CPU per message with a policy / without, {backend}",
                value=round(100 * with_policy / without, 1), unit="%",
                notes=f"medians of {rounds} interleaved round(s): {with_policy:.2f} vs "
                      f"{without:.2f} ms", extra={"with": cpu[(backend, policies[1][0])],
                                                  "without": cpu[(backend, "")],
                                                  "load_avg_1m": round(os.getloadavg()[0], 1)}))
    return results

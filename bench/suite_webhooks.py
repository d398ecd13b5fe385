"""What an active webhook to a slow receiver costs mail delivery (issue 16: "a slow or dead
receiver never slows mail delivery").

For each backend: the delivery measurement of ``suite_delivery`` (N queued messages, worker ->
counting sink), alternately without any webhook and with one webhook subscribed to every event
type, pointed at a receiver that takes ``RECEIVER_DELAY`` seconds per request, with the
dispatcher (``flask webhook dispatch``) running in its own process throughout, as in
production. The figure is the median delivery rate with the webhook over the median without
(1.0: no cost). The dispatcher's queued and sent counts show it was busy meanwhile.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa

from bench.common import Result, free_port, postgres_database
from bench.suite_delivery import queue_messages, sink

# small: 1000 messages a delivery still takes 2-4 s here, long enough for the dispatcher to
# compete with the worker; 12 of them (3 rounds, with and without, two databases).
SIZES = {"small": 1000, "full": 10000}
ROUNDS = 3
DISPATCHER_START = 3.0  # seconds for the dispatcher to import and start before timing begins
RECEIVER_DELAY = 0.5
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TYPES = ["queued", "delivered", "deferred", "failed", "bounced", "held", "released", "deleted"]


def log(text: str) -> None:
    print(f"[webhooks] {text}", file=sys.stderr, flush=True)


@contextmanager
def slow_receiver() -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "bench.slow_receiver", str(port),
                                str(RECEIVER_DELAY)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert process.stdout is not None
    process.stdout.readline()  # "ready"
    try:
        yield f"http://127.0.0.1:{port}/hook"
    finally:
        process.terminate()
        process.communicate(timeout=30)


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a live process (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def dispatcher(url: str) -> Iterator[dict[str, float]]:
    """The dispatcher process, started (and idle) before the caller times anything; yields a
    dict that holds its CPU seconds spent inside the block once the block ends."""
    env = {**os.environ, "ELEMTA_DATABASE_URL": url, "ELEMTA_LOG_LEVEL": "warning",
           "FLASK_APP": "wsgi.py"}
    process = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "flask"),
                                "webhook", "dispatch"], cwd=ROOT, env=env)
    time.sleep(DISPATCHER_START)
    usage = {"start": cpu_seconds(process.pid)}
    try:
        yield usage
    finally:
        usage["cpu_s"] = cpu_seconds(process.pid) - usage["start"]
        process.terminate()
        process.wait(timeout=60)


def deliver(app: Any, count: int) -> float:
    from app.delivery.worker import Worker

    queue_messages(app, count)
    worker = Worker(app)
    start = time.perf_counter()
    worker.run(once=True)
    return count / (time.perf_counter() - start)


def webhook_counts(app: Any) -> tuple[int, int]:
    from app.extensions import db
    from app.models import WebhookDelivery

    with app.app_context():
        queued = db.session.scalar(sa.select(sa.func.count()).select_from(WebhookDelivery))
        sent = db.session.scalar(sa.select(sa.func.count()).select_from(WebhookDelivery)
                                 .where(WebhookDelivery.status == "delivered"))
        db.session.remove()
    return int(queued or 0), int(sent or 0)


def measure(url: str, count: int, label: str) -> Result:
    from flask_migrate import upgrade

    from app import create_app
    from app.extensions import db
    from app.webhooks import service

    plain: list[float] = []
    hooked: list[float] = []
    activity: list[tuple[int, int]] = []
    dispatcher_cpu: list[float] = []
    with sink() as (port, _counts), slow_receiver() as receiver_url:
        app = create_app({"DATABASE_URL": url, "RELAY_HOST": f"127.0.0.1:{port}",
                          "LOG_LEVEL": "warning"})
        with app.app_context():
            upgrade()
        for _ in range(ROUNDS):
            plain.append(deliver(app, count))
            log(f"{label}: without webhook {plain[-1]:.0f} messages/s")
            with app.app_context():
                hook = service.create_webhook(db.session, receiver_url, TYPES).webhook.id
                db.session.remove()
            with dispatcher(url) as usage:
                hooked.append(deliver(app, count))
                activity.append(webhook_counts(app))
            dispatcher_cpu.append(round(usage["cpu_s"], 2))
            log(f"{label}: with a webhook to a {RECEIVER_DELAY}s receiver {hooked[-1]:.0f} "
                f"messages/s (dispatcher: {activity[-1][0]} queued, {activity[-1][1]} sent, "
                f"{dispatcher_cpu[-1]} s CPU during the run)")
            with app.app_context():
                service.delete_webhook(db.session, hook)
                db.session.remove()
        with app.app_context():
            db.engine.dispose()
    ratio = statistics.median(hooked) / statistics.median(plain)
    return Result(name=f"delivery with / without a webhook to a slow receiver, {label}",
                  value=round(ratio, 2), unit="ratio", target=0.9, higher_is_better=True,
                  notes=f"{count} messages x {ROUNDS} rounds each, alternating; receiver "
                        f"{RECEIVER_DELAY}s per request; dispatcher in its own process",
                  extra={"without_msgs_per_s": [round(r) for r in plain],
                         "with_msgs_per_s": [round(r) for r in hooked],
                         "webhook_queued_sent": activity,
                         "dispatcher_cpu_s": dispatcher_cpu,
                         "load_avg_1m": round(os.getloadavg()[0], 1)})


def run(options: Any) -> list[Result]:
    count = SIZES[getattr(options, "scale", "small")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        results.append(measure(f"sqlite:///{tmp}/bench.db", count, "SQLite"))
    given = getattr(options, "database_url", None) or os.environ.get("ELEMTA_BENCH_DATABASE_URL")
    with postgres_database(given, "webhooks") as url:
        results.append(measure(url, count, "PostgreSQL"))
    return results

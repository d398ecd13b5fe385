"""Read paths at scale: delivery stats, queue stats and pages, message events (API.md §13).

Data: ``flask demo seed`` machinery (``seed_history`` + ``seed_messages``) on PostgreSQL.
``--scale full``: 10 million history events over a year and 1 million queued messages (whose
own receptions and outcomes add about 2 million recent events). ``--scale small``: 50 000 events
and 15 000 messages, 30 calls a figure, to check the machinery in seconds.

Every figure is the latency of a request through the Flask test client (the whole Flask stack,
auth check, rate limiter, marshmallow dump, JSON; no HTTP socket, no gunicorn), p95 over
``REPEAT`` calls after a warm-up. The raw ``GROUP BY`` over ``delivery_events`` is the same
window computed the way the endpoint must not, for comparison (service-level, fewer calls).

Without ``--database-url`` (or ``ELEMTA_BENCH_DATABASE_URL``) the suite creates a PostgreSQL
database with a unique name on ``ELEMTA_BENCH_PG_SERVER`` (default 127.0.0.1:5432, user
postgres) and drops it at the end. With a URL it uses that database and seeds it only when it
holds less than the scale's data (so a full run can be measured again without reseeding).
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import sqlalchemy as sa
from flask import Flask

from bench.common import Result, latency_results, time_calls

SIZES = {"small": {"events": 50_000, "messages": 15_000, "repeat": 30, "raw_repeat": 5},
         "full": {"events": 10_000_000, "messages": 1_000_000, "repeat": 200, "raw_repeat": 5}}
TARGETS = {"stats": 50.0, "queue_stats": 10.0, "queue_page": 25.0, "logs": 25.0,
           "domains": 50.0, "queue_shape": 50.0}
DEFAULT_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def log(text: str) -> None:
    print(f"[reads] {text}", file=sys.stderr, flush=True)


def _admin_dsn(url: str, dbname: str) -> str:
    return sa.make_url(url).set(drivername="postgresql", database=dbname).render_as_string(
        hide_password=False)


@contextmanager
def benchmark_database(given: str | None) -> Iterator[tuple[str, bool]]:
    """(url, created): the given database, or a fresh migrated one dropped afterwards."""
    if given:
        yield given, False
        return
    server = os.environ.get("ELEMTA_BENCH_PG_SERVER", DEFAULT_SERVER)
    name = f"elemta_bench_reads_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(_admin_dsn(server, "postgres"), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = sa.make_url(server).set(database=name).render_as_string(hide_password=False)
    log(f"created database {name}")
    try:
        yield url, True
    finally:
        with psycopg.connect(_admin_dsn(server, "postgres"), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        log(f"dropped database {name}")


def make_app(url: str) -> Flask:
    from app import create_app

    # Reads are open in the default auth mode; the budget is raised so that the benchmark's
    # thousands of requests from one client measure the endpoint, not the 429.
    return create_app({"DATABASE_URL": url, "RATELIMIT_DEFAULT": "100000000 per minute"})


def migrate(app: Flask) -> None:
    from flask_migrate import upgrade

    with app.app_context():
        upgrade()


def estimated_rows(session: Any, table: str) -> int:
    count = session.scalar(sa.text("SELECT reltuples::bigint FROM pg_class WHERE relname = :t"),
                           {"t": table})
    return max(0, int(count or 0))


def seed(app: Flask, url: str, sizes: dict[str, int]) -> dict[str, float]:
    """Seed through the demo machinery unless the database already holds the data."""
    from app.demo.history import seed_history
    from app.demo.messages import seed_messages
    from app.extensions import db

    took: dict[str, float] = {}
    with app.app_context():
        session = db.session
        session.execute(sa.text("ANALYZE delivery_events"))
        session.execute(sa.text("ANALYZE messages"))
        session.commit()
        if estimated_rows(session, "delivery_events") < 0.9 * sizes["events"]:
            log(f"seeding {sizes['events']} history events ...")
            start = time.perf_counter()
            seed_history(session, sizes["events"], seed=1,
                         progress=lambda done, total: log(f"  events {done}/{total}"))
            took["seed_events_s"] = round(time.perf_counter() - start, 1)
            log(f"  done in {took['seed_events_s']} s")
        if estimated_rows(session, "messages") < 0.9 * sizes["messages"]:
            log(f"seeding {sizes['messages']} queued messages ...")
            start = time.perf_counter()
            seed_messages(session, sizes["messages"], seed=1)
            took["seed_messages_s"] = round(time.perf_counter() - start, 1)
            log(f"  done in {took['seed_messages_s']} s")
        db.session.remove()
    if took:
        # A steady-state database has been vacuumed: visibility map set (index-only scans),
        # statistics fresh. VACUUM cannot run in a transaction, hence autocommit.
        start = time.perf_counter()
        dsn = sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("VACUUM (ANALYZE) delivery_events, messages, recipients, "
                         "message_contents, queue_shape_counts, queue_shape_deltas")
        took["vacuum_s"] = round(time.perf_counter() - start, 1)
    return took


def getter(client: Any, url: str) -> Callable[[], Any]:
    def call() -> Any:
        response = client.get(url)
        if response.status_code != 200:
            body = response.get_data(as_text=True)[:200]
            raise RuntimeError(f"GET {url}: {response.status_code} {body}")
        return response

    return call


def deep_cursor(app: Flask, queue_type: str) -> str | None:
    """A cursor half-way through a queue listing, as a client paging deep would hold."""
    from app.extensions import db
    from app.models import Message
    from app.queue.service import encode_cursor

    with app.app_context():
        query = sa.select(Message)
        if queue_type != "all":
            query = query.where(Message.queue_state == queue_type)
        total = db.session.scalar(sa.select(sa.func.count()).select_from(query.subquery()))
        message = db.session.scalar(query.order_by(Message.created_at, Message.id)
                                    .offset(max(0, (total or 0) // 2)).limit(1))
        cursor = encode_cursor(message) if message else None
        db.session.remove()
    return cursor


def raw_group_by(app: Flask, scale: str) -> Callable[[], Any]:
    """The window by GROUP BY over the raw events (what the endpoint must not do)."""
    from app.events import outcome_of_event_type, outcome_rows
    from app.extensions import db
    from app.models import DeliveryEvent
    from app.sqltypes import time_bucket
    from app.stats.service import SCALES, bucket_shift, bucket_starts
    from app.timeutil import utcnow

    def call() -> Any:
        with app.app_context():
            starts = bucket_starts(SCALES[scale], utcnow())
            until = bucket_shift(SCALES[scale].unit, starts[0], 1)
            bucket = time_bucket(SCALES[scale].unit, DeliveryEvent.timestamp)
            outcome = outcome_of_event_type()
            rows = db.session.execute(
                sa.select(bucket, outcome, sa.func.count())
                .where(*outcome_rows(), DeliveryEvent.timestamp >= starts[-1],
                       DeliveryEvent.timestamp < until)
                .group_by(bucket, outcome)).all()
            db.session.remove()
            return rows

    return call


def logs_messages(app: Flask, client: Any, event_type: str | None) -> tuple[Callable[[], Any], str]:
    """/api/logs/messages newest 100, or its query through app code when the route is missing."""
    url = "/api/logs/messages?limit=100" + (f"&event_type={event_type}" if event_type else "")
    if any(rule.rule == "/api/logs/messages" for rule in app.url_map.iter_rules()):
        return getter(client, url), "GET " + url
    from app.extensions import db
    from app.logs.schemas import MessageEventSchema
    from app.models import DeliveryEvent

    schema = MessageEventSchema(many=True)

    def call() -> Any:
        with app.app_context():
            query = sa.select(DeliveryEvent).order_by(DeliveryEvent.id.desc()).limit(100)
            if event_type:
                query = query.where(DeliveryEvent.event_type == event_type)
            data = schema.dump(db.session.scalars(query))
            db.session.remove()
            return data

    return call, "route missing: same query + MessageEventSchema dump through app code"


def measure_shape(app: Flask, client: Any, repeat: int, raw_repeat: int) -> list[Result]:
    """``/api/queue/shape`` (kept counts, docs/QUEUE_SHAPE.md) and the direct GROUP BY it
    replaces; the two must agree (checked here on the data measured)."""
    from app.extensions import db
    from app.queue import shape
    from app.timeutil import utcnow

    results: list[Result] = []
    with app.app_context():
        shape.fold(db.session)  # as the worker would have (every 5 s)
        now = utcnow()
        for by in ("domain", "sender_domain"):
            kept = shape.read_shape(db.session, "all", by, top=1000, now=now)
            direct = shape.direct_shape(db.session, "all", by, now)
            if {row.domain: row.buckets for row in kept.rows} != direct:
                raise AssertionError(f"queue shape by {by} differs from the direct GROUP BY")
        db.session.remove()
    for queue, by in (("all", "domain"), ("deferred", "domain"), ("all", "sender_domain")):
        samples = time_calls(getter(client, f"/api/queue/shape?queue={queue}&by={by}"), repeat)
        results.append(latency_results(f"GET /api/queue/shape?queue={queue}&by={by}", samples,
                                       TARGETS["queue_shape"],
                                       notes="equal to the direct GROUP BY (checked)"))

    def direct(queue: str, by: str) -> Callable[[], Any]:
        def call() -> Any:
            with app.app_context():
                found = shape.direct_shape(db.session, queue, by, utcnow())
                db.session.remove()
            return found
        return call

    for queue, by in (("all", "domain"), ("deferred", "domain")):
        samples = time_calls(direct(queue, by), raw_repeat, warmup=1)
        results.append(latency_results(f"direct GROUP BY queue shape, queue={queue} by={by}",
                                       samples, None,
                                       notes="comparison only; not how the API computes"))
    return results


def run(options: Any) -> list[Result]:
    sizes = SIZES[options.scale]
    given = options.database_url or os.environ.get("ELEMTA_BENCH_DATABASE_URL")
    results: list[Result] = []
    with benchmark_database(given) as (url, created):
        app = make_app(url)
        try:
            if created:
                migrate(app)
            took = seed(app, url, sizes)
            results.extend(measure(app, sizes, took))
        finally:
            from app.extensions import db

            with app.app_context():
                db.session.remove()
                db.engine.dispose()
    return results


def measure_domains(client: Any, repeat: int) -> list[Result]:
    """Per-domain statistics (docs/STATS.md): the domains' window, one domain's buckets with
    its recent errors (a partial index), a rare failure class in the event listing."""
    results = []
    for scale in ("hour", "day", "week", "month"):
        samples = time_calls(getter(client, f"/api/stats/domains?timeScale={scale}"), repeat)
        results.append(latency_results(f"GET /api/stats/domains?timeScale={scale}", samples,
                                       TARGETS["domains"]))
    for scale in ("hour", "month"):
        url = f"/api/stats/delivery?timeScale={scale}&domain=example.com"
        samples = time_calls(getter(client, url), repeat)
        results.append(latency_results(f"GET {url}", samples, TARGETS["stats"]))
    url = "/api/logs/messages?limit=100&failure_class=spam"
    samples = time_calls(getter(client, url), repeat)
    results.append(latency_results(f"GET {url}", samples, TARGETS["logs"]))
    return results


def measure(app: Flask, sizes: dict[str, int], took: dict[str, float]) -> list[Result]:
    from app.extensions import db

    client = app.test_client()
    repeat = sizes["repeat"]
    results: list[Result] = []
    with app.app_context():
        events = estimated_rows(db.session, "delivery_events")
        messages = estimated_rows(db.session, "messages")
        db.session.remove()
    data = f"~{events:,} events, ~{messages:,} messages (pg_class estimate)"
    log(data)
    if took:
        results.append(Result("seeding (demo seed machinery)", sum(took.values()), "s",
                              notes=", ".join(f"{k} {v}" for k, v in took.items())))

    for scale in ("hour", "day", "week", "month"):
        samples = time_calls(getter(client, f"/api/stats/delivery?timeScale={scale}"), repeat)
        results.append(latency_results(f"GET /api/stats/delivery?timeScale={scale}", samples,
                                       TARGETS["stats"], notes=data))
    results.extend(measure_domains(client, repeat))
    for scale in ("hour", "day", "week", "month"):
        samples = time_calls(raw_group_by(app, scale), sizes["raw_repeat"], warmup=1)
        results.append(latency_results(f"raw GROUP BY delivery_events, {scale} window", samples,
                                       None, notes="comparison only; not how the API computes"))

    samples = time_calls(getter(client, "/api/queue/stats"), repeat)
    results.append(latency_results("GET /api/queue/stats", samples, TARGETS["queue_stats"]))
    for queue_type in ("pending", "deferred", "held", "failed", "all"):
        samples = time_calls(getter(client, f"/api/queue/{queue_type}?limit=100"), repeat)
        results.append(latency_results(f"GET /api/queue/{queue_type} first page", samples,
                                       TARGETS["queue_page"]))
        cursor = deep_cursor(app, queue_type)
        if cursor:
            samples = time_calls(
                getter(client, f"/api/queue/{queue_type}?limit=100&cursor={cursor}"), repeat)
            results.append(latency_results(f"GET /api/queue/{queue_type} deep page (cursor)",
                                           samples, TARGETS["queue_page"],
                                           notes="cursor half-way through the queue"))
    samples = time_calls(getter(client, "/api/queue/deferred?limit=100&domain=example.com"),
                         max(10, repeat // 4))
    results.append(latency_results("GET /api/queue/deferred?domain=example.com (filtered)",
                                   samples, None, notes="info: filtered total is a real count"))

    results.extend(measure_shape(app, client, repeat, sizes["raw_repeat"]))

    for event_type in (None, "delivery", "rejection"):
        call, how = logs_messages(app, client, event_type)
        samples = time_calls(call, repeat)
        label = f"/api/logs/messages newest 100{', event_type=' + event_type if event_type else ''}"
        results.append(latency_results(label, samples, TARGETS["logs"], notes=how))
    return results

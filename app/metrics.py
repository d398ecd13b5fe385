"""Prometheus metrics at ``/metrics`` (API.md §5), correct under several gunicorn workers.

Two kinds of figures:

* Per-process observations (HTTP request durations, delivery latency) are prometheus_client
  metrics. Under gunicorn, ``gunicorn.conf.py`` sets ``PROMETHEUS_MULTIPROC_DIR`` before any
  worker starts; every process then writes its values to a file there and a scrape merges the
  files of all processes, so whichever worker answers the scrape reports the sum.
* Figures about shared state (queue depth and oldest message age per state, delivery outcomes,
  worker heartbeat age) are read from the database at scrape time by ``DatabaseCollector``, so
  they are right whatever process or host changed them. The queries are cheap: the folded
  queue counters, one indexed ``MIN(created_at)`` per state, the hourly rollup totals.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import os
import platform
import time
from collections.abc import Iterable, Iterator

import sqlalchemy.orm as so
from flask import Flask, Response, current_app, g, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    values,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from .control.state import destination_states
from .database import unit_of_work
from .delivery.maintenance import newest_heartbeat
from .errors import is_database_unavailable
from .models import QUEUE_STATES
from .queue.counters import queue_counts
from .queue.service import oldest_per_state
from .stats.service import outcome_totals
from .timeutil import utcnow
from .version import __version__
from .webhooks.service import dispatcher_backlog

log = logging.getLogger("elemta.metrics")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


@functools.cache
def multiprocess_dir() -> str | None:
    """This process's usable ``PROMETHEUS_MULTIPROC_DIR``, or None: metrics of its own only.

    prometheus_client picks its value storage when it is imported, from the environment; a
    directory that cannot be written would make every process crash at its first metric, and a
    delivery worker may start before the API that usually creates it. So the directory is
    checked (and created) before the first metric exists; an unusable one falls back to
    per-process values, loudly, without touching the environment.
    """
    path = os.environ.get(MULTIPROC_ENV)
    if not path:
        return None
    try:
        os.makedirs(path, exist_ok=True)
        usable = os.access(path, os.W_OK | os.X_OK)
    except OSError:
        usable = False
    if usable:
        return path
    log.warning("PROMETHEUS_MULTIPROC_DIR=%s is not writable: metrics of this process are "
                "its own only", path)
    values.ValueClass = values.MutexValue  # what prometheus_client picks without the variable
    return None


@functools.cache
def _histograms() -> tuple[Histogram, Histogram]:
    """(HTTP request durations, delivery latency), made on first use (``multiprocess_dir``)."""
    multiprocess_dir()
    return (
        Histogram(
            "elemta_http_request_duration_seconds",
            "HTTP request duration by endpoint (URL rule), method and status",
            ["endpoint", "method", "status"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
        ),
        Histogram(
            "elemta_delivery_latency_seconds",
            "Time from acceptance into the queue to delivery, per delivered recipient",
            buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 10800, 43200, 86400, 432000),
        ),
    )


def observe_delivery_latency(seconds: float) -> None:
    """Record one delivered recipient's time in the queue (called by the delivery worker).

    Visible in the API's ``/metrics`` when the worker runs on the same host with the same
    ``PROMETHEUS_MULTIPROC_DIR`` as gunicorn (see docs/OPERATIONS.md).
    """
    _histograms()[1].observe(max(0.0, float(seconds)))


@functools.cache
def _webhook_metrics() -> tuple[Counter, Counter, Gauge]:
    """(attempts by result, deliveries given up, last success time) of the webhook dispatcher,
    made on first use in the dispatcher process."""
    multiprocess_dir()
    return (
        Counter("elemta_webhook_attempts", "Webhook requests made, by result "
                "(success: a 2xx answer; failure: any other answer, or none)", ["result"]),
        Counter("elemta_webhook_deliveries_failed",
                "Webhook deliveries given up at the end of their retry window"),
        Gauge("elemta_webhook_last_success_timestamp_seconds",
              "When a webhook request last succeeded (Unix time)", multiprocess_mode="max"),
    )


def observe_webhook_attempt(*, succeeded: bool, gave_up: bool) -> None:
    """Count one webhook request (called by ``flask webhook dispatch`` as it records it).

    Visible in the API's ``/metrics`` when the dispatcher runs on the same host with the same
    ``PROMETHEUS_MULTIPROC_DIR`` as gunicorn, as the delivery latency (docs/OPERATIONS.md).
    """
    attempts, failed, last_success = _webhook_metrics()
    attempts.labels("success" if succeeded else "failure").inc()
    if succeeded:
        last_success.set(time.time())
    if gave_up:
        failed.inc()


class DatabaseCollector(Collector):
    """Queue, outcome and worker figures read from the database at scrape time."""

    def __init__(self, app: Flask) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        build = GaugeMetricFamily("elemta_build_info", "Elemta build information",
                                  labels=["version", "python_version"])
        build.add_metric([__version__, platform.python_version()], 1)
        yield build
        up = GaugeMetricFamily("elemta_database_up",
                               "1 when the database answered this scrape's queries")
        try:
            with unit_of_work(self.app) as session:
                figures = list(self._database_figures(session))
        except Exception as exc:
            if not is_database_unavailable(exc):
                raise
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from figures

    def _database_figures(self, session: so.Session) -> Iterator[Metric]:
        """Read through the services of the areas that own the figures."""
        now = utcnow()
        depth = GaugeMetricFamily("elemta_queue_messages", "Messages in the queue per state",
                                  labels=["state"])
        for state, n in queue_counts(session).items():
            if state in QUEUE_STATES:
                depth.add_metric([state], n)
        yield depth

        age = GaugeMetricFamily("elemta_queue_oldest_message_age_seconds",
                                "Age of the oldest message per queue state (0 when empty)",
                                labels=["state"])
        for state, created in oldest_per_state(session).items():
            age.add_metric([state], max(0.0, (now - created).total_seconds()) if created else 0.0)
        yield age

        outcomes = CounterMetricFamily(
            "elemta_delivery_outcomes", "Recipient delivery outcomes (from the hourly rollup)",
            labels=["outcome"])
        for outcome, count in outcome_totals(session).items():
            outcomes.add_metric([outcome], count)
        yield outcomes

        newest = newest_heartbeat(session)
        heartbeat = GaugeMetricFamily(
            "elemta_worker_heartbeat_age_seconds",
            "Seconds since the newest delivery worker heartbeat (absent without any worker)")
        if newest is not None:
            heartbeat.add_metric([], max(0.0, (now - newest).total_seconds()))
            yield heartbeat

        yield from _destination_figures(session, now)
        yield from _webhook_figures(session, now)


def _webhook_figures(session: so.Session, now: dt.datetime) -> Iterator[Metric]:
    """The webhook dispatcher's backlog and liveness (docs/WEBHOOKS.md)."""
    backlog = dispatcher_backlog(session)
    pending = GaugeMetricFamily("elemta_webhook_pending_deliveries",
                                "Webhook deliveries waiting to be sent (or retried), per webhook",
                                labels=["webhook"])
    for webhook_id, count in sorted(backlog.pending_by_webhook.items()):
        pending.add_metric([str(webhook_id)], count)
    yield pending
    newest = newest_heartbeat(session, dispatcher=True)
    if newest is not None:
        heartbeat = GaugeMetricFamily(
            "elemta_webhook_dispatcher_heartbeat_age_seconds",
            "Seconds since the webhook dispatcher's newest heartbeat (absent without one)")
        heartbeat.add_metric([], max(0.0, (now - newest).total_seconds()))
        yield heartbeat


def _destination_figures(session: so.Session, now: dt.datetime) -> Iterator[Metric]:
    """Delivery control (docs/DELIVERY.md): backoff and shared limits per destination."""
    level = GaugeMetricFamily("elemta_destination_backoff_level",
                              "Adaptive backoff level per destination (0: as its policy says)",
                              labels=["destination"])
    paused = GaugeMetricFamily("elemta_destination_paused",
                               "1 while a throttled destination is paused", labels=["destination"])
    throttles = CounterMetricFamily("elemta_destination_throttles",
                                    "Throttling replies that backed a destination off",
                                    labels=["destination"])
    connections = GaugeMetricFamily("elemta_destination_connections",
                                    "Connection slots in use per destination (shared limits)",
                                    labels=["destination"])
    for row in destination_states(session, now):
        name = [row["destination"]]
        level.add_metric(name, row["backoff_level"])
        paused.add_metric(name, 1 if row["paused_until"] else 0)
        throttles.add_metric(name, row["throttles"])
        connections.add_metric(name, row["connections"])
    yield from (level, paused, throttles, connections)


class _ProcessCollector(Collector):
    """This process's own metrics (single-process mode: dev server, tests, CLI)."""

    def collect(self) -> Iterable[Metric]:
        return REGISTRY.collect()


def render_metrics(app: Flask) -> bytes:
    """The Prometheus text exposition of everything above."""
    registry = CollectorRegistry(auto_describe=False)
    path = multiprocess_dir()
    if path:
        MultiProcessCollector(registry, path)
    else:
        registry.register(_ProcessCollector())
    registry.register(DatabaseCollector(app))
    return generate_latest(registry)


def _start_timer() -> None:
    # A WebSocket "request" lasts as long as the stream: not a request duration.
    environ = request._get_current_object().environ  # type: ignore[attr-defined]
    if environ.get("HTTP_UPGRADE", "").lower() != "websocket":
        g._get_current_object().metrics_started = time.perf_counter()


# The labelled histograms already used, by (endpoint, method, status): labels() checks and
# converts its arguments and takes a lock on every call to find the same child again. As many
# entries as prometheus_client keeps series itself.
_request_series: dict[tuple[str, str, int], Histogram] = {}


def _observe_request(response: Response) -> Response:
    started = g._get_current_object().__dict__.pop(
        "metrics_started", None)
    if started is not None:
        req = request._get_current_object()  # type: ignore[attr-defined]
        # The URL rule, not the path: one series per endpoint, whatever the ids in the URLs.
        rule = req.url_rule
        endpoint = rule.rule if rule is not None else "<unmatched>"
        key = (endpoint, req.method, response.status_code)
        series = _request_series.get(key)
        if series is None:
            series = _request_series.setdefault(
                key, _histograms()[0].labels(endpoint, req.method, str(key[2])))
        series.observe(time.perf_counter() - started)
    return response


def metrics_view() -> Response:
    # The app itself, not the proxy: Flask types current_app as Flask, not as a LocalProxy.
    return Response(render_metrics(current_app._get_current_object()),  # type: ignore[attr-defined]
                    content_type=CONTENT_TYPE_LATEST, headers={"Cache-Control": "no-store"})


def init_metrics(app: Flask) -> None:
    """Time every request (``/metrics`` itself is served by ``metrics_view``)."""
    _histograms()  # before the first request: an unusable metrics directory is reported now
    app.before_request(_start_timer)
    app.after_request(_observe_request)

"""What /api/health reports, gathered from this process and the database.

The process figures come from /proc when it exists (Linux), else from ``resource``. The database
figures are real queries: a ``SELECT 1`` timed for ``latency_ms``, the newest worker heartbeat,
and the queue counts.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import platform
import resource
import threading
import time
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
import sqlalchemy.orm as so

from ..delivery.maintenance import newest_heartbeat
from ..errors import is_database_unavailable, is_missing_schema
from ..queue.service import queue_stats
from ..timeutil import UTC, isoformat_z, utcnow
from ..webhooks.service import dispatcher_backlog

# A worker beats at least every 15 s (API.md §10); four missed beats make it stale.
HEARTBEAT_STALE_SECONDS = 60
# gunicorn.conf.py stores the master's start here, so every API worker reports the uptime of
# the service (not of a worker that was recycled a minute ago).
STARTED_AT_ENV = "ELEMTA_STARTED_AT"

_UNITS = (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1))


def format_uptime(seconds: float) -> str:
    """The two largest non-zero units: ``1 day``, ``2 days, 3 hours``, ``0 seconds``."""
    remaining = max(0, int(seconds))
    parts: list[str] = []
    for name, size in _UNITS:
        amount, remaining = divmod(remaining, size)
        if amount:
            parts.append(f"{amount} {name}{'' if amount == 1 else 's'}")
    return ", ".join(parts[:2]) or "0 seconds"


def _proc_start_time() -> dt.datetime | None:
    """This process's start from /proc (boot time + start ticks), None where unavailable."""
    try:
        with open("/proc/self/stat", encoding="ascii") as stat:
            # Field 22 (starttime); the command name (field 2) may contain spaces, skip past ')'.
            fields = stat.read().rpartition(")")[2].split()
        ticks = int(fields[19])
        with open("/proc/stat", encoding="ascii") as proc_stat:
            btime = next(int(line.split()[1]) for line in proc_stat if line.startswith("btime"))
        return dt.datetime.fromtimestamp(btime + ticks / os.sysconf("SC_CLK_TCK"), UTC)
    except (OSError, ValueError, IndexError, StopIteration):
        return None


@functools.cache
def service_started_at() -> dt.datetime:
    """The gunicorn master's start when there is one, else this process's start."""
    given = os.environ.get(STARTED_AT_ENV)
    if given:
        try:
            return dt.datetime.fromtimestamp(float(given), UTC)
        except ValueError:
            pass
    return _proc_start_time() or utcnow()


def _proc_status() -> dict[str, str]:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            return dict(line.rstrip("\n").split(":\t", 1) for line in status if ":\t" in line)
    except OSError:
        return {}


def _kib(value: str | None) -> int | None:
    if not value:
        return None
    try:
        return int(value.split()[0]) * 1024
    except (ValueError, IndexError):
        return None


def process_figures() -> dict[str, Any]:
    """Threads and memory of this process."""
    status = _proc_status()
    # ru_maxrss is KiB on Linux: the fallback where /proc is missing.
    peak_fallback = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rss = _kib(status.get("VmRSS")) or peak_fallback
    peak = _kib(status.get("VmHWM")) or peak_fallback
    try:
        threads = int(status["Threads"])
    except (KeyError, ValueError):
        threads = threading.active_count()
    return {
        "python_version": platform.python_version(),
        "num_threads": threads,
        "memory": {"rss": rss, "peak_rss": max(peak, rss)},
    }


def database_latency_ms(session: so.Session) -> float:
    """Time a ``SELECT 1`` round trip; raises when the database does not answer."""
    start = time.perf_counter()
    session.execute(sa.text("SELECT 1")).scalar_one()
    return round((time.perf_counter() - start) * 1000, 2)


def _heartbeat_status(newest: dt.datetime | None, now: dt.datetime) -> dict[str, Any]:
    """``running``: newest heartbeat at most 60 s old; ``stale``: older; else ``absent``."""
    if newest is None:
        return {"status": "absent", "last_heartbeat": None}
    age = (now - newest).total_seconds()
    status = "running" if age <= HEARTBEAT_STALE_SECONDS else "stale"
    return {"status": status, "last_heartbeat": isoformat_z(newest)}


def worker_status(session: so.Session, now: dt.datetime) -> dict[str, Any]:
    """The delivery workers: the newest heartbeat of any."""
    return _heartbeat_status(newest_heartbeat(session), now)


def dispatcher_status(session: so.Session, now: dt.datetime) -> dict[str, Any]:
    """The webhook dispatcher (``flask webhook dispatch``), as the workers, plus the
    deliveries waiting to be sent and whether any webhook is active (without one, no
    dispatcher is needed and its absence is no fault)."""
    backlog = dispatcher_backlog(session)
    return {**_heartbeat_status(newest_heartbeat(session, dispatcher=True), now),
            "pending": backlog.pending, "active_webhooks": backlog.active_webhooks}


def _dispatcher_degrades(dispatcher: dict[str, Any]) -> bool:
    return dispatcher["status"] == "stale" or (
        dispatcher["status"] == "absent" and dispatcher["active_webhooks"] > 0)


@dataclass
class HealthReport:
    body: dict[str, Any]

    @property
    def status(self) -> str:
        return str(self.body["status"])


def health_report(session: so.Session) -> HealthReport:
    """The health document; ``unhealthy`` (nulls for what needs the database) when it is down."""
    now = utcnow()
    started_at = service_started_at()
    uptime = max(0, int((now - started_at).total_seconds()))
    body: dict[str, Any] = {
        "status": "healthy",
        "uptime": uptime,
        "uptime_formatted": format_uptime(uptime),
        "started_at": isoformat_z(started_at),
        **process_figures(),
    }
    try:
        latency = database_latency_ms(session)
        worker = worker_status(session, now)
        dispatcher = dispatcher_status(session, now)
        queue = queue_stats(session)
        session.commit()  # end the read transaction; no connection is kept checked out
    except Exception as exc:
        _rollback_quietly(session)
        if not is_database_unavailable(exc):
            raise
        body.update(
            status="unhealthy",
            database={"status": "unavailable", "latency_ms": None},
            worker={"status": "unknown", "last_heartbeat": None},
            queue=None,
            webhook_dispatcher={"status": "unknown", "last_heartbeat": None, "pending": None,
                                "active_webhooks": None},
        )
        return HealthReport(body)
    healthy = worker["status"] == "running" and not _dispatcher_degrades(dispatcher)
    body.update(
        status="healthy" if healthy else "degraded",
        database={"status": "ok", "latency_ms": latency},
        worker=worker,
        queue=queue,
        webhook_dispatcher=dispatcher,
    )
    return HealthReport(body)


def readiness_problem(session: so.Session, migrations_dir: str) -> str | None:
    """Why this process cannot serve yet, or ``None`` when it can.

    Ready means the database answers *and* holds the schema this release was written for: an
    empty or half-upgraded database answers ``SELECT 1`` but fails every real request, and a
    load balancer must not send traffic there (README: ``flask db upgrade`` before start).
    """
    try:
        current = set(session.scalars(sa.text("SELECT version_num FROM alembic_version")))
        session.commit()
    except sa.exc.DBAPIError as exc:
        _rollback_quietly(session)
        if is_missing_schema(exc):
            return "The database has no schema (run flask db upgrade)"
        if is_database_unavailable(exc):
            return "The database does not answer"
        raise
    expected = expected_schema_heads(migrations_dir)
    if current != expected:
        return (f"The database schema is at {', '.join(sorted(current)) or 'nothing'}, this "
                f"release needs {', '.join(sorted(expected))} (run flask db upgrade)")
    return None


@functools.lru_cache(maxsize=4)
def expected_schema_heads(migrations_dir: str) -> set[str]:
    from alembic.script import ScriptDirectory  # only readiness needs it, once per process

    return set(ScriptDirectory(migrations_dir).get_heads())


def _rollback_quietly(session: so.Session) -> None:
    # The connection may be gone already; the pool drops it (pre-ping replaces it next time).
    try:
        session.rollback()
    except Exception:  # noqa: BLE001 - nothing left to undo on a dead connection
        pass

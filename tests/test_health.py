"""API.md §5: /api/health, /livez, /readyz, and recovery when the database comes back."""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import socket

import psycopg
import pytest
import sqlalchemy as sa

from app.health.service import format_uptime
from app.models import WorkerHeartbeat
from app.timeutil import isoformat_z, utcnow
from tests.conftest import scratch_postgresql_database
from tests.helpers import assert_error, queue_message

ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
DOCUMENT_KEYS = {"status", "uptime", "uptime_formatted", "started_at", "python_version",
                 "num_threads", "memory", "database", "worker", "queue", "webhook_dispatcher"}


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0 seconds"),
    (0.9, "0 seconds"),
    (1, "1 second"),
    (59, "59 seconds"),
    (60, "1 minute"),
    (5 * 60 + 3, "5 minutes, 3 seconds"),
    (3600, "1 hour"),
    (3600 + 60, "1 hour, 1 minute"),
    (2 * 3600 + 5 * 60 + 7, "2 hours, 5 minutes"),
    (86400, "1 day"),
    (2 * 86400 + 3 * 3600, "2 days, 3 hours"),
    (2 * 86400 + 3 * 3600 + 59 * 60 + 59, "2 days, 3 hours"),
    (86400 + 1, "1 day, 1 second"),
    (400 * 86400 + 60, "400 days, 1 minute"),
    (-5, "0 seconds"),
])
def test_uptime_formatted(seconds: float, text: str) -> None:
    assert format_uptime(seconds) == text


def _beat(session, age_seconds: float, worker_id: str = "w1") -> dt.datetime:
    now = utcnow().replace(microsecond=0)
    beat = now - dt.timedelta(seconds=age_seconds)
    session.merge(WorkerHeartbeat(worker_id=worker_id, hostname="host", pid=1,
                                  started_at=beat, last_heartbeat=beat))
    session.commit()
    return beat


def test_healthy_with_a_fresh_heartbeat(client, session) -> None:
    queue_message(session)
    queue_message(session, state="held")
    _beat(session, 600, "old-worker")
    beat = _beat(session, 5, "live-worker")

    response = client.get("/api/health")

    assert response.status_code == 200
    body = response.get_json()
    assert set(body) == DOCUMENT_KEYS
    assert body["status"] == "healthy"
    assert body["worker"] == {"status": "running", "last_heartbeat": isoformat_z(beat)}
    assert body["database"]["status"] == "ok"
    assert isinstance(body["database"]["latency_ms"], float) and body["database"]["latency_ms"] >= 0
    assert body["queue"] == {"pending": 1, "deferred": 0, "held": 1, "failed": 0, "total": 2}
    assert isinstance(body["uptime"], int) and body["uptime"] >= 0
    assert body["uptime_formatted"] == format_uptime(body["uptime"])
    assert ISO_Z.match(body["started_at"])
    started = dt.datetime.fromisoformat(body["started_at"].replace("Z", "+00:00"))
    assert started <= utcnow()
    assert re.match(r"^\d+\.\d+\.\d+", body["python_version"])
    assert body["num_threads"] >= 1
    assert body["memory"]["rss"] > 0 and body["memory"]["peak_rss"] >= body["memory"]["rss"]
    assert response.headers["Cache-Control"] == "no-store"


def test_degraded_without_any_worker(client) -> None:
    response = client.get("/api/health")
    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "degraded"
    assert body["worker"] == {"status": "absent", "last_heartbeat": None}
    assert body["database"]["status"] == "ok"


def test_degraded_when_the_newest_heartbeat_is_stale(client, session) -> None:
    beat = _beat(session, 61)
    body = client.get("/api/health").get_json()
    assert body["status"] == "degraded"
    assert body["worker"] == {"status": "stale", "last_heartbeat": isoformat_z(beat)}


def test_livez_and_readyz(client) -> None:
    live = client.get("/livez")
    assert live.status_code == 200 and live.get_json() == {"status": "alive"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.get_json() == {"status": "ready"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _unreachable_url(database_url: str, tmp_path) -> str:
    if database_url.startswith("sqlite"):
        return f"sqlite:///{tmp_path}/missing-directory/elemta.db"
    return f"postgresql+psycopg://postgres@127.0.0.1:{_free_port()}/nothing?connect_timeout=2"


def _assert_unhealthy(client) -> None:
    response = client.get("/api/health")
    assert response.status_code == 503
    body = response.get_json()
    assert set(body) == DOCUMENT_KEYS | {"error", "code", "details"}
    assert body["status"] == "unhealthy"
    assert body["code"] == "SERVICE_UNAVAILABLE" and body["error"] and body["details"] is None
    assert body["database"] == {"status": "unavailable", "latency_ms": None}
    assert body["worker"] == {"status": "unknown", "last_heartbeat": None}
    assert body["webhook_dispatcher"] == {"status": "unknown", "last_heartbeat": None,
                                          "pending": None, "active_webhooks": None}
    assert body["queue"] is None
    assert body["uptime_formatted"] == format_uptime(body["uptime"])
    assert_error(client.get("/readyz"), 503, "SERVICE_UNAVAILABLE")
    assert client.get("/livez").status_code == 200


def test_unhealthy_when_the_database_does_not_answer(make_app, database_url, tmp_path) -> None:
    app = make_app(database_url=_unreachable_url(database_url, tmp_path))
    _assert_unhealthy(app.test_client())


def test_recovers_without_restart_when_the_database_returns(make_app, database_url,
                                                            tmp_path) -> None:
    if database_url.startswith("sqlite"):
        recovered = _sqlite_outage_and_return(make_app, database_url, tmp_path)
    else:
        recovered = _postgresql_outage_and_return(make_app)
    # The health document of the same app (same pool) after the outage: no restart needed.
    assert recovered["database"]["status"] == "ok"


def _sqlite_outage_and_return(make_app, database_url, tmp_path):
    directory = tmp_path / "volume"
    app = make_app(database_url=f"sqlite:///{directory}/elemta.db")
    client = app.test_client()
    _assert_unhealthy(client)
    # The volume comes back (with a migrated database on it).
    os.makedirs(directory)
    shutil.copy(sa.make_url(database_url).database, directory / "elemta.db")
    assert client.get("/readyz").status_code == 200
    response = client.get("/api/health")
    assert response.status_code == 200
    assert response.get_json()["status"] in ("healthy", "degraded")
    return response.get_json()


def _postgresql_outage_and_return(make_app):
    with scratch_postgresql_database("elemta_health") as scratch:
        client = make_app(database_url=scratch.url).test_client()
        assert client.get("/api/health").status_code == 200  # the pool now holds connections

        # The database goes away: new connections refused, pooled ones killed.
        with psycopg.connect(scratch.admin, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{scratch.name}" ALLOW_CONNECTIONS false')
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE datname = %s", (scratch.name,))
        _assert_unhealthy(client)

        with psycopg.connect(scratch.admin, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{scratch.name}" ALLOW_CONNECTIONS true')
        assert client.get("/readyz").status_code == 200
        response = client.get("/api/health")
        assert response.status_code == 200
        assert response.get_json()["database"]["status"] == "ok"
        return response.get_json()


@pytest.fixture
def empty_database_url(database_url, tmp_path):
    """A database that answers but holds no schema (``flask db upgrade`` never ran)."""
    if database_url.startswith("sqlite"):
        yield f"sqlite:///{tmp_path}/never-migrated.db"
        return
    with scratch_postgresql_database("elemta_empty", migrate=False) as scratch:
        yield scratch.url


def test_not_ready_on_a_database_without_the_schema(make_app, empty_database_url) -> None:
    """A load balancer must not send traffic to a host whose database was never migrated."""
    client = make_app(database_url=empty_database_url).test_client()
    body = assert_error(client.get("/readyz"), 503, "SERVICE_UNAVAILABLE")
    assert "flask db upgrade" in body["error"]
    assert client.get("/api/health").get_json()["status"] == "unhealthy"
    assert_error(client.get("/api/queue/stats"), 503, "SERVICE_UNAVAILABLE")
    assert client.get("/livez").status_code == 200


def test_not_ready_when_the_schema_is_not_this_releases(make_app, empty_database_url) -> None:
    app = make_app(database_url=empty_database_url)
    engine = sa.create_engine(empty_database_url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)"))
        conn.execute(sa.text("INSERT INTO alembic_version VALUES ('0000old')"))
    engine.dispose()
    body = assert_error(app.test_client().get("/readyz"), 503, "SERVICE_UNAVAILABLE")
    assert "0000old" in body["error"] and "flask db upgrade" in body["error"]

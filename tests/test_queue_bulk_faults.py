"""Bulk actions under concurrency and database faults (issue 18).

Six clients doing bulk hold/release/retry while a worker delivers; a real deadlock, retried; a
bulk action stopped half-way by a failing statement, a cut connection or conflicts that outlast
the retries, which reports what it did. Faults are real database behaviour: locks taken by a
second connection, triggers that raise or terminate their own backend.
"""

from __future__ import annotations

import datetime as dt
import logging
import sqlite3
import threading
import time
from collections import Counter

import psycopg
import pytest
import sqlalchemy as sa
import sqlalchemy.exc as sa_exc

from app.database import describe_error, is_transient_conflict
from app.delivery.worker import Worker
from app.errors import is_database_unavailable
from app.extensions import db
from app.models import DeliveryEvent, Message
from app.queue.actions import BULK_CHUNK
from tests.delivery_helpers import Peer, assert_each_delivered_once, bulk_queue, run_worker
from tests.helpers import assert_error


def scalar(app, query):
    with app.app_context():
        value = db.session.scalar(query)
        db.session.remove()
        return value


def held(app) -> int:
    return scalar(app, sa.select(sa.func.count()).select_from(Message)
                  .where(Message.queue_state == "held"))


def counts_and_recount(client, app) -> tuple[dict[str, int], dict[str, int]]:
    """The counters' figures (/api/queue/stats) and a GROUP BY over the messages themselves."""
    with app.app_context():
        rows = db.session.execute(sa.select(Message.queue_state, sa.func.count())
                                  .group_by(Message.queue_state)).all()
        db.session.remove()
    recount = {"pending": 0, "deferred": 0, "held": 0, "failed": 0} | dict(rows)
    recount["total"] = sum(recount.values())
    return client.get("/api/queue/stats").get_json(), recount


# ------------------------------------------------------------------ concurrency

# What each of the six clients does, in turn: the mix of hold, release and retry.
CLIENT_SCRIPTS = [
    [("all", "hold"), ("held", "release")],
    [("pending", "hold"), ("held", "release")],
    [("all", "retry"), ("all", "hold")],
    [("held", "release"), ("deferred", "retry")],
    [("all", "hold"), ("all", "retry"), ("held", "release")],
    [("held", "release"), ("pending", "hold")],
]
ROUNDS = 4


@pytest.mark.slow
def test_six_bulk_clients_during_delivery_never_fail_and_lose_nothing(app, make_app,
                                                                      database_url):
    # Two chunks per action on PostgreSQL (locks of two transactions per request).
    count = BULK_CHUNK + 200 if database_url.startswith("postgresql") else 400
    api = make_app(ratelimit_enabled=False)  # six clients at full speed, not 10 a minute
    with Peer() as peer:
        bulk_queue(app, count)
        worker = Worker(make_app(relay_host=peer.address))
        delivering = threading.Thread(target=worker.run)
        statuses: list[int] = []  # list.append is atomic: the clients share these
        problems: list[str] = []

        def client(script):
            http = api.test_client()
            for round_ in range(ROUNDS):
                queue_type, action = script[round_ % len(script)]
                response = http.post(f"/api/queue/{queue_type}/{action}")
                statuses.append(response.status_code)
                if response.status_code != 200:
                    problems.append(response.get_data(as_text=True))

        clients = [threading.Thread(target=client, args=(script,)) for script in CLIENT_SCRIPTS]
        delivering.start()
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join(300)
        # On a loaded machine the six clients can finish before the worker's first batch is
        # recorded: let it record something before stopping it (no time limit is asserted).
        # Which client acts last is up to the scheduler; when it was a hold, every message is
        # held and the worker has nothing to deliver: release them (not counted in statuses).
        assert api.test_client().post("/api/queue/held/release").status_code == 200
        deadline = time.monotonic() + 60
        while worker.recorded_attempts == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        worker.stop()
        delivering.join(60)
        assert Counter(statuses) == {200: len(CLIENT_SCRIPTS) * ROUNDS}, problems
        assert worker.recorded_attempts > 0  # the worker delivered while the clients acted

        # Consistent while nothing moves: the counters agree with the messages themselves.
        stats, recount = counts_and_recount(api.test_client(), app)
        assert stats == recount
        # Nothing lost: release what is held, deliver the rest; each recipient exactly once.
        assert api.test_client().post("/api/queue/held/release").status_code == 200
        run_worker(make_app(relay_host=peer.address))
    assert_each_delivered_once(app, peer, count)
    assert scalar(app, sa.select(sa.func.count()).select_from(Message)) == 0
    stats, recount = counts_and_recount(api.test_client(), app)
    assert stats == recount == {"pending": 0, "deferred": 0, "held": 0, "failed": 0, "total": 0}


def test_a_real_deadlock_is_retried_and_the_action_completes(app, make_app, database_url,
                                                             caplog):
    """Another transaction holds the last message (in id order) and then asks for the first,
    which the bulk action holds while it waits for the last: a deadlock. PostgreSQL aborts
    the transaction whose check finds it, the bulk action's (it waited first); the bulk action
    runs its chunk again and answers 200 as if nothing happened."""
    if database_url.startswith("sqlite"):
        pytest.skip("SQLite locks the whole database: no deadlock between rows")
    ids = sorted(bulk_queue(app, 5))
    engine = sa.create_engine(database_url)
    api = make_app()
    result: dict = {}

    def bulk_hold():
        result["response"] = api.test_client().post("/api/queue/all/hold")

    try:
        with engine.connect() as other, engine.connect() as watcher:
            watcher.execution_options(isolation_level="AUTOCOMMIT")
            other.execute(sa.text("SELECT id FROM messages WHERE id = :id FOR UPDATE"),
                          {"id": ids[-1]})
            bulk = threading.Thread(target=bulk_hold)
            with caplog.at_level(logging.INFO, logger="elemta.database"):
                bulk.start()
                waiting = sa.text("SELECT count(*) FROM pg_stat_activity WHERE datname = "
                                  "current_database() AND wait_event_type = 'Lock'")
                deadline = time.monotonic() + 30
                while watcher.scalar(waiting) == 0 and time.monotonic() < deadline:
                    time.sleep(0.02)
                assert watcher.scalar(waiting) == 1  # the bulk action waits for the last one
                # Returns once the deadlock check has aborted the bulk action's transaction.
                other.execute(sa.text("SELECT id FROM messages WHERE id = :id FOR UPDATE"),
                              {"id": ids[0]})
                other.commit()
                bulk.join(60)
    finally:
        engine.dispose()
    assert result["response"].status_code == 200
    assert result["response"].get_json()["count"] == 5
    assert held(app) == 5
    # The aborted try left nothing behind: one event per message, not two.
    assert scalar(app, sa.select(sa.func.count()).select_from(DeliveryEvent)
                  .where(DeliveryEvent.action == "held")) == 5
    retries = [r.getMessage() for r in caplog.records if "trying again" in r.getMessage()]
    assert len(retries) == 1
    assert "DeadlockDetected, SQLSTATE 40P01" in retries[0]


# ------------------------------------------------------------------ a bulk action stopped half-way

def dated_messages(app, count: int) -> list[str]:
    """``count`` pending messages, created one second apart (bulk actions go oldest first)."""
    ids = bulk_queue(app, count)
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    with app.app_context():
        db.session.execute(sa.update(Message), [
            {"id": message_id, "created_at": start + dt.timedelta(seconds=n)}
            for n, message_id in enumerate(ids)])
        db.session.commit()
        db.session.remove()
    return ids


FAULTS = {
    # kind: (PL/pgSQL statement run for the poisoned message, SQLite trigger body or None)
    "error": ("RAISE EXCEPTION 'injected failure'", "SELECT RAISE(ABORT, 'injected failure');"),
    "connection cut": ("PERFORM pg_terminate_backend(pg_backend_pid())", None),
    "lasting conflict": ("RAISE EXCEPTION 'injected' USING ERRCODE = 'deadlock_detected'",
                         None),
}
EXPECTED = {
    "error": (500, "INTERNAL_ERROR", "an internal error occurred"),
    "connection cut": (503, "SERVICE_UNAVAILABLE", "the database became unavailable"),
    "lasting conflict": (409, "CONFLICT", "concurrent changes kept conflicting"),
}


def install_fault(app, kind: str, message_id: str) -> None:
    postgresql, sqlite = FAULTS[kind]
    with app.app_context(), db.engine.begin() as conn:
        if conn.dialect.name == "sqlite":
            conn.execute(sa.text(
                "CREATE TRIGGER bulk_fault BEFORE UPDATE ON messages "
                f"WHEN OLD.id = '{message_id}' BEGIN {sqlite} END"))
            return
        conn.execute(sa.text(
            "CREATE FUNCTION bulk_fault() RETURNS trigger AS $$ BEGIN "
            f"IF OLD.id = '{message_id}' THEN {postgresql}; END IF; RETURN NEW; END "
            "$$ LANGUAGE plpgsql"))
        conn.execute(sa.text("CREATE TRIGGER bulk_fault BEFORE UPDATE ON messages "
                             "FOR EACH ROW EXECUTE FUNCTION bulk_fault()"))


def remove_fault(app) -> None:
    with app.app_context(), db.engine.begin() as conn:
        if conn.dialect.name == "sqlite":
            conn.execute(sa.text("DROP TRIGGER IF EXISTS bulk_fault"))
        else:
            conn.execute(sa.text("DROP TRIGGER IF EXISTS bulk_fault ON messages"))
            conn.execute(sa.text("DROP FUNCTION IF EXISTS bulk_fault()"))


@pytest.mark.parametrize("kind", list(FAULTS))
def test_a_bulk_action_stopped_half_way_says_what_it_did(app, make_app, database_url,
                                                         kind, caplog):
    if FAULTS[kind][1] is None and database_url.startswith("sqlite"):
        pytest.skip(f"{kind}: a PostgreSQL fault")
    count = BULK_CHUNK + 20
    ids = dated_messages(app, count)
    install_fault(app, kind, ids[BULK_CHUNK + 10])  # in the second chunk
    api = make_app()
    try:
        with caplog.at_level(logging.INFO):
            response = api.test_client().post("/api/queue/all/hold")
    finally:
        remove_fault(app)
    status, code, why = EXPECTED[kind]
    body = assert_error(response, status, code)
    assert body["details"] == {"count": BULK_CHUNK, "matched": count}
    assert body["error"] == (f"Bulk hold of queue all stopped: {why} after {BULK_CHUNK} of "
                             f"{count} matching message(s) were held; the others are unchanged."
                             " Repeat the request to act on them.")
    for leak in ("injected", "SELECT", "UPDATE", "psycopg", "sqlite3", "Traceback"):
        assert leak not in response.get_data(as_text=True)
    assert held(app) == BULK_CHUNK  # the first chunk, committed; nothing of the second
    stopped = [r.getMessage() for r in caplog.records if "stopped after" in r.getMessage()]
    assert len(stopped) == 1 and f"after {BULK_CHUNK} of {count}" in stopped[0]
    retried = [r for r in caplog.records if "trying again" in r.getMessage()]
    assert len(retried) == (4 if kind == "lasting conflict" else 0)  # 5 tries in all
    if database_url.startswith("postgresql"):
        sqlstate = {"error": "P0001", "connection cut": "57P01", "lasting conflict": "40P01"}
        assert f"SQLSTATE {sqlstate[kind]}" in stopped[0]
    # The same request again acts on the rest.
    again = api.test_client().post("/api/queue/all/hold")
    assert again.status_code == 200 and again.get_json()["count"] == count - BULK_CHUNK
    assert held(app) == count


# ------------------------------------------------------------------ what an error means

def wrapped(orig: Exception) -> sa_exc.DBAPIError:
    return sa_exc.OperationalError("UPDATE messages SET queue_state = 'held'", {}, orig)


def real_sqlite_busy(tmp_path) -> sqlite3.OperationalError:
    path = str(tmp_path / "busy.db")
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN IMMEDIATE")
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        return exc
    finally:
        other.close()
        holder.close()
    raise AssertionError("the second writer was not refused")


def test_error_classes_conflicts_are_not_an_unavailable_database(tmp_path):
    deadlock = wrapped(psycopg.errors.DeadlockDetected("deadlock detected\nDETAIL: ..."))
    assert is_transient_conflict(deadlock) and not is_database_unavailable(deadlock)
    assert describe_error(deadlock) == ("OperationalError (psycopg.errors.DeadlockDetected, "
                                        "SQLSTATE 40P01): deadlock detected")
    serialization = wrapped(psycopg.errors.SerializationFailure("could not serialize"))
    assert is_transient_conflict(serialization)
    busy = wrapped(real_sqlite_busy(tmp_path))
    assert is_transient_conflict(busy) and not is_database_unavailable(busy)
    assert describe_error(busy) == ("OperationalError (sqlite3.OperationalError, "
                                    "SQLite SQLITE_BUSY): database is locked")
    for unavailable in (psycopg.errors.AdminShutdown("terminating connection"),
                        psycopg.errors.CannotConnectNow("the database system is starting up"),
                        psycopg.errors.TooManyConnections("too many clients"),
                        psycopg.OperationalError("connection failed: Connection refused")):
        assert is_database_unavailable(wrapped(unavailable)), unavailable
        assert not is_transient_conflict(wrapped(unavailable))
    canceled = wrapped(psycopg.errors.QueryCanceled("canceling statement due to timeout"))
    assert not is_database_unavailable(canceled) and not is_transient_conflict(canceled)

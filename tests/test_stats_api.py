"""/api/stats/delivery, flask stats, rollup consistency and the demo history (both databases)."""

from __future__ import annotations

import datetime as dt
import json
import threading

import pytest
import sqlalchemy as sa

from app.events import bump_rollup, record_event
from app.extensions import db
from app.models import DeliveryEvent, DeliveryRollup
from app.stats import service
from app.timeutil import utcnow
from tests.helpers import assert_error

UTC = dt.UTC
SIZES = {"hour": 24, "day": 30, "week": 12, "month": 12}


def rollup_rows(session) -> dict[tuple[dt.datetime, str], int]:
    session.expire_all()
    return {(r.hour, r.outcome): r.count for r in session.scalars(sa.select(DeliveryRollup))
            if r.count}


def recount(session) -> dict[tuple[dt.datetime, str], int]:
    """The rollup as it should be, recounted in Python from every event."""
    outcome_of = {"delivery": "delivered", "tempfail": "deferred", "rejection": "failed"}
    counts: dict[tuple[dt.datetime, str], int] = {}
    for e in session.scalars(sa.select(DeliveryEvent)):
        if e.event_type in outcome_of and e.recipient and e.message_id:
            key = (e.timestamp.replace(minute=0, second=0, microsecond=0), outcome_of[e.event_type])
            counts[key] = counts.get(key, 0) + 1
    return counts


def record_outcomes(session, spec: list[tuple[str, dt.datetime]]) -> None:
    for n, (event_type, timestamp) in enumerate(spec):
        record_event(session, event_type, message_id=f"msg-spec{n:08d}",
                     recipient=f"user{n}@example.org", timestamp=timestamp,
                     message=f"{event_type} number {n}")
    session.commit()


# --------------------------------------------------------------------------- the endpoint


@pytest.mark.parametrize("scale", ["hour", "day", "week", "month"])
def test_empty_window_is_zero_filled(client, scale) -> None:
    body = client.get(f"/api/stats/delivery?timeScale={scale}").get_json()
    assert len(body["data"]) == SIZES[scale]
    assert all(b["delivered"] == b["failed"] == b["deferred"] == 0 for b in body["data"])
    assert set(body["data"][0]) == {"label", "start", "delivered", "failed", "deferred"}
    assert len(body["by_hour"]) == 24
    assert set(body["by_hour"][0]) == {"hour", "start", "delivered", "failed", "deferred"}
    assert (body["total_delivered"], body["total_failed"], body["total_deferred"]) == (0, 0, 0)
    assert body["success_rate"] == 100.0
    assert body["recent_errors"] == []
    starts = [b["start"] for b in body["data"]]
    assert starts == sorted(starts, reverse=True) and starts[0].endswith("Z")


def test_default_scale_is_hour(client) -> None:
    body = client.get("/api/stats/delivery").get_json()
    assert len(body["data"]) == 24 and body["data"][0]["label"].endswith(":00")


@pytest.mark.parametrize("value", ["minute", "HOUR", "", "days", "1"])
def test_invalid_time_scale_is_400(client, value) -> None:
    body = assert_error(client.get(f"/api/stats/delivery?timeScale={value}"), 400,
                        "VALIDATION_ERROR")
    assert "timeScale" in body["details"]


def test_reference_example_94_8(client, session) -> None:
    """The reference's example: 1250 delivered, 45 failed, 23 deferred -> 94.8."""
    hour = utcnow().replace(minute=0, second=0, microsecond=0) - dt.timedelta(hours=3)
    bump_rollup(session, {(hour, "delivered"): 1250, (hour, "failed"): 45, (hour, "deferred"): 23})
    session.commit()
    for scale in SIZES:
        body = client.get(f"/api/stats/delivery?timeScale={scale}").get_json()
        totals = (body["total_delivered"], body["total_failed"], body["total_deferred"])
        assert totals == (1250, 45, 23)
        assert body["success_rate"] == 94.8
        assert sum(b["delivered"] for b in body["data"]) == 1250


@pytest.mark.parametrize("counts, rate", [
    ((1250, 45, 23), 94.8), ((0, 0, 0), 100.0), ((0, 1, 0), 0.0), ((1, 0, 7), 12.5),
    ((2, 1, 0), 66.7), ((1, 0, 1), 50.0), ((999, 1, 0), 99.9), ((1999, 0, 1), 100.0),
])
def test_success_rate(counts, rate) -> None:
    assert service.success_rate(*counts) == rate


def test_counts_land_in_their_buckets(client, session) -> None:
    now = utcnow()
    record_outcomes(session, [
        ("delivery", now - dt.timedelta(hours=2)),
        ("delivery", now - dt.timedelta(hours=2)),
        ("tempfail", now - dt.timedelta(hours=30)),  # outside the hour window
        ("rejection", now - dt.timedelta(days=40)),  # outside the day window
    ])
    # Not outcomes: a reception, an operator action, a listener refusal without a message.
    record_event(session, "reception", message_id="msg-other0001", recipient="x@example.org")
    record_event(session, "system", message_id="msg-other0001", message="held")
    record_event(session, "rejection", recipient="x@example.org", message="554 spam")
    session.commit()
    hour = client.get("/api/stats/delivery?timeScale=hour").get_json()
    assert (hour["total_delivered"], hour["total_failed"], hour["total_deferred"]) == (2, 0, 0)
    assert hour["data"] == hour["data"] and hour["by_hour"][2]["delivered"] == 2
    day = client.get("/api/stats/delivery?timeScale=day").get_json()
    assert (day["total_delivered"], day["total_failed"], day["total_deferred"]) == (2, 0, 1)
    assert round(100 * 2 / 3, 1) == day["success_rate"] == 66.7
    month = client.get("/api/stats/delivery?timeScale=month").get_json()
    assert (month["total_delivered"], month["total_failed"], month["total_deferred"]) == (2, 1, 1)
    assert month["by_hour"] == hour["by_hour"]


def test_recent_errors(client, session) -> None:
    base = utcnow() - dt.timedelta(hours=1)
    spec = [("tempfail" if n % 3 else "rejection", base + dt.timedelta(seconds=n))
            for n in range(14)]
    spec.insert(5, ("delivery", base))
    record_outcomes(session, spec)
    record_event(session, "rejection", recipient="x@example.org", message="554 refused at SMTP")
    session.commit()
    errors = client.get("/api/stats/delivery").get_json()["recent_errors"]
    assert len(errors) == 10
    assert set(errors[0]) == {"message_id", "recipient", "error", "timestamp", "status"}
    newest = list(reversed([(t, ts) for t, ts in spec if t != "delivery"]))[:10]
    assert [e["status"] for e in errors] == [
        "failed" if t == "rejection" else "deferred" for t, _ in newest]
    assert [e["timestamp"] for e in errors] == [
        ts.strftime("%Y-%m-%dT%H:%M:%SZ") for _, ts in newest]
    assert all(e["message_id"].startswith("msg-spec") and e["error"] for e in errors)


# --------------------------------------------------------------------------- rollup consistency


def test_rollup_equals_recount_after_concurrent_writers(app, session) -> None:
    """Writers in threads, each with its own app context and session, bump the same rows."""
    base = utcnow().replace(minute=0, second=0, microsecond=0) - dt.timedelta(hours=5)
    errors: list[BaseException] = []
    threads_count, per_thread = 4, 30

    def writer(index: int) -> None:
        try:
            with app.app_context():
                for n in range(per_thread):
                    event_type = ("delivery", "tempfail", "rejection")[(index + n) % 3]
                    record_event(db.session, event_type, message_id=f"msg-thread{index}-{n:04d}",
                                 recipient=f"r{n}@example.com",
                                 timestamp=base + dt.timedelta(minutes=7 * (n % 20)))
                    db.session.commit()
                db.session.remove()
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(threads_count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    rows = rollup_rows(session)
    assert rows == recount(session)
    assert sum(rows.values()) == threads_count * per_thread


def test_rebuild_restores_a_damaged_rollup(runner, session) -> None:
    now = utcnow()
    record_outcomes(session, [(("delivery", "tempfail", "rejection")[n % 3],
                               now - dt.timedelta(minutes=37 * n)) for n in range(60)])
    good = rollup_rows(session)
    assert good == recount(session)
    some_hour = next(iter(good))[0]
    session.execute(sa.delete(DeliveryRollup).where(DeliveryRollup.hour == some_hour))
    session.execute(sa.update(DeliveryRollup).values(count=DeliveryRollup.count + 5))
    session.add(DeliveryRollup(hour=some_hour - dt.timedelta(days=400), outcome="failed", count=9))
    session.commit()
    assert rollup_rows(session) != good

    result = runner.invoke(args=["stats", "rebuild", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["rollup_rows"] == len(good)
    assert rollup_rows(session) == good


def test_rebuild_of_a_range_leaves_other_hours_alone(runner, session) -> None:
    now = utcnow().replace(minute=30, second=0, microsecond=0)
    record_outcomes(session, [("delivery", now - dt.timedelta(hours=h)) for h in range(10)])
    good = rollup_rows(session)
    session.execute(sa.update(DeliveryRollup).values(count=7))
    session.commit()
    since = (now - dt.timedelta(hours=3)).strftime("%Y-%m-%dT%H:%M:%SZ")
    result = runner.invoke(args=["stats", "rebuild", "--since", since])
    assert result.exit_code == 0, result.output
    rows = rollup_rows(session)
    for (hour, outcome), count in rows.items():
        rebuilt = hour >= now.replace(minute=0) - dt.timedelta(hours=3)
        expected = good[(hour, outcome)] if rebuilt else 7
        assert count == expected


# --------------------------------------------------------------------------- CLI and demo


def test_cli_delivery(runner, session) -> None:
    record_outcomes(session, [("delivery", utcnow() - dt.timedelta(days=2))])
    result = runner.invoke(args=["stats", "delivery", "--time-scale", "day", "--json"])
    assert result.exit_code == 0, result.output
    body = json.loads(result.output)
    assert len(body["data"]) == 30 and body["total_delivered"] == 1
    text = runner.invoke(args=["stats", "delivery", "--time-scale", "week"])
    assert text.exit_code == 0 and "success rate: 100.0%" in text.output
    bad = runner.invoke(args=["stats", "delivery", "--time-scale", "year"])
    assert bad.exit_code != 0 and "year" in bad.output


def test_demo_seed_history_is_consistent(runner, session) -> None:
    result = runner.invoke(args=["demo", "seed", "--messages", "40", "--events", "3000",
                                 "--seed", "7", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["events"] == 3000
    assert rollup_rows(session) == recount(session)
    by_type = dict(session.execute(
        sa.select(DeliveryEvent.event_type, sa.func.count())
        .group_by(DeliveryEvent.event_type)).all())
    assert set(by_type) == {"reception", "delivery", "tempfail", "rejection", "system"}
    assert by_type["delivery"] > by_type["tempfail"] > by_type["rejection"]
    missing = session.scalar(sa.select(sa.func.count()).select_from(DeliveryEvent)
                             .where(DeliveryEvent.action.is_(None)))
    assert missing == 0
    states = dict(session.execute(
        sa.select(DeliveryEvent.action, sa.func.min(DeliveryEvent.queue_state))
        .where(DeliveryEvent.event_type != "system").group_by(DeliveryEvent.action)).all())
    assert states == {"queued": "pending", "delivered": None, "deferred": "deferred",
                      "failed": "failed"}
    oldest = session.scalar(sa.select(sa.func.min(DeliveryEvent.timestamp)))
    assert utcnow() - oldest > dt.timedelta(days=360)
    body = runner.invoke(args=["stats", "delivery", "--time-scale", "month", "--json"])
    assert sum(json.loads(body.output)["data"][i]["delivered"] for i in range(12)) > 1000


def test_bulk_queue_seed_on_postgresql(session) -> None:
    """The server-side generator used for a million queued messages, at a small size."""
    if session.get_bind().dialect.name != "postgresql":
        pytest.skip("the bulk generator is PostgreSQL-only (SQLite uses the Python path)")
    from email import message_from_bytes

    from app.demo.bulk import seed_messages_postgresql
    from app.models import Message, MessageContent, Recipient
    from app.queue.service import MESSAGE_ID, queue_stats

    made = seed_messages_postgresql(session, 400, seed=3, now=utcnow())
    assert sum(made.values()) == 400 and all(made.values())
    stats = queue_stats(session)
    assert {k: stats[k] for k in made} == made
    orphans = session.scalar(sa.select(sa.func.count()).select_from(Message).where(
        ~sa.exists().where(Recipient.message_id == Message.id)))
    assert orphans == 0
    assert session.scalar(sa.select(sa.func.count()).select_from(MessageContent)) == 400
    for message in session.scalars(sa.select(Message).limit(20)):
        assert MESSAGE_ID.match(message.id)
        raw = session.scalar(sa.select(MessageContent.raw)
                             .where(MessageContent.message_id == message.id))
        assert message_from_bytes(raw)["Subject"] == message.subject
        statuses = {r.status for r in message.recipients}
        if message.queue_state == "failed":
            assert statuses == {"failed"} and message.next_attempt_at is None
        elif message.queue_state == "deferred":
            assert statuses == {"deferred"} and message.next_attempt_at > utcnow()
        elif message.queue_state == "pending":
            assert statuses == {"pending"} and message.attempts == 0
    receptions = session.scalar(sa.select(sa.func.count()).select_from(DeliveryEvent)
                                .where(DeliveryEvent.event_type == "reception"))
    assert receptions == 400
    assert session.scalar(sa.select(sa.func.count()).select_from(DeliveryEvent)
                          .where(DeliveryEvent.action.is_(None))) == 0
    assert rollup_rows(session) == recount(session)

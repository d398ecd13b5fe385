"""``GET /api/queue/message/{id}/diagnosis``: why a message is still queued."""

from __future__ import annotations

import datetime as dt
import functools

from app.control import limits, policies, rules, suppression
from app.delivery.diagnosis import DiagnosisSettings, diagnose
from app.delivery.outcomes import OutcomePolicy, judge
from app.delivery.smtp_client import RecipientResult
from app.queue import service
from app.queue.leases import lease_due
from app.queue.outcomes import Attempt, record_attempts
from app.timeutil import isoformat_z, parse_iso, utcnow
from tests.helpers import assert_error, queue_message

SCHEDULE = [60, 300, 900]
POLICY = OutcomePolicy(retry_schedule=SCHEDULE, max_queue_lifetime=7200, send_bounces=False,
                       reporting_mta="mx.test", jitter=0.0)


def attempt(session, results: dict[str, tuple[str, int, str | None, str]],
            when: dt.datetime | None = None) -> None:
    """One claimed attempt of every due recipient, with the given (kind, code, enhanced,
    text) per address."""
    when = when or utcnow()
    claimed = lease_due(session, "worker-a", max_messages=10, lease_seconds=60, now=when)
    attempts: dict[str, list[RecipientResult]] = {}
    for c in claimed:
        kind, code, enhanced, text = results[c.address]
        attempts.setdefault(c.message_id, []).append(RecipientResult(
            recipient_id=c.id, address=c.address, kind=kind, text=text, smtp_code=code,
            enhanced_code=enhanced, remote_host=f"mx.{c.domain}", remote_ip="192.0.2.7"))
    record_attempts(session, "worker-a", [Attempt(m, None, r) for m, r in attempts.items()],
                    functools.partial(judge, POLICY), when)
    session.commit()


def test_a_deferred_recipient_shows_its_attempts_schedule_and_expiry(app, client, session):
    message_id = queue_message(session, recipients=("bob@example.net", "carol@example.org"))
    attempt(session, {"bob@example.net": ("tempfail", 451, "4.7.1", "451 4.7.1 Greylisted"),
                      "carol@example.org": ("delivered", 250, "2.0.0", "250 OK")})
    body = client.get(f"/api/queue/message/{message_id}/diagnosis").get_json()
    assert body["id"] == message_id and body["queue"] == "deferred"
    bob, carol = body["recipients"]
    assert carol["status"] == "delivered" and carol["planned_attempts"] == []
    assert carol["summary"].startswith("carol@example.org: delivered by mx.example.org")
    assert bob["status"] == "deferred"
    assert [(a["outcome"], a["smtp_code"], a["enhanced_code"], a["remote_host"], a["reply"])
            for a in bob["attempts"]] == [("tempfail", 451, "4.7.1", "mx.example.net",
                                           "451 4.7.1 Greylisted")]
    assert [a["failure_class"] for a in bob["attempts"]] == ["policy"]  # 4.7.1: API.md §17
    assert [a["failure_class"] for a in carol["attempts"]] == [None]
    # Retry after the first failure: 60 s; then 300, 900, 900... until the lifetime (7200 s
    # in the test app's settings, see ``settings`` below) ends, the last attempt at expiry.
    created = parse_iso(body["created_at"])
    expires = created + dt.timedelta(seconds=app.config["MAX_QUEUE_LIFETIME"])
    assert bob["expires_at"] == body["expires_at"] == isoformat_z(expires)
    planned = [parse_iso(t) for t in bob["planned_attempts"]]
    assert planned[0] == parse_iso(bob["next_attempt_at"])
    steps = app.config["RETRY_SCHEDULE"]
    assert planned[1] - planned[0] == dt.timedelta(seconds=steps[1])
    assert planned[2] - planned[1] == dt.timedelta(seconds=steps[2])
    assert 0 < bob["next_attempt_in"] <= 66
    assert bob["lease"] is None and bob["policy"] is None and bob["rules"] == []
    assert "bob@example.net: deferred 1 time(s) by mx.example.net (451 4.7.1 Greylisted); " \
           "next attempt in " in bob["summary"]
    assert "expires in " in bob["summary"]
    assert body["summary"].startswith(f"Message {message_id} is deferred, queued ")
    assert bob["summary"] in body["summary"]


def test_lease_hold_rule_policy_backoff_and_suppression_are_named(app, client, session):
    message_id = queue_message(session, recipients=("bob@example.net",))
    now = utcnow()
    lease_due(session, "worker-b", max_messages=10, lease_seconds=120, now=now)
    body = client.get(f"/api/queue/message/{message_id}/diagnosis").get_json()
    [bob] = body["recipients"]
    assert bob["lease"]["worker"] == "worker-b" and bob["lease"]["active"] is True
    assert "being delivered by worker worker-b (lease until" in bob["summary"]

    policy = policies.create_policy(session, {"kind": "domain", "pattern": "example.net",
                                              "max_connections": 2}, "t")
    limits.save_backoff(session, "dest:example.net", 2, now + dt.timedelta(minutes=5),
                        "421 4.7.0 Too many connections", now)
    suppression.add_suppression(session, "bob@example.net", "asked us", None, "t")
    rule = rules.create_rule(session, domain="example.net", action="hold",
                             expires_at=now + dt.timedelta(hours=2), actor="t")
    body = client.get(f"/api/queue/message/{message_id}/diagnosis").get_json()
    [bob] = body["recipients"]
    assert body["queue"] == "held" and f"(rule {rule.id})" in body["held"]["reason"]
    assert bob["policy"]["id"] == policy.id and bob["policy"]["limit_key"] == "dest:example.net"
    assert bob["backoff"]["level"] == 2 and bob["backoff"]["paused_until"] is not None
    assert [r["id"] for r in bob["rules"]] == [rule.id]
    assert bob["suppressed"]["reason"] == "asked us"
    for words in ("destination backed off (level 2", "destination policy domain example.net",
                  f"rule {rule.id} (hold) applies until", "address suppressed (operator"):
        assert words in bob["summary"], words


def test_failed_message_says_when_it_is_purged(app, session):
    message_id = queue_message(session, state="failed")
    with app.app_context():
        diagnosis = diagnose(session, message_id, DiagnosisSettings.from_config(app.config))
    assert diagnosis.purge_at is not None
    assert "failed mail retention" in diagnosis.summary
    assert diagnosis.recipients[0].planned_attempts == []
    assert diagnosis.recipients[0].summary.startswith("bob@example.net: failed for good")


def test_planned_attempts_stop_at_expiry(app, session):
    message_id = queue_message(session)
    settings = DiagnosisSettings(retry_schedule=[600], max_queue_lifetime=1800,
                                 failed_retention=60, default_connections=1, relay="")
    with app.app_context():
        diagnosis = diagnose(session, message_id, settings)
    [bob] = diagnosis.recipients
    created = diagnosis.message.created_at
    assert [(t - created).total_seconds() for t in bob.planned_attempts] == [0, 600, 1200, 1800]


def test_unknown_and_malformed_ids_are_404(client):
    assert_error(client.get("/api/queue/message/msg-doesnotexist123/diagnosis"), 404,
                 "MESSAGE_NOT_FOUND")
    assert_error(client.get("/api/queue/message/nope/diagnosis"), 404, "MESSAGE_NOT_FOUND")


def test_why_cli(runner, session):
    message_id = queue_message(session, state="held")
    result = runner.invoke(args=["queue", "why", message_id])
    assert result.exit_code == 0, result.output
    assert f"Message {message_id} is held" in result.output
    assert "held: no attempt until it is released" in result.output
    result = runner.invoke(args=["queue", "why", message_id, "--json"])
    assert result.exit_code == 0 and '"queue": "held"' in result.output
    result = runner.invoke(args=["queue", "why", "msg-doesnotexist123"])
    assert result.exit_code != 0 and "not found" in result.output


def test_service_is_the_same_for_api_and_cli(app, client, session):
    message_id = queue_message(session)
    service.hold_message(session, message_id, "t")
    body = client.get(f"/api/queue/message/{message_id}/diagnosis").get_json()
    assert body["held"]["reason"] == f"Message {message_id} held by t"

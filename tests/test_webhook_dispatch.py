"""The webhook dispatcher against a real HTTP receiver on loopback (tests/webhook_helpers.py).

Time is a test clock handed to the dispatcher: retries become due by moving the clock, never by
sleeping, and no assertion depends on how long anything took.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import threading
import time
from collections import Counter, defaultdict

import pytest
import sqlalchemy as sa

from app.extensions import db
from app.models import DeliveryEvent, WebhookAttempt, WebhookDelivery
from app.timeutil import utcnow
from app.webhooks import feed
from app.webhooks.dispatcher import Dispatcher
from app.webhooks.signing import verify
from tests.delivery_helpers import Behaviour, Peer, run_worker
from tests.helpers import queue_message
from tests.webhook_helpers import Receiver, fail_first

ALL_TYPES = ["queued", "delivered", "deferred", "failed", "bounced", "held", "released",
             "deleted", "suppressed"]
SECRET = "whsec_test-secret-0123456789abcdef"


class Clock:
    def __init__(self) -> None:
        self.now = utcnow()

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


@pytest.fixture
def hook_app(app, make_app):
    """An app with tiny retry delays (the ``app`` fixture emptied the database)."""

    def factory(**config):
        settings = {"webhook_retry_base": 1, "webhook_retry_max_delay": 60,
                    "webhook_timeout": 5, "webhook_concurrency": 4}
        settings.update(config)
        return make_app(**settings)

    return factory


def create_hook(app, url, types=ALL_TYPES, secret=SECRET):
    response = app.test_client().post("/api/webhooks", json={
        "url": url, "event_types": types, "secret": secret})
    assert response.status_code == 201, response.get_json()
    return response.get_json()["id"]


def queue(app, **kwargs):
    with app.app_context():
        message_id = queue_message(db.session, **kwargs)
        db.session.remove()
    return message_id


def event_ids(app, message_id):
    with app.app_context():
        ids = db.session.scalars(sa.select(DeliveryEvent.id)
                                 .where(DeliveryEvent.message_id == message_id)
                                 .order_by(DeliveryEvent.id)).all()
        db.session.remove()
    return [feed.event_id_text(i) for i in ids]


def deliveries(app):
    with app.app_context():
        rows = db.session.execute(sa.select(
            WebhookDelivery.id, WebhookDelivery.event_type, WebhookDelivery.status,
            WebhookDelivery.attempts, WebhookDelivery.message_id)
            .order_by(WebhookDelivery.id)).all()
        db.session.remove()
    return rows


def drain(dispatcher, clock, passes=60, step=120):
    """Passes until nothing is pending, moving the clock past every backoff in between."""
    for _ in range(passes):
        dispatcher.run_pass()
        if all(row.status != "pending" for row in deliveries(dispatcher.app)):
            return
        clock.advance(step)
    raise AssertionError("deliveries still pending")


def test_events_are_signed_as_documented(hook_app):
    app = hook_app()
    with Receiver() as receiver:
        create_hook(app, receiver.url, ["queued"])
        message_id = queue(app)
        Dispatcher(app).run_pass()
    [request] = receiver.requests
    headers = {k.lower(): v for k, v in request.headers.items()}
    assert headers["content-type"] == "application/json"
    # The documented algorithm, written out independently of app/webhooks/signing.py.
    fields = dict(part.split("=", 1) for part in headers["elemta-signature"].split(","))
    expected = hmac.new(SECRET.encode(), fields["t"].encode() + b"." + request.body,
                        hashlib.sha256).hexdigest()
    assert hmac.compare_digest(fields["v1"], expected)
    assert abs(int(fields["t"]) - time.time()) < 3600  # a Unix time, not a counter
    assert verify(SECRET, headers["elemta-signature"], request.body, now=int(fields["t"]))
    assert not verify("whsec_another-secret-0123456789", headers["elemta-signature"],
                      request.body, now=int(fields["t"]))
    assert not verify(SECRET, headers["elemta-signature"], request.body + b" ",
                      now=int(fields["t"]))
    assert not verify(SECRET, headers["elemta-signature"], request.body,
                      now=int(fields["t"]) + 301)  # too old: a replay
    event = request.event
    assert headers["elemta-event-id"] == event["id"] == event_ids(app, message_id)[0]
    assert headers["elemta-event-type"] == event["type"] == "queued"
    assert event["data"]["message_id"] == message_id
    assert event["data"]["sender"] == "alice@example.com"
    assert event["created_at"].endswith("Z")


def test_a_suppressed_address_is_sent_as_a_suppressed_event(hook_app):
    app = hook_app()
    with Receiver() as receiver:
        create_hook(app, receiver.url, ["suppressed"])
        response = app.test_client().post("/api/suppressions", json={
            "address": "Gone@Example.com", "reason": "asked to stop"})
        assert response.status_code == 201
        Dispatcher(app).run_pass()
    [request] = receiver.requests
    event = request.event
    assert event["type"] == "suppressed"
    assert event["data"]["recipient"] == "gone@example.com"
    assert event["data"]["action"] == "suppressed"
    assert "asked to stop" in event["data"]["text"]


def test_a_receiver_failing_five_times_gets_every_event_once_in_order(hook_app):
    app = hook_app()
    clock = Clock()
    client = app.test_client()
    with Receiver(answer=fail_first(5)) as receiver:
        create_hook(app, receiver.url)
        messages = [queue(app, subject=f"m{i}") for i in range(3)]
        for message_id in messages:
            assert client.post(f"/api/queue/message/{message_id}/hold").status_code == 200
            assert client.post(f"/api/queue/message/{message_id}/release").status_code == 200
            assert client.delete(f"/api/queue/message/{message_id}").status_code == 200
        drain(Dispatcher(app, clock=clock), clock)
    failures = [r for r in receiver.requests if r.status >= 300]
    assert len(failures) == 5
    accepted = [r.event for r in receiver.accepted()]
    # Exactly once each ...
    assert Counter(e["id"] for e in accepted) == Counter(
        i for m in messages for i in event_ids(app, m))
    # ... and in order per message (queued, held, released, deleted).
    per_message = defaultdict(list)
    for event in accepted:
        per_message[event["data"]["message_id"]].append(event)
    for message_id in messages:
        assert [e["id"] for e in per_message[message_id]] == event_ids(app, message_id)
        assert [e["type"] for e in per_message[message_id]] == [
            "queued", "held", "released", "deleted"]
    rows = deliveries(app)
    assert {row.status for row in rows} == {"delivered"}
    assert sum(row.attempts for row in rows) == len(receiver.requests) == 12 + 5
    with app.app_context():
        assert db.session.scalar(sa.select(sa.func.count()).select_from(WebhookAttempt)) == 17
        db.session.remove()


def test_a_failing_event_holds_back_only_its_own_message(hook_app):
    app = hook_app()
    clock = Clock()
    client = app.test_client()
    blocked = {"id": None, "failing": True}

    def answer(_n, body):
        failing = json.loads(body)["data"]["message_id"] == blocked["id"] and blocked["failing"]
        return 503 if failing else 200

    with Receiver(answer=answer) as receiver:
        create_hook(app, receiver.url, ["queued", "held"])
        first, second = queue(app, subject="a"), queue(app, subject="b")
        blocked["id"] = first
        for message_id in (first, second):
            assert client.post(f"/api/queue/message/{message_id}/hold").status_code == 200
        dispatcher = Dispatcher(app, clock=clock)
        dispatcher.run_pass()
        # The other message went through completely; this one's later event waits.
        assert [(r.event["data"]["message_id"], r.event["type"]) for r in receiver.accepted()] \
            == [(second, "queued"), (second, "held")]
        assert {(r.event["data"]["message_id"], r.event["type"])
                for r in receiver.requests if r.status >= 300} == {(first, "queued")}
        blocked["failing"] = False
        drain(dispatcher, clock)
    assert [(r.event["data"]["message_id"], r.event["type"]) for r in receiver.accepted()][2:] \
        == [(first, "queued"), (first, "held")]


def test_an_event_is_given_up_after_the_retry_window_and_frees_the_next(hook_app):
    app = hook_app(webhook_retry_base=60, webhook_retry_max_delay=3600,
                   webhook_retry_window=600)
    clock = Clock()
    client = app.test_client()
    with Receiver(answer=lambda _n, body: 500 if json.loads(body)["type"] == "queued"
                  else 200) as receiver:
        create_hook(app, receiver.url, ["queued", "held"])
        message_id = queue(app)
        assert client.post(f"/api/queue/message/{message_id}/hold").status_code == 200
        drain(Dispatcher(app, clock=clock), clock, step=60)
    rows = deliveries(app)
    assert [(r.event_type, r.status) for r in rows] == [
        ("queued", "failed"), ("held", "delivered")]
    # Tries at 0, 60, 180 and 420 s; the next one (900 s) would be past the 600 s window.
    assert rows[0].attempts == 4
    assert [r.event["type"] for r in receiver.accepted()] == ["held"]


def test_redelivery_sends_the_same_event_again_and_keeps_the_history(hook_app):
    app = hook_app()
    client = app.test_client()
    with Receiver() as receiver:
        hook_id = create_hook(app, receiver.url, ["queued"])
        queue(app)
        dispatcher = Dispatcher(app)
        dispatcher.run_pass()
        [delivery] = client.get(f"/api/webhooks/{hook_id}/deliveries").get_json()["deliveries"]
        assert delivery["status"] == "delivered" and len(delivery["attempt_log"]) == 1
        response = client.post(f"/api/webhooks/{hook_id}/deliveries/{delivery['id']}/redeliver")
        assert response.status_code == 202
        assert response.get_json()["status"] == "pending"
        dispatcher.run_pass()
    first, again = receiver.requests
    assert first.body == again.body
    assert first.headers["Elemta-Event-Id"] == again.headers["Elemta-Event-Id"]
    assert (first.headers["Elemta-Attempt"], again.headers["Elemta-Attempt"]) == ("1", "2")
    [delivery] = client.get(f"/api/webhooks/{hook_id}/deliveries").get_json()["deliveries"]
    assert delivery["status"] == "delivered"
    assert [a["status_code"] for a in delivery["attempt_log"]] == [200, 200]


def test_delivery_outcomes_and_the_bounce_reach_the_receiver(hook_app):
    behaviour = Behaviour(rcpt_replies={"nobody@example.net": "550 5.1.1 No such user"})
    with Peer(behaviour) as peer, Receiver() as receiver:
        app = hook_app(relay_host=peer.address, smtp_timeout=5, worker_concurrency=2)
        create_hook(app, receiver.url, ["delivered", "failed", "bounced"])
        message_id = queue(app, recipients=("bob@example.net", "nobody@example.net"))
        run_worker(app)
        Dispatcher(app).run_pass()
    events = [r.event for r in receiver.accepted()]
    outcomes = {(e["type"], e["data"]["recipient"]) for e in events
                if e["data"]["message_id"] == message_id}
    assert outcomes == {("delivered", "bob@example.net"), ("failed", "nobody@example.net")}
    [delivered] = [e for e in events
                   if e["type"] == "delivered" and e["data"]["message_id"] == message_id]
    assert (delivered["data"]["smtp_code"], delivered["data"]["remote_ip"]) == (250, "127.0.0.1")
    [bounce] = [e for e in events if e["type"] == "bounced"]
    assert bounce["data"]["original_message_id"] == message_id
    assert bounce["data"]["recipient"] == "alice@example.com"


def test_the_dispatcher_process_loop_sends_and_stops(hook_app):
    app = hook_app(webhook_poll_interval=0.05)
    with Receiver() as receiver:
        create_hook(app, receiver.url, ["queued"])
        dispatcher = Dispatcher(app)
        runner = threading.Thread(target=dispatcher.run)
        runner.start()
        try:
            message_id = queue(app)
            assert receiver.wait_for(1)
        finally:
            dispatcher.stop()
            runner.join(30)
    assert not runner.is_alive()
    assert receiver.requests[0].event["data"]["message_id"] == message_id
    # Recorded before it stopped.
    [row] = deliveries(app)
    assert row.status == "delivered"


def test_events_behind_a_hole_wait_until_it_fills_or_times_out(hook_app):
    app = hook_app(webhook_hole_timeout=30)
    dispatcher = Dispatcher(app)
    start = utcnow()
    assert dispatcher._contiguous_top(10, [11, 12, 14, 15], start) == 12
    assert dispatcher._contiguous_top(10, [11, 12, 14, 15], start + dt.timedelta(seconds=29)) \
        == 12
    assert dispatcher._contiguous_top(12, [13, 14, 15], start + dt.timedelta(seconds=29)) == 15
    assert dispatcher._contiguous_top(12, [14, 15], start + dt.timedelta(seconds=30)) == 15


def test_a_paused_webhook_gets_nothing_and_resumes_with_new_events(hook_app):
    app = hook_app()
    client = app.test_client()
    with Receiver() as receiver:
        hook_id = create_hook(app, receiver.url, ["queued"])
        assert client.patch(f"/api/webhooks/{hook_id}", json={"active": False}).status_code == 200
        queue(app, subject="while paused")
        Dispatcher(app).run_pass()
        assert receiver.requests == []
        assert client.patch(f"/api/webhooks/{hook_id}", json={"active": True}).status_code == 200
        later = queue(app, subject="after")
        Dispatcher(app).run_pass()
    assert [r.event["data"]["message_id"] for r in receiver.requests] == [later]


@pytest.mark.parametrize(("row", "kind"), [
    ({"event_type": "reception", "message_id": "m", "sender": "a@x", "recipient": "b@y",
      "action": "queued"}, "queued"),
    ({"event_type": "reception", "message_id": "m", "sender": "", "recipient": "a@x",
      "action": "queued"}, "bounced"),
    ({"event_type": "delivery", "message_id": "m", "sender": "a", "recipient": "b",
      "action": "delivered"}, "delivered"),
    ({"event_type": "tempfail", "message_id": "m", "sender": "a", "recipient": "b",
      "action": "deferred"}, "deferred"),
    ({"event_type": "rejection", "message_id": "m", "sender": "a", "recipient": "b",
      "action": "failed"}, "failed"),
    # The listener's refusals are not about a queued message.
    ({"event_type": "rejection", "message_id": None, "sender": "a", "recipient": "b",
      "action": None}, None),
    ({"event_type": "system", "message_id": "m", "sender": "a", "recipient": None,
      "action": "flushed"}, "deleted"),
    ({"event_type": "system", "message_id": "m", "sender": "a", "recipient": None,
      "action": "purged"}, "deleted"),
    ({"event_type": "system", "message_id": "m", "sender": "a", "recipient": None,
      "action": "retried"}, None),
    ({"event_type": "system", "message_id": "m", "sender": "a", "recipient": None,
      "action": "suppressed"}, "suppressed"),
])
def test_message_events_map_to_webhook_types(row, kind):
    assert feed.webhook_type(row) == kind


def test_finished_deliveries_past_the_retention_are_pruned_with_their_attempts(hook_app):
    app = hook_app(webhook_retention=86400)
    hook_id = create_hook(app, "http://127.0.0.1:9/hook")
    now = utcnow()
    old, recent = now - dt.timedelta(days=2), now - dt.timedelta(hours=1)
    with app.app_context():
        for event_id, (status, created) in enumerate(
                [("delivered", old), ("failed", old), ("pending", old), ("delivered", recent)],
                start=1):
            delivery = WebhookDelivery(
                webhook_id=hook_id, event_id=event_id, event_type="queued", message_id="m",
                payload="{}", status=status, attempts=1, created_at=created,
                retry_until=created, next_attempt_at=None)
            delivery.attempt_log.append(WebhookAttempt(attempted_at=created, status_code=500,
                                                       duration_ms=1))
            db.session.add(delivery)
        db.session.commit()
        db.session.remove()
    assert Dispatcher(app).prune(now) == 2
    assert [(r.status, r.id) for r in deliveries(app)] == [("pending", 3), ("delivered", 4)]
    with app.app_context():
        assert db.session.scalar(sa.select(sa.func.count()).select_from(WebhookAttempt)) == 2
        db.session.remove()

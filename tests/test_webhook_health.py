"""The webhook dispatcher in /api/health and /metrics (docs/WEBHOOKS.md, "Watching it").

Its heartbeat shares the delivery workers' table but never counts as a worker; a stale one, or
none while a webhook is active, makes the service ``degraded``, as a stale worker does.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time

from prometheus_client import REGISTRY

from app.delivery.maintenance import DISPATCHER_PREFIX
from app.models import WorkerHeartbeat
from app.timeutil import isoformat_z, utcnow
from app.webhooks.dispatcher import Dispatcher
from tests.test_metrics import samples, value
from tests.test_webhook_dispatch import Clock, create_hook, deliveries, drain, hook_app, queue
from tests.webhook_helpers import Receiver

__all__ = ["hook_app"]  # the fixture, used by name

HEALTH_KEYS = {"status", "last_heartbeat", "pending", "active_webhooks"}


def _beat(session, age_seconds: float, worker_id: str) -> dt.datetime:
    beat = utcnow().replace(microsecond=0) - dt.timedelta(seconds=age_seconds)
    session.merge(WorkerHeartbeat(worker_id=worker_id, hostname="host", pid=1,
                                  started_at=beat, last_heartbeat=beat))
    session.commit()
    return beat


def _health(app) -> dict:
    response = app.test_client().get("/api/health")
    assert response.status_code == 200
    return response.get_json()


def _wait_for(condition, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_without_webhooks_no_dispatcher_is_needed(client, session) -> None:
    _beat(session, 5, "live-worker")
    body = client.get("/api/health").get_json()
    assert body["status"] == "healthy"
    assert body["webhook_dispatcher"] == {"status": "absent", "last_heartbeat": None,
                                          "pending": 0, "active_webhooks": 0}


def test_a_running_dispatcher_beats_is_no_worker_and_says_when_it_stops(hook_app) -> None:
    app = hook_app(webhook_poll_interval=0.05)
    with Receiver() as receiver:
        create_hook(app, receiver.url, ["queued"])
        # An active webhook and no dispatcher: its events would wait unseen.
        body = _health(app)
        assert body["status"] == "degraded"
        assert body["webhook_dispatcher"]["status"] == "absent"
        assert body["webhook_dispatcher"]["active_webhooks"] == 1

        dispatcher = Dispatcher(app)
        runner = threading.Thread(target=dispatcher.run)
        runner.start()
        try:
            assert _wait_for(
                lambda: _health(app)["webhook_dispatcher"]["status"] == "running")
            queue(app)
            assert receiver.wait_for(1)
            body = _health(app)
            # The dispatcher's heartbeat is not a delivery worker's.
            assert body["worker"] == {"status": "absent", "last_heartbeat": None}
            assert set(body["webhook_dispatcher"]) == HEALTH_KEYS
            assert body["webhook_dispatcher"]["last_heartbeat"].endswith("Z")
        finally:
            dispatcher.stop()
            runner.join(30)
    assert not runner.is_alive()
    # Stopped cleanly: gone at once, not stale a minute later.
    assert _health(app)["webhook_dispatcher"]["status"] == "absent"


def test_a_stale_dispatcher_degrades_the_service(client, session) -> None:
    _beat(session, 5, "live-worker")
    beat = _beat(session, 61, f"{DISPATCHER_PREFIX}host:1")
    body = client.get("/api/health").get_json()
    assert body["status"] == "degraded"
    assert body["worker"]["status"] == "running"
    assert body["webhook_dispatcher"] == {"status": "stale", "last_heartbeat": isoformat_z(beat),
                                          "pending": 0, "active_webhooks": 0}


def test_a_fresh_dispatcher_and_worker_are_healthy_and_the_backlog_is_counted(
        hook_app, session) -> None:
    app = hook_app()
    _beat(session, 5, "live-worker")
    beat = _beat(session, 5, f"{DISPATCHER_PREFIX}host:1")
    first = create_hook(app, "http://127.0.0.1:9/a", ["queued"])
    second = create_hook(app, "http://127.0.0.1:9/b", ["queued", "deleted"])
    queue(app)
    queue(app, state="held")
    Dispatcher(app).feed()  # queued, not sent

    body = _health(app)
    assert body["status"] == "healthy"
    assert body["webhook_dispatcher"] == {"status": "running", "last_heartbeat": isoformat_z(beat),
                                          "pending": 4, "active_webhooks": 2}

    found = samples(app.test_client().get("/metrics").get_data(as_text=True))
    assert value(found, "elemta_webhook_pending_deliveries", webhook=str(first)) == 2
    assert value(found, "elemta_webhook_pending_deliveries", webhook=str(second)) == 2
    age = value(found, "elemta_webhook_dispatcher_heartbeat_age_seconds")
    assert age is not None and 5 <= age < 60
    # The dispatcher's heartbeat is not the workers'.
    assert value(found, "elemta_worker_heartbeat_age_seconds") < 60


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_attempts_successes_and_give_ups_are_counted(hook_app) -> None:
    app = hook_app(webhook_retry_base=60, webhook_retry_max_delay=3600,
                   webhook_retry_window=600)
    clock = Clock()
    before = (_sample("elemta_webhook_attempts_total", result="success"),
              _sample("elemta_webhook_attempts_total", result="failure"),
              _sample("elemta_webhook_deliveries_failed_total"))
    started = time.time()
    # "queued" always fails (given up after 4 tries, as in test_webhook_dispatch), "held" is
    # accepted at once.
    with Receiver(answer=lambda _n, body: 500 if json.loads(body)["type"] == "queued"
                  else 200) as receiver:
        create_hook(app, receiver.url, ["queued", "held"])
        message_id = queue(app)
        assert app.test_client().post(f"/api/queue/message/{message_id}/hold").status_code == 200
        drain(Dispatcher(app, clock=clock), clock, step=60)
    assert [(r.event_type, r.status) for r in deliveries(app)] == [
        ("queued", "failed"), ("held", "delivered")]
    assert (_sample("elemta_webhook_attempts_total", result="success") - before[0],
            _sample("elemta_webhook_attempts_total", result="failure") - before[1],
            _sample("elemta_webhook_deliveries_failed_total") - before[2]) == (1, 4, 1)
    assert _sample("elemta_webhook_last_success_timestamp_seconds") >= int(started)

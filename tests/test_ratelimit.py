"""Rate limiting (API.md §9): budgets, identity, headers, exemptions, proxies, shared storage."""

from __future__ import annotations

import time
import uuid

import pytest
import redis
from flask.testing import FlaskClient

from app.auth import keys
from app.ratelimit import limiter_of
from tests.conftest import TEST_ADMIN_KEY
from tests.helpers import assert_error, queue_message, state_of

REDIS_URL = "redis://127.0.0.1:6379"


def anonymous(app, remote_addr: str = "127.0.0.1") -> FlaskClient:
    client = FlaskClient(app, app.response_class, use_cookies=False)
    client.environ_base["REMOTE_ADDR"] = remote_addr
    return client


def assert_rate_limited(response) -> int:
    body = assert_error(response, 429, "RATE_LIMITED")
    assert "per" in body["error"]
    retry_after = int(response.headers["Retry-After"])
    assert 1 <= retry_after <= 60
    assert response.headers["X-RateLimit-Remaining"] == "0"
    return retry_after


def test_default_limit_trips_exactly_at_the_limit(make_app):
    client = anonymous(make_app(ratelimit_default="5 per minute"))
    seen = []
    for path in ("/api/queue/stats", "/api/queue/all", "/api/openapi.json", "/api/queue/stats",
                 "/api/queue/pending"):
        response = client.get(path)
        assert response.status_code == 200, path
        assert response.headers["X-RateLimit-Limit"] == "5"
        assert int(response.headers["X-RateLimit-Reset"]) > time.time() - 1
        assert "Retry-After" not in response.headers
        seen.append(int(response.headers["X-RateLimit-Remaining"]))
    assert seen == [4, 3, 2, 1, 0]  # one budget across every endpoint
    assert_rate_limited(client.get("/api/queue/stats"))
    assert_rate_limited(client.get("/api/queue/all"))


def test_health_probes_and_metrics_are_exempt(make_app):
    client = anonymous(make_app(ratelimit_default="1 per minute"))
    assert client.get("/api/queue/stats").status_code == 200
    assert client.get("/api/queue/stats").status_code == 429
    for path in ("/api/health", "/livez", "/readyz", "/metrics"):
        for _ in range(3):
            response = client.get(path)
            assert response.status_code == 200, path
            assert "X-RateLimit-Limit" not in response.headers


def test_a_rejected_request_is_not_executed(make_app, session):
    app = make_app(ratelimit_default="1 per minute")
    client = app.test_client()  # carries the test admin key
    first, second = queue_message(session), queue_message(session)
    assert client.post(f"/api/queue/message/{first}/hold").status_code == 200
    assert_rate_limited(client.post(f"/api/queue/message/{second}/hold"))
    assert state_of(session, second) == "pending"


def test_limit_resets_after_the_window(make_app):
    client = anonymous(make_app(ratelimit_default="2 per second"))
    assert [client.get("/api/queue/stats").status_code for _ in range(2)] == [200, 200]
    refused = client.get("/api/queue/stats")
    assert_rate_limited(refused)
    reset_at = int(refused.headers["X-RateLimit-Reset"])
    # Wait for the window the server announced (at most a second), then the budget is back.
    time.sleep(max(0.0, reset_at - time.time()) + 0.05)
    response = client.get("/api/queue/stats")
    assert response.status_code == 200
    assert response.headers["X-RateLimit-Remaining"] == "1"


def test_client_is_the_key_when_valid_else_the_address(make_app, session):
    app = make_app(ratelimit_default="2 per minute")
    _, reader = keys.create_key(session, "reader", "read")
    here, there = anonymous(app, "10.0.0.1"), anonymous(app, "10.0.0.2")
    for _ in range(2):
        assert here.get("/api/queue/stats").status_code == 200
    assert_rate_limited(here.get("/api/queue/stats"))
    # Another address has its own budget...
    assert there.get("/api/queue/stats").status_code == 200
    # ... so has a valid key, from the exhausted address ...
    response = here.get("/api/queue/stats", headers={"X-API-Key": reader})
    assert response.status_code == 200 and response.headers["X-RateLimit-Remaining"] == "1"
    # ... which follows the key to another address (same budget).
    response = there.get("/api/queue/stats", headers={"Authorization": f"Bearer {reader}"})
    assert response.headers["X-RateLimit-Remaining"] == "0"
    assert_rate_limited(there.get("/api/queue/stats", headers={"X-API-Key": reader}))
    # A wrong key is no way around the limit: it counts as its address.
    assert_rate_limited(here.get("/api/queue/stats",
                                 headers={"X-API-Key": "elemta_" + uuid.uuid4().hex * 2}))


def test_strict_limit_on_bulk_actions_and_send_test(make_app, session):
    app = make_app(ratelimit_strict="3 per minute", ratelimit_default="100 per minute")
    client = app.test_client()
    message_id = queue_message(session, state="deferred")
    paths = ["/api/queue/deferred/retry?dry_run=true", "/api/queue/all/flush?dry_run=true",
             "/api/queue/pending/hold?dry_run=true"]
    for path in paths:
        response = client.post(path)
        assert response.status_code == 200, path
        assert response.headers["X-RateLimit-Limit"] == "3"
    assert_rate_limited(client.post("/api/queue/held/release?dry_run=true"))
    assert_rate_limited(client.post("/api/send-test", json={"from": "a@example.com",
                                                            "to": "b@example.net"}))
    # Reads and single-message actions use the default budget.
    response = client.get("/api/queue/stats")
    assert response.status_code == 200 and response.headers["X-RateLimit-Limit"] == "100"
    assert client.post(f"/api/queue/message/{message_id}/hold").status_code == 200


def test_send_test_has_the_strict_limit(make_app, session):
    app = make_app(ratelimit_strict="2 per minute")
    client = app.test_client()
    body = {"from": "a@example.com", "to": "b@example.net"}
    assert [client.post("/api/send-test", json=body).status_code for _ in range(2)] == [200, 200]
    assert_rate_limited(client.post("/api/send-test", json=body))


@pytest.mark.parametrize("hops", [0, 1])
def test_trusted_proxies(make_app, hops):
    app = make_app(ratelimit_default="1 per minute", trusted_proxies=hops)
    client = anonymous(app, "127.0.0.1")
    first = client.get("/api/queue/stats", headers={"X-Forwarded-For": "203.0.113.1"})
    assert first.status_code == 200
    second = client.get("/api/queue/stats", headers={"X-Forwarded-For": "203.0.113.2"})
    if hops:
        assert second.status_code == 200  # the proxy's word: another client
        assert_rate_limited(client.get("/api/queue/stats",
                                       headers={"X-Forwarded-For": "203.0.113.1"}))
    else:
        assert_rate_limited(second)  # a spoofed header changes nothing without a proxy


@pytest.mark.parametrize("value", ["lots", "600 per fortnight", ""])
def test_bad_limit_configuration_stops_the_start(make_app, value):
    from app.config import ConfigError

    with pytest.raises(ConfigError):
        make_app(ratelimit_default=value)


@pytest.fixture
def redis_prefix():
    """A key prefix of this test alone on the machine's Redis; its keys are removed after."""
    prefix = f"elemta-test-{uuid.uuid4().hex}"
    connection = redis.Redis.from_url(REDIS_URL)
    try:
        connection.ping()
    except redis.ConnectionError:
        connection.close()
        pytest.skip("Redis is not running on 127.0.0.1:6379")
    yield prefix
    for key in connection.scan_iter(f"*{prefix}*"):
        connection.delete(key)
    connection.close()


def close_storage(app) -> None:
    storage = limiter_of(app).storage
    storage.storage.connection_pool.disconnect()


def test_limits_are_shared_through_redis(make_app, redis_prefix):
    settings = {"ratelimit_default": "4 per minute", "ratelimit_storage_uri": REDIS_URL,
                "ratelimit_key_prefix": redis_prefix}
    one, two = make_app(**settings), make_app(**settings)
    try:
        a, b = anonymous(one), anonymous(two)
        remaining = []
        for client in (a, b, a, b):
            response = client.get("/api/queue/stats")
            assert response.status_code == 200
            remaining.append(response.headers["X-RateLimit-Remaining"])
        assert remaining == ["3", "2", "1", "0"]
        assert_rate_limited(a.get("/api/queue/stats"))
        assert_rate_limited(b.get("/api/queue/stats"))
        # Keys count separately there too, and the key itself never reaches Redis.
        response = b.get("/api/queue/stats", headers={"X-API-Key": TEST_ADMIN_KEY})
        assert response.status_code == 200
        connection = redis.Redis.from_url(REDIS_URL)
        stored = [k.decode() for k in connection.scan_iter(f"*{redis_prefix}*")]
        connection.close()
        assert stored and not any(TEST_ADMIN_KEY in k for k in stored)
    finally:
        close_storage(one)
        close_storage(two)


def test_two_apps_with_memory_storage_do_not_share(make_app):
    one = make_app(ratelimit_default="1 per minute")
    two = make_app(ratelimit_default="1 per minute")
    assert anonymous(one).get("/api/queue/stats").status_code == 200
    assert anonymous(two).get("/api/queue/stats").status_code == 200
    assert limiter_of(one) is not limiter_of(two)


def test_memory_storage_starts_no_thread_per_request_and_sweeps(make_app):
    from app.ratelimit import SweepingMemoryStorage

    app = make_app()
    storage = limiter_of(app).storage
    assert isinstance(storage, SweepingMemoryStorage)
    client = anonymous(app)
    for _ in range(20):
        assert client.get("/api/queue/stats").status_code == 200
    assert not storage.timer.is_alive()
    storage.incr("client-that-left", expiry=-1)  # a counter whose window is over
    storage.next_sweep = 0  # the sweep is due
    storage.incr("another", expiry=60)
    assert "client-that-left" not in storage.storage
    assert storage.get("another") == 1


def test_rate_limiting_can_be_switched_off(make_app):
    client = anonymous(make_app(ratelimit_enabled=False, ratelimit_default="1 per minute"))
    for _ in range(3):
        response = client.get("/api/queue/stats")
        assert response.status_code == 200
        assert "X-RateLimit-Limit" not in response.headers


def _trace(client) -> list[tuple]:
    """Statuses, rate-limit headers and error bodies of a mixed sequence of requests."""
    requests = [("GET", "/api/queue/stats"), ("POST", "/api/queue/pending/hold?dry_run=true"),
                ("GET", "/api/no/such/route"), ("GET", "/api/health"),
                ("OPTIONS", "/api/queue/stats"), ("GET", "/api/queue/all")] * 3
    requests += [("GET", "/api/queue/held"), ("POST", "/api/queue/all/flush?dry_run=true")]
    seen = []
    for method, path in requests:
        response = client.open(path, method=method)
        seen.append((method, path, response.status_code,
                     response.headers.get("X-RateLimit-Limit"),
                     response.headers.get("X-RateLimit-Remaining"),
                     "Retry-After" in response.headers,
                     response.get_json(silent=True) if response.status_code == 429 else None))
    return seen


def test_the_lean_check_counts_exactly_as_flask_limiter(make_app):
    """app/ratelimit.py's BudgetLimiter against Flask-Limiter's own resolution, same requests.

    RATELIMIT_FAIL_ON_FIRST_BREACH (true, the default either way) is one of the settings that
    send every request through Flask-Limiter's generic path.
    """
    # Two limits in one budget (windows start at a client's first hit: no clock dependence).
    limits = {"ratelimit_default": "6 per hour;4 per minute", "ratelimit_strict": "2 per minute"}
    lean = make_app(**limits)
    generic = make_app(**limits, ratelimit_fail_on_first_breach=True)
    assert limiter_of(lean).lean and not limiter_of(generic).lean
    traces = [_trace(app.test_client()) for app in (lean, generic)]
    assert traces[0] == traces[1]
    statuses = [status for _, _, status, *_ in traces[0]]
    assert 429 in statuses and 200 in statuses and 404 in statuses


def test_the_lean_check_keeps_its_decision_in_the_environ_not_flask_limiters_context(
        make_app):
    """The decision is made once and kept for the request in the WSGI environ: the headers
    come from it, Flask-Limiter's per-request context is never made, and ``current_limit`` /
    ``current_limits`` still answer as Flask-Limiter's would."""
    from app.ratelimit import DECISION

    app = make_app(ratelimit_default="6 per hour;4 per minute")
    limiter = limiter_of(app)
    seen = []

    @app.after_request
    def look(response):
        from flask import request

        current = limiter.current_limit
        seen.append((request.environ.get(DECISION), str(current.limit), current.key,
                     [str(lim.limit) for lim in limiter.current_limits]))
        return response

    for _ in range(2):
        response = anonymous(app).get("/api/queue/stats")
        assert response.status_code == 200
    assert response.headers["X-RateLimit-Limit"] == "4"
    assert response.headers["X-RateLimit-Remaining"] == "2"
    decision, limit, key, limits = seen[-1]
    assert decision is not None and decision.remaining == 2 and not decision.breached
    assert limit == "4 per 1 minute" and key == decision.key
    assert limits == ["4 per 1 minute", "6 per 1 hour"]
    with app.test_request_context("/api/queue/stats",
                                  environ_base={"REMOTE_ADDR": "127.0.0.1"}) as context:
        assert app.preprocess_request() is None
        assert context.request.environ[DECISION].remaining == 1
        assert not hasattr(context, "_limiter_request_context")


def test_unknown_routes_and_wrong_methods_count_too(make_app):
    """docs/SECURITY.md: every request counts; a limited client gets 429, not 404s."""
    client = anonymous(make_app(ratelimit_default="3 per minute"))
    first = client.get("/api/no/such/route")
    assert_error(first, 404, "NOT_FOUND")
    assert first.headers["X-RateLimit-Remaining"] == "2"
    assert_error(client.get("/api/queue/all/flush"), 405, "METHOD_NOT_ALLOWED")
    assert client.get("/api/queue/stats").status_code == 200
    assert_rate_limited(client.get("/api/no/such/route"))
    assert_rate_limited(client.get("/nowhere"))


def _remaining_under_concurrency(apps, requests: int) -> list[int]:
    from concurrent.futures import ThreadPoolExecutor

    clients = [anonymous(app) for app in apps]

    def one(index: int) -> int:
        response = clients[index % len(clients)].get("/api/queue/stats")
        assert response.status_code == 200
        return int(response.headers["X-RateLimit-Remaining"])

    with ThreadPoolExecutor(max_workers=12) as pool:
        return list(pool.map(one, range(requests)))


def test_remaining_never_repeats_under_concurrency(make_app):
    seen = _remaining_under_concurrency([make_app(ratelimit_default="100 per minute")], 48)
    assert sorted(seen) == list(range(52, 100))  # one value per request, none repeated


def test_remaining_never_repeats_across_workers_sharing_redis(make_app, redis_prefix):
    settings = {"ratelimit_default": "100 per minute", "ratelimit_storage_uri": REDIS_URL,
                "ratelimit_key_prefix": redis_prefix}
    apps = [make_app(**settings), make_app(**settings)]
    try:
        seen = _remaining_under_concurrency(apps, 48)
        assert sorted(seen) == list(range(52, 100))
    finally:
        for app in apps:
            close_storage(app)

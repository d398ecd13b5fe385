"""Hardening (API.md §1 and §9): CORS, headers, body limits, hostile parameters, every error status.

Hostile strings (SQL injection, path traversal, NUL, LIKE wildcards, markup) go into every
parameter of every operation of the OpenAPI document: nothing may change in the database and no
response may carry internals (stack traces, SQL, paths, driver names, key hashes).
"""

from __future__ import annotations

import io
from urllib.parse import quote

import pytest
import sqlalchemy as sa

from app.auth.keys import NAME_PATTERN
from app.models import ApiKey, Message, Recipient
from tests.helpers import assert_error, queue_message, state_of

ORIGIN = "https://admin.example.com"


# --- CORS --------------------------------------------------------------------------------

def preflight(client, path: str, origin: str, method: str = "GET", headers: str | None = None):
    request_headers = {"Origin": origin, "Access-Control-Request-Method": method}
    if headers:
        request_headers["Access-Control-Request-Headers"] = headers
    return client.options(path, headers=request_headers)


def anonymous(app):
    from flask.testing import FlaskClient

    return FlaskClient(app, app.response_class)


def test_preflight_from_an_allowed_origin(make_app, session):
    client = anonymous(make_app(cors_origins=f"{ORIGIN}, https://other.example"))
    message_id = queue_message(session)
    response = preflight(client, f"/api/queue/message/{message_id}/hold", ORIGIN, "POST",
                         "authorization, content-type")
    assert response.status_code == 204
    assert response.data == b""
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert {m.strip() for m in response.headers["Access-Control-Allow-Methods"].split(",")} \
        >= {"POST", "OPTIONS"}
    allow_headers = response.headers["Access-Control-Allow-Headers"]
    allowed = {h.strip().lower() for h in allow_headers.split(",")}
    assert {"authorization", "content-type", "x-api-key"} <= allowed
    assert "Origin" in response.headers["Vary"]
    assert state_of(session, message_id) == "pending"  # a preflight does nothing
    methods = preflight(client, f"/api/queue/message/{message_id}", ORIGIN, "DELETE")
    assert {"GET", "DELETE"} <= {m.strip() for m in
                                 methods.headers["Access-Control-Allow-Methods"].split(",")}


def test_preflight_from_a_disallowed_origin(make_app):
    for app in (make_app(cors_origins=ORIGIN), make_app()):  # configured, and the default: none
        client = anonymous(app)
        response = preflight(client, "/api/queue/stats", "https://evil.example")
        assert_error(response, 403, "FORBIDDEN")
        assert "Access-Control-Allow-Origin" not in response.headers
        assert "Origin" in response.headers["Vary"]
        actual = client.get("/api/queue/stats", headers={"Origin": "https://evil.example"})
        assert actual.status_code == 200
        assert "Access-Control-Allow-Origin" not in actual.headers


def test_actual_cross_origin_request_gets_allow_and_expose_headers(make_app):
    client = anonymous(make_app(cors_origins=ORIGIN))
    response = client.get("/api/queue/all", headers={"Origin": ORIGIN})
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
    exposed = response.headers["Access-Control-Expose-Headers"]
    for name in ("X-Request-ID", "X-Total-Count", "Link", "X-RateLimit-Remaining", "Retry-After"):
        assert name in exposed
    assert "Origin" in response.headers["Vary"]
    # Errors are readable cross-origin too (the page can show the message).
    refused = client.post("/api/queue/all/flush", headers={"Origin": ORIGIN})
    assert refused.status_code == 401
    assert refused.headers["Access-Control-Allow-Origin"] == ORIGIN


def test_wildcard_origin_and_unknown_route(make_app):
    client = anonymous(make_app(cors_origins="*"))
    response = preflight(client, "/api/queue/stats", "https://anything.example")
    assert response.status_code == 204
    assert response.headers["Access-Control-Allow-Origin"] == "https://anything.example"
    assert_error(preflight(client, "/api/nowhere", "https://anything.example"), 404, "NOT_FOUND")


# --- headers ------------------------------------------------------------------------------

@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/api/queue/stats"), ("GET", "/livez"), ("GET", "/api/nowhere"),
    ("POST", "/api/queue/all/flush"), ("PUT", "/api/queue/stats"), ("GET", "/api/openapi.json"),
])
def test_security_headers_on_every_response(make_app, method, path):
    response = anonymous(make_app()).open(path, method=method)
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["Referrer-Policy"] == "no-referrer"
    assert len(response.headers["X-Request-ID"]) >= 8
    if path.startswith("/api"):
        assert response.headers["Cache-Control"] == "no-store"


# --- request size ---------------------------------------------------------------------------

def test_oversized_bodies_are_413_and_change_nothing(make_app, session):
    app = make_app(max_request_bytes=2048)
    client = app.test_client()
    big = {"name": "big", "role": "admin", "padding": "x" * 4096}
    assert_error(client.post("/api/auth/keys", json=big), 413, "PAYLOAD_TOO_LARGE")
    assert_error(client.post("/api/send-test", json={"from": "a@example.com",
                                                     "to": "b@example.net", "body": "x" * 4096}),
                 413, "PAYLOAD_TOO_LARGE")
    assert session.scalar(sa.select(sa.func.count()).select_from(ApiKey)) == 1
    assert session.scalar(sa.select(sa.func.count()).select_from(Message)) == 0
    # Without a Content-Length (chunked), the limit holds while reading.
    chunked = client.post("/api/auth/keys", input_stream=io.BytesIO(b'{"name": "' + b"y" * 8192),
                          content_type="application/json",
                          headers={"Transfer-Encoding": "chunked"},
                          # What a server sets for a chunked body (gunicorn does).
                          environ_overrides={"wsgi.input_terminated": True})
    assert_error(chunked, 413, "PAYLOAD_TOO_LARGE")
    assert session.scalar(sa.select(sa.func.count()).select_from(ApiKey)) == 1
    fits = client.post("/api/auth/keys",
                       input_stream=io.BytesIO(b'{"name": "chunky", "role": "read"}'),
                       content_type="application/json", headers={"Transfer-Encoding": "chunked"},
                       environ_overrides={"wsgi.input_terminated": True})
    assert fits.status_code == 201
    # At the limit is fine.
    small = client.post("/api/auth/keys", json={"name": "small", "role": "read"})
    assert small.status_code == 201


# --- hostile parameters -----------------------------------------------------------------------

HOSTILE = [
    "' OR '1'='1",
    "'; DROP TABLE messages; --",
    "\" OR 1=1 --",
    "1; DELETE FROM api_keys",
    "' UNION SELECT name, prefix FROM api_keys --",
    "%",
    "_",
    "../../../../etc/passwd",
    "..%2F..%2F..%2Fetc%2Fpasswd",
    "....//....//etc/passwd",
    "..\\..\\..\\windows\\win.ini",
    "/etc/passwd",
    "\x00",
    "a\x00b",
    "<script>alert(1)</script>",
    "${jndi:ldap://x}",
    "msg-' OR 1=1 --",
    "9" * 40,
    "-1",
    # Instants at the calendar's edges that UTC cannot represent (year 0, year 10000), and
    # cursors carrying them or an id beyond any integer column.
    "0001-01-01T00:00:00+05:00",
    "9999-12-31T23:59:59-05:00",
    "WyIwMDAxLTAxLTAxVDAwOjAwOjAwKzA1OjAwIiwibXNnLWFhYWFhYWFhIl0",
    "WyJlMSIsIDk5OTk5OTk5OTk5OTk5OTk5OTk5OTk5XQ",
]
LEAK_MARKERS = ("Traceback", "sqlalchemy", "psycopg", "sqlite3", "OperationalError",
                "ProgrammingError", "DataError", "IntegrityError", "site-packages", "/work/",
                'File "', "root:x:0:0", "[extensions]")


def snapshot(session) -> dict:
    session.expire_all()
    return {
        "messages": sorted(session.execute(sa.select(Message.id, Message.queue_state,
                                                     Message.attempts)).all()),
        "recipients": sorted(session.execute(sa.select(Recipient.id, Recipient.status)).all()),
        "keys": sorted(session.execute(sa.select(ApiKey.id, ApiKey.name, ApiKey.revoked)).all()),
    }


def operations(client) -> list[tuple[str, str, list[dict]]]:
    spec = client.get("/api/openapi.json").get_json()
    found = []
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            if method == "parameters" or path.endswith("/ws"):
                continue
            params = operation.get("parameters", []) + item.get("parameters", [])
            found.append((method.upper(), path, params))
    return found


def assert_no_leak(response, key_hashes: list[str], label: str) -> None:
    assert response.status_code < 500, (label, response.get_data(as_text=True))
    text = response.get_data(as_text=True)
    for marker in LEAK_MARKERS + tuple(key_hashes):
        assert marker not in text, (label, marker, text[:500])
    if response.status_code >= 400:
        body = response.get_json()
        assert set(body) == {"error", "code", "details"}, (label, body)


def test_hostile_strings_in_every_parameter_change_nothing_and_leak_nothing(make_app, session):
    client = make_app(ratelimit_default="100000 per minute",
                      ratelimit_strict="100000 per minute").test_client()
    for state in ("pending", "deferred", "held", "failed"):
        queue_message(session, state=state)
    real_id = queue_message(session, state="deferred")
    key_hashes = list(session.scalars(sa.select(ApiKey.key_hash)))
    key_id = session.scalar(sa.select(sa.func.max(ApiKey.id)))
    before = snapshot(session)
    # No hostile string is a domain name, so the domain check refuses each before any DNS.
    defaults = {"message_id": real_id, "queue_type": "all", "key_id": str(key_id + 1000),
                "domain": "example.invalid", "webhook_id": "999999", "delivery_id": "999999"}
    count = 0
    for method, template, params in operations(client):
        for param in params:
            for hostile in HOSTILE:
                path = template
                for other in params:
                    if other["in"] == "path" and other["name"] != param["name"]:
                        path = path.replace("{" + other["name"] + "}", defaults[other["name"]])
                query = ""
                if param["in"] == "path":
                    path = path.replace("{" + param["name"] + "}", quote(hostile, safe=""))
                else:
                    path = path.replace("{message_id}", defaults["message_id"])
                    query = f"?{param['name']}={quote(hostile, safe='')}"
                label = f"{method} {path}{query}"
                response = client.open(path + query, method=method)
                count += 1
                assert_no_leak(response, key_hashes, label)
                if method != "GET" and response.status_code == 200:
                    # A mutation may only "succeed" by matching nothing.
                    assert response.get_json().get("count", 0) == 0, label
    assert count > 300
    assert snapshot(session) == before


@pytest.mark.parametrize("hostile", HOSTILE)
def test_hostile_strings_in_bodies(make_app, session, hostile):
    client = make_app(ratelimit_strict="100000 per minute").test_client()
    key_hashes = list(session.scalars(sa.select(ApiKey.key_hash)))
    before = snapshot(session)
    payloads = [{"name": "ok", "role": hostile},
                {"name": "ok", "role": "read", "expires_days": hostile}]
    if not NAME_PATTERN.match(hostile):  # "999...9" is a fine key name
        payloads.append({"name": hostile, "role": "read"})
    for payload in payloads:
        response = client.post("/api/auth/keys", json=payload)
        assert_no_leak(response, key_hashes, repr(payload))
        assert response.status_code == 400
    for payload in ({"from": hostile, "to": "b@example.net"},
                    {"from": "a@example.com", "to": hostile},
                    {"from": "a@example.com", "to": [hostile]}):
        response = client.post("/api/send-test", json=payload)
        assert_no_leak(response, key_hashes, repr(payload))
        assert response.status_code == 400, payload
    assert snapshot(session) == before
    # Where a hostile string is valid data (a subject, a body), it is stored as it was sent.
    if "\x00" not in hostile:
        response = client.post("/api/send-test", json={"from": "a@example.com",
                                                       "to": "b@example.net",
                                                       "subject": hostile, "body": hostile})
        assert_no_leak(response, key_hashes, "subject")
        assert response.status_code == 200
        detail = client.get(f"/api/queue/message/{response.get_json()['message_id']}").get_json()
        assert detail["subject"] == hostile


@pytest.mark.parametrize("unstorable", ["\ud800", "a\udfffb", "\x00"])
def test_unstorable_characters_in_json_bodies_are_refused(make_app, session, unstorable):
    """A lone surrogate (JSON "\\ud800") cannot become UTF-8: refused like NUL, never a 500."""
    client = make_app(ratelimit_strict="100000 per minute").test_client()
    before = snapshot(session)
    for path, payload in (
            ("/api/send-test", {"from": "a@example.com", "to": "b@example.net",
                                "subject": unstorable}),
            ("/api/send-test", {"from": "a@example.com", "to": "b@example.net",
                                "body": unstorable}),
            ("/api/auth/keys", {"name": "ok", "role": "read", unstorable: 1})):
        assert_error(client.post(path, json=payload), 400, "VALIDATION_ERROR")
    assert snapshot(session) == before


@pytest.mark.parametrize("depth", [33, 900, 1000, 100_000])
def test_deeply_nested_json_bodies_are_400_and_change_nothing(make_app, session, depth):
    """``[[[...]]]`` once reached RecursionError (a 500) in the parser and the NUL check."""
    client = make_app(ratelimit_strict="100000 per minute").test_client()
    before = snapshot(session)
    nested = "[" * depth + '"b@example.net"' + "]" * depth
    for path, body in (
            ("/api/send-test", f'{{"from": "a@example.com", "to": {nested}}}'),
            ("/api/auth/keys", f'{{"name": "ok", "role": "read", "x": {nested}}}'),
            ("/api/auth/keys", '{"name": ' + '{"a": ' * depth + "1" + "}" * depth + "}"),
            ("/api/dkim/keys", f'{{"domain": "example.com", "selector": {nested}}}')):
        response = client.post(path, data=body, content_type="application/json")
        assert_error(response, 400, "INVALID_JSON")
    assert snapshot(session) == before


def test_brackets_inside_json_strings_do_not_count_as_nesting(make_app, session):
    client = make_app(ratelimit_strict="100000 per minute").test_client()
    subject = "[" * 200 + '\\"{' * 50
    response = client.post("/api/send-test", data=(
        '{"from": "a@example.com", "to": ["b@example.net"], "subject": "' + subject + '"}'),
        content_type="application/json")
    assert response.status_code == 200, response.get_json()


def test_path_traversal_on_the_docs_assets(client):
    for path in ("/api/docs/static/../../../etc/passwd",
                 "/api/docs/static/%2e%2e/%2e%2e/app/config.py",
                 "/api/docs/static/..%2F..%2Fapp%2Fconfig.py", "/api/docs/static/%00"):
        response = client.get(path)
        assert response.status_code in (400, 404), path
        assert b"root:x:0:0" not in response.data and b"ELEMTA_" not in response.data


# --- every error status of API.md §1, with its exact body ---------------------------------------

def test_error_statuses_of_the_contract(make_app, session, anonymous_client, client):
    message_id = queue_message(session, state="held")
    cases = [
        (client.get("/api/queue/nonsense"), 400, "VALIDATION_ERROR"),
        (client.post("/api/auth/keys", data="{not json", content_type="application/json"),
         400, "INVALID_JSON"),
        (anonymous_client.post(f"/api/queue/message/{message_id}/release"), 401, "UNAUTHORIZED"),
        (client.get("/api/queue/message/msg-doesnotexist"), 404, "MESSAGE_NOT_FOUND"),
        (client.get("/api/no/such/route"), 404, "NOT_FOUND"),
        (client.patch("/api/queue/stats"), 405, "METHOD_NOT_ALLOWED"),
        (client.post(f"/api/queue/message/{message_id}/retry"), 409, "CONFLICT"),
        (client.post("/api/auth/keys", data="name=x", content_type="text/plain"),
         415, "UNSUPPORTED_MEDIA_TYPE"),
    ]
    for response, status, code in cases:
        body = assert_error(response, status, code)
        assert body["details"] is None or isinstance(body["details"], (str, dict))
    assert cases[2][0].headers["WWW-Authenticate"] == "Bearer"
    assert "GET" in cases[5][0].headers["Allow"]
    for response, *_ in cases:
        assert response.headers["Content-Type"] == "application/json"


def test_403_body(make_app, session, anonymous_client):
    from app.auth import keys

    _, reader = keys.create_key(session, "reader", "read")
    response = anonymous_client.delete("/api/queue/message/msg-x", headers={"X-API-Key": reader})
    body = assert_error(response, 403, "FORBIDDEN")
    assert body["details"] is None


def test_413_and_429_bodies(make_app):
    client = anonymous(make_app(max_request_bytes=10, ratelimit_default="1 per minute"))
    assert_error(client.post("/api/auth/keys", data=b"x" * 100, content_type="application/json"),
                 413, "PAYLOAD_TOO_LARGE")
    client.get("/api/queue/stats")
    limited = client.get("/api/queue/stats")
    body = assert_error(limited, 429, "RATE_LIMITED")
    assert body["details"] is None and int(limited.headers["Retry-After"]) >= 1


def test_500_has_no_internals(make_app):
    app = make_app()

    @app.post("/api/_test_failure")
    def failing_view():
        raise ValueError("SELECT key_hash FROM api_keys WHERE 1 -- /srv/elemta/app/secret.py")

    response = app.test_client().post("/api/_test_failure")
    body = assert_error(response, 500, "INTERNAL_ERROR")
    assert body == {"error": "Internal server error", "code": "INTERNAL_ERROR", "details": None}
    for leak in ("SELECT", "key_hash", "secret.py", "ValueError", "Traceback"):
        assert leak not in response.get_data(as_text=True)
    assert response.headers["X-Request-ID"]


def test_503_when_the_database_is_unreachable(make_app):
    from app.auth.keys import hash_key  # noqa: F401  (the key check needs the database too)

    app = make_app(database_url="postgresql+psycopg://postgres@127.0.0.1:1/nowhere")
    client = app.test_client()
    for response in (client.get("/api/queue/stats"), client.post("/api/queue/all/flush"),
                     anonymous(app).get("/api/queue/all")):
        body = assert_error(response, 503, "SERVICE_UNAVAILABLE")
        assert body["details"] is None
        assert "127.0.0.1" not in response.get_data(as_text=True)
    # The probe that does not need the database still answers.
    assert client.get("/livez").status_code == 200


def test_api_key_in_a_websocket_query_never_reaches_the_access_log():
    import json
    import logging

    from app.logging_setup import _ACCESS_FIELDS, JsonFormatter

    atoms = dict.fromkeys(_ACCESS_FIELDS, "-")
    atoms.update({"h": "127.0.0.1", "m": "GET", "U": "/api/queue/ws", "s": "101", "B": "0",
                  "D": "1500", "q": "since_event=3&api_key=elemta_secretsecretsecret&x=1"})
    record = logging.LogRecord("gunicorn.access", logging.INFO, __file__, 1, "%(h)s", (), None)
    record.args = atoms
    line = json.loads(JsonFormatter(role="api").format(record))
    assert "elemta_secret" not in json.dumps(line)
    assert line["query"] == "since_event=3&api_key=[redacted]&x=1"


def test_the_unstorable_check_walks_any_depth():
    """It also guards values that never went through the JSON parser (the URL, the CLI)."""
    from app.http import contains_unstorable

    nested: list = ["ok"]
    for _ in range(100_000):
        nested = [nested, {"k": "v"}]
    assert contains_unstorable(nested) is False
    assert contains_unstorable([nested, {"k": ["\x00"]}]) is True

"""The contract's error shape for failures that do not come from a view."""

from __future__ import annotations

import logging

import pytest

from tests.helpers import assert_error, queue_message, state_of


def test_unknown_route_is_404_not_found(client):
    body = assert_error(client.get("/api/nothing/here"), 404, "NOT_FOUND")
    assert body["details"] is None


def test_wrong_method_is_405_with_allow(client, session):
    message_id = queue_message(session)
    response = client.put(f"/api/queue/message/{message_id}")
    assert_error(response, 405, "METHOD_NOT_ALLOWED")
    allowed = {m.strip() for m in response.headers["Allow"].split(",")}
    assert {"GET", "DELETE"} <= allowed
    response = client.get("/api/queue/all/flush")
    assert_error(response, 405, "METHOD_NOT_ALLOWED")
    assert "POST" in response.headers["Allow"]


def test_oversized_body_is_413_and_changes_nothing(make_app, session):
    app = make_app(max_request_bytes=1024)
    message_id = queue_message(session, state="deferred")
    response = app.test_client().post(f"/api/queue/message/{message_id}/hold", data=b"x" * 4096,
                                      content_type="application/json")
    assert_error(response, 413, "PAYLOAD_TOO_LARGE")
    assert state_of(session, message_id) == "deferred"


def test_unexpected_exception_is_500_without_internals(make_app):
    app = make_app()

    @app.get("/api/_boom")
    def boom():
        raise RuntimeError("SELECT secret FROM /etc/passwd at /srv/app/secret.py line 3")

    response = app.test_client().get("/api/_boom")
    body = assert_error(response, 500, "INTERNAL_ERROR")
    text = response.get_data(as_text=True)
    for leak in ("SELECT", "/etc/passwd", "secret.py", "Traceback", "RuntimeError"):
        assert leak not in text
    assert body["details"] is None


def test_database_unreachable_is_503(database_url, caplog):
    from app import create_app

    app = create_app({"DATABASE_URL": "postgresql+psycopg://postgres@127.0.0.1:1/nowhere",
                      "TESTING": True, "AUTH_MODE": "off"})
    with caplog.at_level(logging.ERROR, logger="elemta.errors"):
        response = app.test_client().get("/api/queue/stats")
    assert_error(response, 503, "SERVICE_UNAVAILABLE")
    assert "127.0.0.1" not in response.get_data(as_text=True)
    # The log names the error's class and the driver's (no SQLSTATE: the server never answered).
    [line] = [r.getMessage() for r in caplog.records if r.name == "elemta.errors"]
    assert line.startswith("database unavailable: OperationalError (psycopg.OperationalError): "
                           "connection failed:"), line


def test_a_conflict_that_escapes_a_request_is_409_not_503(make_app, caplog):
    """A deadlock means a healthy database: the client may simply try again."""
    import psycopg
    import sqlalchemy.exc as sa_exc

    app = make_app()

    @app.post("/api/_deadlock")
    def deadlocked():
        raise sa_exc.OperationalError("UPDATE messages ...", {},
                                      psycopg.errors.DeadlockDetected("deadlock detected"))

    with caplog.at_level(logging.WARNING, logger="elemta.errors"):
        response = app.test_client().post("/api/_deadlock")
    body = assert_error(response, 409, "CONFLICT")
    assert body["error"] == "The request conflicted with concurrent changes; try again"
    assert "deadlock" not in response.get_data(as_text=True)
    assert [r.getMessage() for r in caplog.records if r.name == "elemta.errors"] == [
        "database conflict: OperationalError (psycopg.errors.DeadlockDetected, "
        "SQLSTATE 40P01): deadlock detected"]


@pytest.mark.parametrize("path", ["/api/queue/stats", "/api/nowhere"])
def test_every_response_carries_request_id_and_security_headers(client, path):
    response = client.get(path, headers={"X-Request-ID": "abc-123"})
    assert response.headers["X-Request-ID"] == "abc-123"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["Referrer-Policy"] == "no-referrer"
    assert response.headers["Cache-Control"] == "no-store"
    generated = client.get(path, headers={"X-Request-ID": "bad id <script>" + "x" * 200})
    assert generated.headers["X-Request-ID"] != "bad id"
    assert len(generated.headers["X-Request-ID"]) == 32


def test_openapi_document_lists_every_route_of_the_application(app, client):
    """Nothing the server answers is missing from /api/docs (the UI and its assets aside)."""
    import re

    documented = {(path, method) for path, item in
                  client.get("/api/openapi.json").get_json()["paths"].items()
                  for method in item if method != "parameters"}
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith(("/api/docs", "/api/openapi.json", "/static", "/ui")):
            continue
        path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule)
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            assert (path, method.lower()) in documented, (path, method)


def test_openapi_document_lists_every_queue_endpoint(client):
    spec = client.get("/api/openapi.json").get_json()
    paths = spec["paths"]
    for path, methods in {
        "/api/queue/stats": {"get"},
        "/api/queue/{queue_type}": {"get"},
        "/api/queue/{queue_type}/flush": {"post"},
        "/api/queue/{queue_type}/retry": {"post"},
        "/api/queue/{queue_type}/hold": {"post"},
        "/api/queue/{queue_type}/release": {"post"},
        "/api/queue/message/{message_id}": {"get", "delete"},
        "/api/queue/message/{message_id}/retry": {"post"},
        "/api/queue/message/{message_id}/hold": {"post"},
        "/api/queue/message/{message_id}/release": {"post"},
    }.items():
        assert methods <= set(paths[path]), path
    listing = paths["/api/queue/{queue_type}"]["get"]
    assert {p["name"] for p in listing["parameters"]} >= {"limit", "cursor", "sender", "domain"}
    assert "400" in listing["responses"] or "default" in listing["responses"]
    docs = client.get("/api/docs")
    assert docs.status_code == 200 and b"openapi.json" in docs.data
    # The UI's assets are served locally (no CDN): the page works on an air-gapped host.
    assert b"/api/docs/static/swagger-ui-bundle.js" in docs.data
    asset = client.get("/api/docs/static/swagger-ui-bundle.js")
    assert asset.status_code == 200 and len(asset.data) > 100_000
    asset.close()
    assert_error(client.get("/api/docs/static/../../app/config.py"), 404, "NOT_FOUND")


def test_doubled_slashes_are_a_json_404_not_a_redirect(client):
    """Werkzeug merged them with a 308 and an HTML body (a POST bounced to another URL)."""
    for method, path in (("POST", "/api//queue/all/flush"), ("GET", "//api/queue/stats"),
                         ("GET", "/api/queue//stats"), ("DELETE", "/api/auth//keys/1")):
        body = assert_error(client.open(path, method=method), 404, "NOT_FOUND")
        assert body["details"] is None

"""``/api/webhooks`` and ``flask webhook``: the resource, the secret shown once, admin only,
and bad input answered with the contract's error while nothing changes."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa

from app.extensions import db
from app.models import Webhook, WebhookDelivery
from app.timeutil import utcnow
from tests.helpers import assert_error

URL = "https://hooks.example.com/elemta"


def create(client, **body):
    payload = {"url": URL, "event_types": ["delivered", "failed"], **body}
    response = client.post("/api/webhooks", json=payload)
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def snapshot(app):
    """Everything a request could change: the webhooks (secrets too) and their deliveries."""
    with app.app_context():
        hooks = db.session.execute(sa.select(
            Webhook.id, Webhook.url, Webhook.event_types, Webhook.description, Webhook.secret,
            Webhook.active, Webhook.event_floor, Webhook.updated_at).order_by(Webhook.id)).all()
        deliveries = db.session.execute(sa.select(
            WebhookDelivery.id, WebhookDelivery.status, WebhookDelivery.next_attempt_at,
            WebhookDelivery.retry_until)).all()
        db.session.remove()
    return [tuple(h) for h in hooks], [tuple(d) for d in deliveries]


def add_delivery(app, webhook_id, status="delivered"):
    now = utcnow()
    with app.app_context():
        delivery = WebhookDelivery(webhook_id=webhook_id, event_id=1, event_type="delivered",
                                   message_id="m1", payload="{}", status=status, attempts=1,
                                   created_at=now, retry_until=now, next_attempt_at=None)
        db.session.add(delivery)
        db.session.commit()
        delivery_id = delivery.id
        db.session.remove()
    return delivery_id


def test_create_shows_the_secret_once(client):
    body = create(client, description="CRM")
    assert body["secret"].startswith("whsec_") and len(body["secret"]) > 40
    assert body["event_types"] == ["delivered", "failed"]
    assert (body["url"], body["description"], body["active"]) == (URL, "CRM", True)
    listed = client.get("/api/webhooks").get_json()
    assert [h["id"] for h in listed] == [body["id"]]
    assert "secret" not in listed[0]
    assert "secret" not in client.get(f"/api/webhooks/{body['id']}").get_json()


def test_a_given_secret_is_kept_and_rotation_shows_the_new_one(app, client):
    body = create(client, secret="s" * 32)
    assert body["secret"] == "s" * 32
    changed = client.patch(f"/api/webhooks/{body['id']}", json={"rotate_secret": True})
    assert changed.status_code == 200
    new = changed.get_json()["secret"]
    assert new.startswith("whsec_") and new != "s" * 32
    with app.app_context():
        assert db.session.get(Webhook, body["id"]).secret == new
        db.session.remove()
    plain = client.patch(f"/api/webhooks/{body['id']}", json={"description": "x"}).get_json()
    assert plain["secret"] is None and plain["description"] == "x"


def test_update_and_delete(client, app):
    body = create(client)
    response = client.patch(f"/api/webhooks/{body['id']}", json={
        "url": "http://10.0.0.5:8080/in", "event_types": ["held", "queued", "held"],
        "active": False})
    assert response.status_code == 200
    hook = response.get_json()
    # Duplicates dropped, kept in the documented order.
    assert (hook["url"], hook["event_types"], hook["active"]) == (
        "http://10.0.0.5:8080/in", ["queued", "held"], False)
    add_delivery(app, body["id"])
    response = client.delete(f"/api/webhooks/{body['id']}")
    assert response.status_code == 200 and response.get_json()["status"] == "success"
    assert_error(client.get(f"/api/webhooks/{body['id']}"), 404, "NOT_FOUND")
    assert snapshot(app) == ([], [])  # its history went with it


def test_deliveries_are_paged_newest_first(client, app):
    hook = create(client)
    ids = [add_delivery(app, hook["id"]) for _ in range(1)]
    with app.app_context():
        for event_id in range(2, 6):
            now = utcnow()
            db.session.add(WebhookDelivery(
                webhook_id=hook["id"], event_id=event_id, event_type="failed",
                message_id=f"m{event_id}", payload="{}", status="pending", attempts=0,
                created_at=now, retry_until=now, next_attempt_at=now))
        db.session.commit()
        ids = db.session.scalars(sa.select(WebhookDelivery.id)
                                 .order_by(WebhookDelivery.id.desc())).all()
        db.session.remove()
    first = client.get(f"/api/webhooks/{hook['id']}/deliveries?limit=2")
    body = first.get_json()
    assert [d["id"] for d in body["deliveries"]] == ids[:2]
    assert body["count"] == 2 and 'rel="next"' in first.headers["Link"]
    rest = client.get(f"/api/webhooks/{hook['id']}/deliveries?limit=10&cursor="
                      f"{body['next_cursor']}").get_json()
    assert [d["id"] for d in rest["deliveries"]] == ids[2:] and rest["next_cursor"] is None
    pending = client.get(f"/api/webhooks/{hook['id']}/deliveries?status=pending").get_json()
    assert {d["status"] for d in pending["deliveries"]} == {"pending"} and pending["count"] == 4
    one = client.get(f"/api/webhooks/{hook['id']}/deliveries?message_id=m3").get_json()
    assert [d["event_id"] for d in one["deliveries"]] == ["evt_3"]
    single = client.get(f"/api/webhooks/{hook['id']}/deliveries/{ids[0]}")
    assert single.status_code == 200 and single.get_json()["attempt_log"] == []


BAD_CREATE = [
    {"url": "ftp://example.com/x", "event_types": ["delivered"]},
    {"url": "javascript:alert(1)", "event_types": ["delivered"]},
    {"url": "file:///etc/passwd", "event_types": ["delivered"]},
    {"url": "gopher://127.0.0.1:6379/_FLUSHALL", "event_types": ["delivered"]},
    {"url": "http://", "event_types": ["delivered"]},
    {"url": "example.com/hook", "event_types": ["delivered"]},
    {"url": "https://user:pw@example.com/x", "event_types": ["delivered"]},
    {"url": "https://example.com/x#frag", "event_types": ["delivered"]},
    {"url": "https://example.com:99999/x", "event_types": ["delivered"]},
    {"url": "https://exa mple.com/x", "event_types": ["delivered"]},
    {"url": "https://example.com/" + "a" * 2100, "event_types": ["delivered"]},
    {"url": URL, "event_types": []},
    {"url": URL, "event_types": ["delivered", "opened"]},
    {"url": URL, "event_types": "delivered"},
    {"url": URL},
    {"event_types": ["delivered"]},
    {"url": 42, "event_types": ["delivered"]},
    {"url": URL, "event_types": ["delivered"], "secret": "short"},
    {"url": URL, "event_types": ["delivered"], "secret": "has spaces in it, sixteen+"},
    {"url": URL, "event_types": ["delivered"], "description": "d" * 201},
    {"url": URL, "event_types": ["delivered"], "active": "maybe"},
    {"url": URL, "event_types": ["delivered"], "colour": "blue"},
]


@pytest.mark.parametrize("body", BAD_CREATE)
def test_bad_create_bodies_change_nothing(client, app, body):
    create(client)
    before = snapshot(app)
    response = assert_error(client.post("/api/webhooks", json=body), 400, "VALIDATION_ERROR")
    assert response["details"]
    assert snapshot(app) == before


BAD_UPDATE = [
    {"url": "ftp://example.com/x"},
    {"url": ""},
    {"event_types": []},
    {"event_types": ["nope"]},
    {"active": "yes please"},
    {"secret": "short"},
    {"secret": "s" * 32, "rotate_secret": True},
    {"description": "d" * 201},
    {"unknown": 1},
    # A valid field beside an invalid one: all or nothing.
    {"description": "new", "url": "mailto:x@example.com"},
]


@pytest.mark.parametrize("body", BAD_UPDATE)
def test_bad_update_bodies_change_nothing(client, app, body):
    hook = create(client)
    before = snapshot(app)
    assert_error(client.patch(f"/api/webhooks/{hook['id']}", json=body), 400,
                 "VALIDATION_ERROR")
    assert snapshot(app) == before


@pytest.mark.parametrize(("method", "path"), [
    ("post", "/api/webhooks"),
    ("patch", "/api/webhooks/{id}"),
])
def test_malformed_json_and_other_content_types(client, app, method, path):
    hook = create(client)
    before = snapshot(app)
    url = path.format(id=hook["id"])
    assert_error(getattr(client, method)(url, data="{not json", content_type="application/json"),
                 400, "INVALID_JSON")
    assert_error(getattr(client, method)(url, data="url=x", content_type="text/plain"),
                 415, "UNSUPPORTED_MEDIA_TYPE")
    assert snapshot(app) == before


@pytest.mark.parametrize(("method", "path"), [
    ("get", "/api/webhooks/{missing}"),
    ("patch", "/api/webhooks/{missing}"),
    ("delete", "/api/webhooks/{missing}"),
    ("get", "/api/webhooks/{missing}/deliveries"),
    ("get", "/api/webhooks/{id}/deliveries/{no_delivery}"),
    ("post", "/api/webhooks/{missing}/deliveries/{delivery}/redeliver"),
    ("post", "/api/webhooks/{id}/deliveries/{no_delivery}/redeliver"),
    ("post", "/api/webhooks/{other}/deliveries/{delivery}/redeliver"),
    ("get", "/api/webhooks/99999999999999999999"),
    ("post", "/api/webhooks/{id}/deliveries/99999999999999999999999/redeliver"),
])
def test_unknown_webhooks_and_deliveries_are_404(client, app, method, path):
    hook, other = create(client), create(client)
    delivery = add_delivery(app, hook["id"])
    before = snapshot(app)
    url = path.format(id=hook["id"], other=other["id"], missing=other["id"] + 100,
                      delivery=delivery, no_delivery=delivery + 100)
    kwargs = {"json": {"description": "x"}} if method == "patch" else {}
    assert_error(getattr(client, method)(url, **kwargs), 404, "NOT_FOUND")
    assert snapshot(app) == before


@pytest.mark.parametrize("query", [
    "status=lost", "limit=0", "limit=1001", "limit=many", "cursor=not-a-cursor",
    "cursor=WzIsIDVd",  # base64 of [2, 5]: another version
    "message_id=" + "m" * 65,
])
def test_bad_delivery_queries(client, app, query):
    hook = create(client)
    add_delivery(app, hook["id"])
    before = snapshot(app)
    assert_error(client.get(f"/api/webhooks/{hook['id']}/deliveries?{query}"), 400,
                 "VALIDATION_ERROR")
    assert snapshot(app) == before


def test_redeliver_makes_a_delivery_due_again(client, app):
    hook = create(client)
    delivery = add_delivery(app, hook["id"], status="failed")
    response = client.post(f"/api/webhooks/{hook['id']}/deliveries/{delivery}/redeliver")
    assert response.status_code == 202
    body = response.get_json()
    assert body["status"] == "pending" and body["next_attempt_at"] is not None


def test_wrong_methods_answer_405_with_allow(client):
    hook = create(client)
    response = client.put(f"/api/webhooks/{hook['id']}", json={})
    body = assert_error(response, 405, "METHOD_NOT_ALLOWED")
    assert "PATCH" in response.headers["Allow"] and body
    response = client.get(f"/api/webhooks/{hook['id']}/deliveries/1/redeliver")
    assert_error(response, 405, "METHOD_NOT_ALLOWED")


@pytest.mark.parametrize(("method", "path"), [
    ("get", "/api/webhooks"), ("post", "/api/webhooks"), ("get", "/api/webhooks/1"),
    ("get", "/api/webhooks/1/deliveries"),
    ("post", "/api/webhooks/1/deliveries/1/redeliver"),
])
def test_webhooks_are_admin_only_even_for_reads(anonymous_client, app, method, path):
    with app.app_context():
        from app.auth.keys import create_key
        _key, plain = create_key(db.session, "reader", "read", None)
        db.session.remove()
    before = snapshot(app)
    kwargs = {"json": {"url": URL, "event_types": ["delivered"]}} if method == "post" else {}
    assert_error(getattr(anonymous_client, method)(path, **kwargs), 401, "UNAUTHORIZED")
    assert_error(getattr(anonymous_client, method)(
        path, headers={"Authorization": f"Bearer {plain}"}, **kwargs), 403, "FORBIDDEN")
    assert snapshot(app) == before


def test_openapi_documents_the_webhook_endpoints(client):
    spec = client.get("/api/openapi.json").get_json()
    for path in ("/api/webhooks", "/api/webhooks/{webhook_id}",
                 "/api/webhooks/{webhook_id}/deliveries",
                 "/api/webhooks/{webhook_id}/deliveries/{delivery_id}/redeliver"):
        assert path in spec["paths"], path
    assert set(spec["paths"]["/api/webhooks/{webhook_id}"]) >= {"get", "patch", "delete"}


def test_the_cli_manages_webhooks(runner, app):
    created = runner.invoke(args=["webhook", "create", "--url", URL, "--events",
                                  "delivered,bounced", "--json"])
    assert created.exit_code == 0, created.output
    hook = json.loads(created.output)
    assert hook["secret"].startswith("whsec_")
    listed = runner.invoke(args=["webhook", "list", "--json"])
    assert [h["url"] for h in json.loads(listed.output)] == [URL]
    assert "secret" not in listed.output
    bad = runner.invoke(args=["webhook", "create", "--url", "ftp://x/y", "--events", "delivered"])
    assert bad.exit_code != 0 and "http" in bad.output
    rotated = runner.invoke(args=["webhook", "update", str(hook["id"]), "--rotate-secret",
                                  "--inactive"])
    assert rotated.exit_code == 0 and "whsec_" in rotated.output
    delivery = add_delivery(app, hook["id"], status="failed")
    listed = runner.invoke(args=["webhook", "deliveries", str(hook["id"])])
    assert listed.exit_code == 0 and "failed" in listed.output
    again = runner.invoke(args=["webhook", "redeliver", str(hook["id"]), str(delivery)])
    assert again.exit_code == 0, again.output
    missing = runner.invoke(args=["webhook", "redeliver", str(hook["id"]), "999"])
    assert missing.exit_code != 0 and "not found" in missing.output
    assert runner.invoke(args=["webhook", "delete", str(hook["id"])]).exit_code == 0
    assert snapshot(app) == ([], [])

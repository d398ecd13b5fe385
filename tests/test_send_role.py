"""The ``send`` role (API.md §8): SMTP AUTH and POST /api/send-test, nothing else."""

from __future__ import annotations

import smtplib

import pytest

from app.auth.keys import create_key
from app.extensions import db
from tests.smtpd_helpers import crlf, email_message, queued_id, running_listener

UNTRUSTED_LOOPBACK = {"relay_networks": "192.0.2.0/24"}  # loopback must authenticate
MAIL = {"from": "app@example.com", "to": "bob@example.net"}


def key_of(app, role, name=None):
    with app.app_context():
        _, plain = create_key(db.session, name or f"{role}-key", role)
        db.session.remove()
    return plain


@pytest.fixture
def all_mode(make_app, app):
    return make_app(auth_mode="all", **UNTRUSTED_LOOPBACK)


def as_key(app, key):
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {key}"
    return client


def test_a_send_key_sends_over_smtp_auth_and_send_test(all_mode):
    key = key_of(all_mode, "send")
    with running_listener(all_mode) as port, smtplib.SMTP("127.0.0.1", port) as client:
        client.ehlo("app.example")
        client.login("my-app", key)
        client.mail("app@example.com")
        assert client.rcpt("bob@example.net")[0] == 250
        code, reply = client.data(crlf(email_message(sender="app@example.com")))
    assert code == 250 and queued_id(reply)
    response = as_key(all_mode, key).post("/api/send-test", json=MAIL)
    assert response.status_code == 200, response.get_json()


@pytest.mark.parametrize("method, path", [
    ("get", "/api/queue/all"), ("get", "/api/queue/stats"), ("get", "/api/logs"),
    ("post", "/api/queue/all/flush"), ("post", "/api/queue/deferred/retry"),
    ("delete", "/api/queue/message/msg-unknownunknownunknown1"), ("get", "/api/dkim/keys"),
    ("get", "/api/auth/keys"),
])
def test_a_send_key_can_neither_read_nor_change_the_queue(all_mode, method, path):
    response = getattr(as_key(all_mode, key_of(all_mode, "send")), method)(path)
    assert response.status_code == 403
    assert response.get_json()["code"] == "FORBIDDEN"


def test_a_read_key_still_cannot_send(all_mode):
    key = key_of(all_mode, "read")
    response = as_key(all_mode, key).post("/api/send-test", json=MAIL)
    assert response.status_code == 403
    with running_listener(all_mode) as port, smtplib.SMTP("127.0.0.1", port) as client:
        client.ehlo("dashboard.example")
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            client.login("dashboard", key)
    assert refused.value.smtp_code == 535 and b"send or admin" in refused.value.smtp_error


def test_admin_keys_keep_sending(all_mode):
    key = key_of(all_mode, "admin", "ops")
    assert as_key(all_mode, key).post("/api/send-test", json=MAIL).status_code == 200
    with running_listener(all_mode) as port, smtplib.SMTP("127.0.0.1", port) as client:
        client.ehlo("ops.example")
        client.login("ops", key)
        client.mail("ops@example.com")
        assert client.rcpt("bob@example.net")[0] == 250


def test_send_keys_are_created_like_the_others(client, runner):
    created = client.post("/api/auth/keys", json={"name": "mailer", "role": "send"})
    assert created.status_code == 201 and created.get_json()["role"] == "send"
    result = runner.invoke(args=["apikey", "create", "--name", "mailer2", "--role", "send"])
    assert result.exit_code == 0 and "\nelemta_" in "\n" + result.stdout
    bad = client.post("/api/auth/keys", json={"name": "x", "role": "sender"})
    assert bad.status_code == 400

"""API keys: generation, storage (hash only), expiry, revocation, CLI and HTTP (API.md §8)."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json

import pytest
import sqlalchemy as sa

from app.auth import keys
from app.models import ApiKey, DeliveryEvent
from app.timeutil import utcnow
from tests.conftest import TEST_ADMIN_NAME
from tests.helpers import assert_error, queue_message


def _all_stored_text(session) -> str:
    """Every value of every api_keys row, as one string (to look for a leaked key)."""
    session.expire_all()
    rows = session.execute(sa.select(ApiKey.__table__)).all()
    return " ".join(str(value) for row in rows for value in row)


def test_key_format_and_only_the_hash_is_stored(session):
    key, plain = keys.create_key(session, "ci", "read")
    assert plain.startswith("elemta_")
    raw = base64.urlsafe_b64decode(plain[len("elemta_"):] + "=" * (-len(plain) % 4))
    assert len(raw) >= 32
    assert key.key_hash == hashlib.sha256(plain.encode()).hexdigest()
    assert plain.startswith(key.prefix) and len(key.prefix) < 16
    stored = _all_stored_text(session)
    assert plain not in stored
    assert plain[len(key.prefix):len(key.prefix) + 8] not in stored
    other_key, other = keys.create_key(session, "ci2", "read")
    assert other != plain and other_key.key_hash != key.key_hash


def test_verify_accepts_only_valid_unrevoked_unexpired_keys(session):
    key, plain = keys.create_key(session, "worker", "admin", expires_days=2)
    assert keys.verify_key(session, plain).name == "worker"
    for wrong in (None, "", plain + "x", plain[:-1], "elemta_" + "A" * 43, "Bearer " + plain,
                  plain.upper(), "x" * 10_000):
        assert keys.verify_key(session, wrong) is None
    session.execute(sa.update(ApiKey).where(ApiKey.id == key.id)
                    .values(expires_at=utcnow() - dt.timedelta(seconds=1)))
    session.commit()
    assert keys.verify_key(session, plain) is None
    _, plain2 = keys.create_key(session, "worker2", "admin")
    keys.revoke_key(session, "worker2")
    assert keys.verify_key(session, plain2) is None


def test_last_used_is_written_at_most_once_a_minute(session):
    key, plain = keys.create_key(session, "poller", "read")
    assert key.last_used_at is None
    first = keys.verify_key(session, plain).last_used_at
    assert first is not None
    assert keys.verify_key(session, plain).last_used_at == first
    old = utcnow().replace(microsecond=0) - dt.timedelta(minutes=5)
    session.execute(sa.update(ApiKey).where(ApiKey.id == key.id).values(last_used_at=old))
    session.commit()
    assert keys.verify_key(session, plain).last_used_at > old


@pytest.mark.parametrize(("name", "role", "days"), [
    ("", "read", None), (" spaced", "read", None), ("a" * 101, "read", None),
    ("ok", "root", None), ("ok", "read", 0), ("ok", "read", -3), ("bad\nname", "admin", None),
])
def test_create_rejects_bad_input(session, name, role, days):
    with pytest.raises(keys.ValidationFailed):
        keys.create_key(session, name, role, days)
    assert [k.name for k in keys.list_keys(session)] == [TEST_ADMIN_NAME]


def test_duplicate_name_is_a_conflict(session):
    keys.create_key(session, "dup", "read")
    with pytest.raises(keys.Conflict):
        keys.create_key(session, "dup", "admin")


def test_revoke_by_name_or_id_and_unknown(session):
    key, _ = keys.create_key(session, "a1", "read")
    assert keys.revoke_key(session, str(key.id)).revoked
    assert keys.revoke_key(session, "a1").revoked  # idempotent
    with pytest.raises(keys.NotFound):
        keys.revoke_key(session, "nope")
    with pytest.raises(keys.NotFound):
        keys.revoke_key(session, "99999999999999999999")


# --- CLI ---------------------------------------------------------------------------------

def test_cli_create_prints_the_key_alone_and_it_works(runner, app, anonymous_client, session):
    result = runner.invoke(args=["apikey", "create", "--name", "ops", "--role", "admin",
                                 "--expires-days", "30"])
    assert result.exit_code == 0, result.output
    plain = result.stdout.strip()
    assert result.stdout == plain + "\n"
    assert plain.startswith("elemta_") and "\n" not in plain
    assert "cannot be shown again" in result.stderr
    assert plain not in _all_stored_text(session)
    message_id = queue_message(session)
    response = anonymous_client.post(f"/api/queue/message/{message_id}/hold",
                                     headers={"Authorization": f"Bearer {plain}"})
    assert response.status_code == 200
    events = session.scalars(sa.select(DeliveryEvent.message)
                             .where(DeliveryEvent.event_type == "system")).all()
    assert events == [f"Message {message_id} held by ops"]


def test_cli_list_and_revoke(runner, anonymous_client, session):
    created = runner.invoke(args=["apikey", "create", "--name", "dash", "--role", "read"])
    plain = created.stdout.strip()
    listing = runner.invoke(args=["apikey", "list", "--json"])
    assert listing.exit_code == 0
    rows = {row["name"]: row for row in json.loads(listing.stdout)}
    assert rows["dash"]["role"] == "read" and rows["dash"]["revoked"] is False
    assert rows["dash"]["prefix"] == plain[:len(rows["dash"]["prefix"])]
    assert "key" not in rows["dash"] and plain not in listing.stdout
    table = runner.invoke(args=["apikey", "list"])
    assert "dash" in table.stdout and "active" in table.stdout and plain not in table.stdout

    assert anonymous_client.get("/api/queue/stats", headers={"X-API-Key": plain}).status_code == 200
    revoked = runner.invoke(args=["apikey", "revoke", "dash"])
    assert revoked.exit_code == 0 and "revoked" in revoked.stdout
    assert_error(anonymous_client.get("/api/queue/stats", headers={"X-API-Key": plain}),
                 401, "UNAUTHORIZED")
    assert "revoked" in runner.invoke(args=["apikey", "list"]).stdout


@pytest.mark.parametrize("args", [
    ["apikey", "create", "--name", "x", "--role", "root"],
    ["apikey", "create", "--name", "bad name", "--role", "read"],
    ["apikey", "create", "--name", "x", "--role", "read", "--expires-days", "0"],
    ["apikey", "create", "--role", "read"],
    ["apikey", "create", "--name", TEST_ADMIN_NAME, "--role", "read"],
    ["apikey", "revoke", "ghost"],
])
def test_cli_errors_exit_non_zero_with_one_line(runner, args):
    result = runner.invoke(args=args)
    assert result.exit_code != 0
    assert result.stdout == ""
    assert result.stderr.strip() and "Traceback" not in result.output


# --- HTTP --------------------------------------------------------------------------------

def test_http_create_list_revoke(client, anonymous_client, session):
    response = client.post("/api/auth/keys", json={"name": "grafana", "role": "read",
                                                   "expires_days": 90})
    assert response.status_code == 201
    body = response.get_json()
    plain = body["key"]
    assert plain.startswith("elemta_") and plain.startswith(body["prefix"])
    assert body["name"] == "grafana" and body["role"] == "read" and body["revoked"] is False
    assert body["expires_at"].endswith("Z") and body["last_used_at"] is None
    assert plain not in _all_stored_text(session)

    listed = client.get("/api/auth/keys").get_json()
    assert [k["name"] for k in listed] == [TEST_ADMIN_NAME, "grafana"]
    assert all("key" not in k and "key_hash" not in k for k in listed)
    assert plain not in json.dumps(listed)

    assert anonymous_client.get("/api/queue/stats",
                                headers={"Authorization": f"Bearer {plain}"}).status_code == 200
    response = client.delete(f"/api/auth/keys/{body['id']}")
    assert response.get_json() == {"status": "success", "message": "API key grafana revoked"}
    assert_error(anonymous_client.get("/api/queue/stats",
                                      headers={"Authorization": f"Bearer {plain}"}),
                 401, "UNAUTHORIZED")
    assert [k["revoked"] for k in client.get("/api/auth/keys").get_json()] == [False, True]


@pytest.mark.parametrize("payload", [
    {"name": "x"}, {"role": "read"}, {"name": "x", "role": "superuser"},
    {"name": "x y", "role": "read"}, {"name": "x", "role": "read", "expires_days": 0},
    {"name": "x", "role": "read", "expires_days": "10"}, {"name": "x", "role": "read", "extra": 1},
    {"name": "'; DROP TABLE api_keys; --", "role": "admin"},
])
def test_http_create_validation(client, payload):
    body = assert_error(client.post("/api/auth/keys", json=payload), 400, "VALIDATION_ERROR")
    assert isinstance(body["details"], dict)
    assert [k["name"] for k in client.get("/api/auth/keys").get_json()] == [TEST_ADMIN_NAME]


def test_http_duplicate_and_unknown(client):
    assert client.post("/api/auth/keys", json={"name": "k", "role": "read"}).status_code == 201
    assert_error(client.post("/api/auth/keys", json={"name": "k", "role": "read"}),
                 409, "CONFLICT")
    assert_error(client.delete("/api/auth/keys/424242"), 404, "NOT_FOUND")
    assert_error(client.delete("/api/auth/keys/99999999999999999999999"), 404, "NOT_FOUND")
    assert_error(client.delete("/api/auth/keys/abc"), 404, "NOT_FOUND")

"""ELEMTA_AUTH_MODE against every endpoint class, with every kind of credential (API.md §8).

Classes: read (GET), mutate (POST), delete (DELETE), health (probes), keys (/api/auth/keys,
admin only), WebSocket (GET upgrade, also ``?api_key=``). Credentials: none, a wrong key, a
revoked key, an expired key, a read key, an admin key; each sent as ``Authorization: Bearer``
and as ``X-API-Key``. A refused request changes nothing.
"""

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa
from flask.testing import FlaskClient

from app.auth import keys
from app.models import ApiKey
from app.timeutil import utcnow
from tests.helpers import assert_error, queue_message, state_of

CREDENTIALS = ("none", "wrong", "revoked", "expired", "read", "admin")
HEADER_STYLES = ("bearer", "x-api-key")
INVALID = ("wrong", "revoked", "expired")

OPEN = {c: 200 for c in CREDENTIALS}
ADMIN_ONLY = {"none": 401, "wrong": 401, "revoked": 401, "expired": 401, "read": 403, "admin": 200}
OPEN_BUT_CHECKED = {"none": 200, "wrong": 401, "revoked": 401, "expired": 401, "read": 200,
                    "admin": 200}
ANY_KEY = {"none": 401, "wrong": 401, "revoked": 401, "expired": 401, "read": 200, "admin": 200}

EXPECTED = {
    "off": {"read": OPEN, "mutate": OPEN, "delete": OPEN, "health": OPEN, "keys": OPEN},
    "admin": {"read": OPEN_BUT_CHECKED, "mutate": ADMIN_ONLY, "delete": ADMIN_ONLY,
              "health": OPEN, "keys": ADMIN_ONLY},
    "all": {"read": ANY_KEY, "mutate": ADMIN_ONLY, "delete": ADMIN_ONLY, "health": OPEN,
            "keys": ADMIN_ONLY},
}


@pytest.fixture
def keyring(session) -> dict[str, str | None]:
    """A plain key for each kind of credential."""
    _, read = keys.create_key(session, "reader", "read")
    _, admin = keys.create_key(session, "operator", "admin")
    _, revoked = keys.create_key(session, "old", "admin")
    keys.revoke_key(session, "old")
    expired_key, expired = keys.create_key(session, "temp", "admin", expires_days=1)
    session.execute(sa.update(ApiKey).where(ApiKey.id == expired_key.id)
                    .values(expires_at=utcnow() - dt.timedelta(minutes=1)))
    session.commit()
    return {"none": None, "wrong": "elemta_" + "W" * 43, "revoked": revoked,
            "expired": expired, "read": read, "admin": admin}


def headers_for(plain: str | None, style: str) -> dict[str, str]:
    if plain is None:
        return {}
    if style == "bearer":
        return {"Authorization": f"Bearer {plain}"}
    return {"X-API-Key": plain}


def anonymous(app) -> FlaskClient:
    return FlaskClient(app, app.response_class, use_cookies=False)


def check_refusal(response, status: int) -> None:
    if status == 401:
        assert_error(response, 401, "UNAUTHORIZED")
        assert response.headers["WWW-Authenticate"] == "Bearer"
    elif status == 403:
        assert_error(response, 403, "FORBIDDEN")


@pytest.mark.parametrize("mode", ["admin", "all", "off"])
@pytest.mark.parametrize("endpoint_class", ["read", "mutate", "delete", "health", "keys"])
def test_mode_matrix(make_app, session, keyring, mode, endpoint_class):
    app = make_app(auth_mode=mode)
    client = anonymous(app)
    for credential in CREDENTIALS:
        for style in HEADER_STYLES:
            expected = EXPECTED[mode][endpoint_class][credential]
            headers = headers_for(keyring[credential], style)
            label = f"{mode}/{endpoint_class}/{credential}/{style}"
            if endpoint_class == "read":
                response = client.get("/api/queue/stats", headers=headers)
            elif endpoint_class == "health":
                for path in ("/api/health", "/livez", "/readyz"):
                    response = client.get(path, headers=headers)
                    assert response.status_code == expected, (label, path)
            elif endpoint_class == "keys":
                response = client.get("/api/auth/keys", headers=headers)
            elif endpoint_class == "mutate":
                message_id = queue_message(session)
                response = client.post(f"/api/queue/message/{message_id}/hold", headers=headers)
                expected_state = "held" if expected == 200 else "pending"
                assert state_of(session, message_id) == expected_state, label
            else:
                message_id = queue_message(session)
                response = client.delete(f"/api/queue/message/{message_id}", headers=headers)
                assert (state_of(session, message_id) is None) == (expected == 200), label
            assert response.status_code == expected, (label, response.get_data(as_text=True))
            check_refusal(response, expected)


def test_actor_is_the_key_name_or_anonymous(make_app, session, keyring):
    from tests.helpers import system_events

    admin_mode = anonymous(make_app())
    message_id = queue_message(session)
    admin_mode.post(f"/api/queue/message/{message_id}/hold",
                    headers=headers_for(keyring["admin"], "x-api-key"))
    off_mode = anonymous(make_app(auth_mode="off"))
    off_mode.post(f"/api/queue/message/{message_id}/release")
    assert system_events(session, message_id) == [
        f"Message {message_id} held by operator",
        f"Message {message_id} released by anonymous",
    ]


@pytest.mark.parametrize("authorization", ["Basic dXNlcjpwYXNz", "Bearer", "Token abc", ""])
def test_other_authorization_schemes_are_no_key(make_app, keyring, authorization):
    client = anonymous(make_app(auth_mode="all"))
    response = client.get("/api/queue/stats", headers={"Authorization": authorization})
    check_refusal(response, 401)
    # ... and X-API-Key still works next to them.
    response = client.get("/api/queue/stats", headers={"Authorization": authorization,
                                                       "X-API-Key": keyring["read"]})
    assert response.status_code == 200


def test_bearer_scheme_is_case_insensitive(make_app, keyring):
    client = anonymous(make_app(auth_mode="all"))
    assert client.get("/api/queue/stats",
                      headers={"Authorization": f"bearer {keyring['read']}"}).status_code == 200


def test_query_parameter_key_only_counts_on_websockets(make_app, keyring):
    client = anonymous(make_app(auth_mode="all"))
    check_refusal(client.get(f"/api/queue/stats?api_key={keyring['admin']}"), 401)


def test_unknown_routes_and_wrong_methods_keep_their_status(make_app):
    client = anonymous(make_app(auth_mode="all"))
    assert_error(client.get("/api/does-not-exist"), 404, "NOT_FOUND")
    response = client.put("/api/queue/stats")
    assert_error(response, 405, "METHOD_NOT_ALLOWED")
    assert "GET" in response.headers["Allow"]


def test_off_mode_logs_a_warning_at_start(make_app, caplog):
    with caplog.at_level("WARNING", logger="elemta.auth"):
        make_app(auth_mode="off")
    assert any("ELEMTA_AUTH_MODE=off" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="elemta.auth"):
        make_app(auth_mode="admin")
    assert not caplog.records


def test_bad_auth_mode_stops_the_start(make_app):
    from app.config import ConfigError

    with pytest.raises(ConfigError):
        make_app(auth_mode="none")

"""``GET /api/auth/me`` (API.md §8, docs/DASHBOARD.md section 2): who the caller is, in every
auth mode; a bad key is a 401 in every mode but off."""

from __future__ import annotations

import datetime as dt

import pytest
from flask.testing import FlaskClient

from app.auth import keys
from tests.helpers import assert_error


def me(app, key: str | None = None):
    client = FlaskClient(app, app.response_class)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return client.get("/api/auth/me", headers=headers)


@pytest.fixture
def read_key(session) -> str:
    return keys.create_key(session, "dashboard-reader", "read", expires_days=30)[1]


@pytest.fixture
def admin_key(session) -> str:
    return keys.create_key(session, "dashboard-admin", "admin")[1]


@pytest.mark.parametrize("mode", ["admin", "all"])
def test_a_key_learns_its_name_role_expiry_and_the_mode(make_app, app, read_key, admin_key,
                                                        mode):
    served = make_app(auth_mode=mode)
    reader = me(served, read_key)
    assert reader.status_code == 200
    body = reader.get_json()
    assert list(body) == ["name", "role", "expires_at", "auth_mode"]
    assert (body["name"], body["role"], body["auth_mode"]) == ("dashboard-reader", "read", mode)
    expires = dt.datetime.fromisoformat(body["expires_at"].replace("Z", "+00:00"))
    assert dt.timedelta(days=29) < expires - dt.datetime.now(dt.UTC) <= dt.timedelta(days=30)
    expected = {"name": "dashboard-admin", "role": "admin", "expires_at": None, "auth_mode": mode}
    assert me(served, admin_key).get_json() == expected


@pytest.mark.parametrize("mode", ["admin", "all"])
def test_a_send_key_may_ask_who_it_is(make_app, app, session, mode):
    _, plain = keys.create_key(session, "app-sender", "send")
    response = me(make_app(auth_mode=mode), plain)
    assert response.status_code == 200
    assert response.get_json()["role"] == "send"


def test_without_a_key_admin_mode_answers_nobody(make_app, app):
    assert me(make_app(auth_mode="admin")).get_json() == {
        "name": None, "role": None, "expires_at": None, "auth_mode": "admin"}


def test_without_a_key_all_mode_asks_for_one(make_app, app):
    response = me(make_app(auth_mode="all"))
    assert_error(response, 401, "UNAUTHORIZED")
    assert response.headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize("mode", ["admin", "all"])
def test_a_wrong_or_revoked_key_is_refused(make_app, app, session, read_key, mode):
    served = make_app(auth_mode=mode)
    assert_error(me(served, "elemta_" + "W" * 43), 401, "UNAUTHORIZED")
    keys.revoke_key(session, "dashboard-reader")
    assert_error(me(served, read_key), 401, "UNAUTHORIZED")


def test_off_mode_checks_nothing_and_says_so(make_app, app, read_key):
    served = make_app(auth_mode="off")
    for key in (None, read_key, "elemta_wrong"):
        assert me(served, key).get_json() == {"name": None, "role": None, "expires_at": None,
                                              "auth_mode": "off"}


def test_the_rest_of_the_auth_blueprint_stays_admin_only(make_app, app, read_key):
    client = FlaskClient(served := make_app(), served.response_class)
    response = client.get("/api/auth/keys", headers={"Authorization": f"Bearer {read_key}"})
    assert_error(response, 403, "FORBIDDEN")


def test_me_is_in_the_openapi_document(client):
    spec = client.get("/api/openapi.json").get_json()
    operation = spec["paths"]["/api/auth/me"]["get"]
    schema = operation["responses"]["200"]["content"]["application/json"]["schema"]
    name = schema["$ref"].rpartition("/")[2]
    assert set(spec["components"]["schemas"][name]["properties"]) == {
        "name", "role", "expires_at", "auth_mode"}
    assert operation["summary"].startswith("The calling key's name, role and expiry")

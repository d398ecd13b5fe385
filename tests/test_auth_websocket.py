"""ELEMTA_AUTH_MODE on the WebSocket endpoints: real upgrades on a live loopback server.

Same credentials as tests/test_auth_modes.py, sent three ways: ``Authorization: Bearer``,
``X-API-Key`` and the ``api_key`` query parameter (browsers cannot set headers on a socket).
A WebSocket is a read: open in ``admin`` mode, any valid key in ``all`` mode.
"""

from __future__ import annotations

from urllib.parse import quote

import pytest

from tests.conftest import empty_database
from tests.stream_helpers import LiveServer, receive
from tests.test_auth_modes import (  # noqa: F401  (keyring: the fixture)
    ANY_KEY,
    CREDENTIALS,
    OPEN,
    OPEN_BUT_CHECKED,
    keyring,
)

STYLES = ("bearer", "x-api-key", "query")
EXPECTED = {"off": OPEN, "admin": OPEN_BUT_CHECKED, "all": ANY_KEY}


def request_parts(path: str, plain: str | None, style: str) -> tuple[str, dict[str, str]]:
    if plain is None:
        return path, {}
    if style == "bearer":
        return path, {"Authorization": f"Bearer {plain}"}
    if style == "x-api-key":
        return path, {"X-API-Key": plain}
    return f"{path}?api_key={quote(plain)}", {}


@pytest.mark.parametrize("mode", ["admin", "all", "off"])
def test_websocket_auth_matrix(make_app, keyring, mode):  # noqa: F811
    app = make_app(auth_mode=mode)
    live = LiveServer(app).start()
    try:
        for path in ("/api/queue/ws", "/api/logs/ws"):
            for credential in CREDENTIALS:
                for style in STYLES:
                    url, headers = request_parts(path, keyring[credential], style)
                    status, body = live.handshake(url, headers)
                    expected = 101 if EXPECTED[mode][credential] == 200 else 401
                    assert status == expected, (mode, path, credential, style, body)
                    if status == 401:
                        assert body == {"error": body["error"], "code": "UNAUTHORIZED",
                                        "details": None}
        # An accepted socket really streams: the queue socket starts with the stats.
        url, headers = request_parts("/api/queue/ws", keyring["read"], "query")
        ws = live.connect(url, headers=headers)
        assert receive(ws)["type"] == "queue_stats"
    finally:
        live.stop()


def test_websocket_refusal_carries_www_authenticate(make_app, keyring):  # noqa: F811
    import http.client

    app = make_app(auth_mode="all")
    empty_database(app)
    live = LiveServer(app).start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=30)
        try:
            conn.request("GET", "/api/queue/ws", headers={
                "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "X-API-Key": keyring["revoked"]})
            response = conn.getresponse()
            response.read()
            assert response.status == 401
            assert response.getheader("WWW-Authenticate") == "Bearer"
        finally:
            conn.close()
    finally:
        live.stop()

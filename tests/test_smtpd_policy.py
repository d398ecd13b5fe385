"""Who may send through the listener: relay networks, AUTH with API keys, STARTTLS (API.md §11)."""

from __future__ import annotations

import smtplib
import ssl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.auth.keys import create_key, revoke_key
from app.config import ConfigError
from app.extensions import db
from app.smtpd import policy
from app.smtpd.policy import RelayPolicy, address_problem, client_ip
from app.smtpd.server import ListenerConfigError, parse_listen
from app.smtpd.stamping import Trace, has_message_id, stamp
from tests.smtpd_helpers import (
    ProxiedSMTP,
    crlf,
    email_message,
    make_certificate,
    queued_id,
    raw_of,
    running_listener,
    stored,
)

# Loopback is not a relay network here: local clients must authenticate (they still may use
# AUTH without TLS, being on loopback).
UNTRUSTED_LOOPBACK = {"relay_networks": "192.0.2.0/24"}


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    return make_certificate(tmp_path_factory.mktemp("tls"))


def api_key(app, name="mailer", role="admin"):
    with app.app_context():
        _, plain = create_key(db.session, name, role)
        db.session.remove()
    return plain


def send(client):
    client.mail("alice@example.com")
    code, reply = client.rcpt("bob@example.net")
    if code != 250:
        return code, reply
    return client.data(crlf(email_message()))


def test_relay_refused_for_an_untrusted_client(fresh_app):
    app = fresh_app(**UNTRUSTED_LOOPBACK)
    with running_listener(app) as port, smtplib.SMTP("127.0.0.1", port) as client:
        client.ehlo("stranger.example")
        assert client.mail("alice@example.com")[0] == 250
        code, reply = client.rcpt("bob@example.net")
        assert code == 554
        assert reply == b"5.7.1 <bob@example.net>: Relay access denied"
        assert client.docmd("DATA")[0] == 503  # nothing accepted, nothing to send
    data = stored(app)
    assert data["messages"] == []
    (event,) = data["events"]
    assert event.event_type == "rejection"
    assert (event.sender, event.recipient) == ("alice@example.com", "bob@example.net")
    assert (event.smtp_code, event.enhanced_code) == (554, "5.7.1")
    assert event.message_id is None
    assert event.delivery_ip == "127.0.0.1" and event.delivery_host == "stranger.example"


@pytest.fixture
def untrusted_app(fresh_app):
    return fresh_app(**UNTRUSTED_LOOPBACK)


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_auth_with_a_valid_api_key_allows_relaying(untrusted_app, mechanism):
    key = api_key(untrusted_app)
    with running_listener(untrusted_app) as port, smtplib.SMTP("127.0.0.1", port) as client:
        client.ehlo("laptop.example")
        assert {"PLAIN", "LOGIN"} <= set(client.esmtp_features["auth"].split())
        client.user, client.password = "any-user-name", key
        code, reply = client.auth(mechanism, getattr(client, f"auth_{mechanism.lower()}"))
        assert (code, reply) == (235, b"2.7.0 Authentication successful")
        code, reply = send(client)
    assert code == 250
    raw = raw_of(untrusted_app, queued_id(reply))
    assert b"with ESMTPA" in raw.split(b"\r\n\r\n")[0]
    with untrusted_app.app_context():
        from app.auth.keys import find_key
        assert find_key(db.session, "mailer").last_used_at is not None
        db.session.remove()


def test_auth_with_a_read_key_is_refused(untrusted_app):
    """A dashboard's read key must not become a way to send mail (API.md §8)."""
    key = api_key(untrusted_app, "dashboard", role="read")
    with running_listener(untrusted_app) as port, smtplib.SMTP("127.0.0.1", port) as client:
        client.ehlo("laptop.example")
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            client.login("dashboard", key)
        assert refused.value.smtp_code == 535
        assert b"admin" in refused.value.smtp_error
        assert send(client)[0] == 554
    assert stored(untrusted_app)["messages"] == []


@pytest.mark.parametrize("password", ["elemta_not-a-real-key", "revoked", "hunter2"])
def test_auth_with_an_invalid_key_is_refused_and_relay_stays_closed(untrusted_app, password):
    if password == "revoked":
        password = api_key(untrusted_app, "old")
        with untrusted_app.app_context():
            revoke_key(db.session, "old")
            db.session.remove()
    with running_listener(untrusted_app) as port, smtplib.SMTP("127.0.0.1", port) as client:
        client.ehlo("laptop.example")
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            client.login("mailer", password)
        assert refused.value.smtp_code == 535
        code, _ = send(client)
        assert code == 554
    data = stored(untrusted_app)
    assert data["messages"] == []
    assert [e.event_type for e in data["events"]] == ["rejection"]


def test_auth_is_neither_offered_nor_accepted_in_clear_from_a_remote_client(fresh_app):
    """A client arriving through a PROXY-protocol proxy from a public address."""
    app = fresh_app(relay_networks="192.0.2.0/24", smtpd_proxy_protocol=True)
    key = api_key(app)
    with running_listener(app) as port, ProxiedSMTP("127.0.0.1", port) as client:
        client.ehlo("remote.example")
        assert not client.has_extn("auth")
        code, reply = client.docmd("AUTH", "PLAIN " + smtplib.encode_base64(
            f"\0mailer\0{key}".encode(), eol=""))
        assert code == 538
        code, _ = send(client)
        assert code == 554  # still unauthenticated
    (event,) = stored(app)["events"]
    assert event.delivery_ip == ProxiedSMTP.source_ip


def test_relay_networks_let_a_remote_client_send(fresh_app):
    app = fresh_app(relay_networks="203.0.113.0/24", smtpd_proxy_protocol=True)
    with running_listener(app) as port, ProxiedSMTP("127.0.0.1", port) as client:
        client.ehlo("office.example")
        code, reply = send(client)
    assert code == 250
    raw = raw_of(app, queued_id(reply))
    assert raw.startswith(b"Received: from office.example ([203.0.113.7])")


def test_starttls_with_a_generated_certificate(fresh_app, certificate):
    cert, key_file = certificate
    app = fresh_app(tls_cert=cert, tls_key=key_file, **UNTRUSTED_LOOPBACK)
    key = api_key(app)
    context = ssl.create_default_context(cafile=cert)  # verifies the server's certificate
    with running_listener(app) as port, smtplib.SMTP("127.0.0.1", port) as client:
        client.ehlo("laptop.example")
        assert client.has_extn("starttls")
        assert client.starttls(context=context)[0] == 220
        client.ehlo("laptop.example")
        assert not client.has_extn("starttls")  # once is enough
        assert client.sock.version() is not None  # the socket now speaks TLS
        client.login("mailer", key)
        code, reply = send(client)
    assert code == 250
    assert b"with ESMTPSA" in raw_of(app, queued_id(reply))


def test_starttls_lets_a_remote_client_authenticate(fresh_app, certificate):
    cert, key_file = certificate
    app = fresh_app(tls_cert=cert, tls_key=key_file, relay_networks="192.0.2.0/24",
                    smtpd_proxy_protocol=True)
    key = api_key(app)
    with running_listener(app) as port, ProxiedSMTP("127.0.0.1", port) as client:
        client.ehlo("remote.example")
        assert not client.has_extn("auth")
        client.starttls(context=ssl.create_default_context(cafile=cert))
        client.ehlo("remote.example")
        assert client.has_extn("auth")
        client.login("mailer", key)
        code, _ = send(client)
    assert code == 250


def send_proxied_after_starttls(fresh_app, certificate, relay_networks: str):
    """A client behind a PROXY-protocol proxy (as 203.0.113.7) says STARTTLS, then sends."""
    cert, key_file = certificate
    app = fresh_app(tls_cert=cert, tls_key=key_file, relay_networks=relay_networks,
                    smtpd_proxy_protocol=True)
    with running_listener(app) as port, ProxiedSMTP("127.0.0.1", port) as client:
        client.ehlo("office.example")
        client.starttls(context=ssl.create_default_context(cafile=cert))
        client.ehlo("office.example")
        return app, send(client)


def test_starttls_keeps_the_client_of_the_proxy_header(fresh_app, certificate):
    """The PROXY header comes before STARTTLS; after it the client is still the proxied one,
    not the proxy on loopback (a relay network by default): no open relay through TLS."""
    app, (code, _) = send_proxied_after_starttls(fresh_app, certificate, "127.0.0.0/8")
    assert code == 554  # 203.0.113.7 is no relay network, TLS or not
    (event,) = stored(app)["events"]
    assert event.delivery_ip == ProxiedSMTP.source_ip


def test_a_trusted_proxied_client_is_named_in_received_after_starttls(fresh_app, certificate):
    app, (code, reply) = send_proxied_after_starttls(fresh_app, certificate, "203.0.113.0/24")
    assert code == 250
    assert raw_of(app, queued_id(reply)).startswith(
        b"Received: from office.example ([203.0.113.7])")


def test_half_a_tls_configuration_is_refused_at_start(fresh_app, certificate):
    # Refused when the app is created (app/config.py), before any listener could announce itself.
    with pytest.raises(ConfigError, match="both"):
        fresh_app(tls_cert=certificate[0])


# ---------------------------------------------------------------- policy rules, no network


def test_relay_policy_rules():
    policy = RelayPolicy(tuple(__import__("ipaddress").ip_network(n)
                               for n in ("127.0.0.0/8", "::1/128", "10.1.0.0/16")))
    assert policy.trusted(client_ip(("127.0.0.1", 1234)))
    assert policy.trusted(client_ip(("::ffff:10.1.2.3", 25, 0, 0)))  # dual-stack socket
    assert not policy.trusted(client_ip(("10.2.0.1", 25)))
    assert policy.may_relay(client_ip(("10.2.0.1", 25)), authenticated=True)
    assert not policy.may_relay(None, authenticated=False)
    assert policy.auth_allowed(client_ip(("::1", 25, 0, 0)), over_tls=False)
    assert not policy.auth_allowed(client_ip(("198.51.100.1", 25)), over_tls=False)
    assert policy.auth_allowed(client_ip(("198.51.100.1", 25)), over_tls=True)


def test_known_clients_are_answered_as_the_first_time():
    """``client_ip`` and ``RelayPolicy.trusted`` remember what they found (asked at every
    connection and RCPT): asked again, and after their memory is cleared when full, they give
    the same answers as the first time."""
    from app.smtpd import policy as policy_module

    relay = RelayPolicy(tuple(__import__("ipaddress").ip_network(n)
                              for n in ("127.0.0.0/8", "10.1.0.0/16")))
    peers = [("127.0.0.1", 1), ("::ffff:10.1.2.3", 25, 0, 0), ("10.2.0.1", 25),
             ("fe80::1%eth0", 25, 0, 2), ("not an address", 25), (None, 25)]
    first = [(client_ip(peer), relay.trusted(client_ip(peer))) for peer in peers]
    assert [str(ip) for ip, _ in first] == ["127.0.0.1", "10.1.2.3", "10.2.0.1", "fe80::1",
                                            "None", "None"]
    assert [trusted for _, trusted in first] == [True, True, False, False, False, False]
    for _ in range(2):
        assert [(client_ip(peer), relay.trusted(client_ip(peer))) for peer in peers] == first
    original = policy_module._PARSED_MAX
    try:
        policy_module._PARSED_MAX = 2  # from now on the memory is cleared when it has two
        policy_module._PARSED.clear()
        relay._trusted.clear()
        assert [(client_ip(peer), relay.trusted(client_ip(peer))) for peer in peers] == first
        assert len(policy_module._PARSED) <= 2 and len(relay._trusted) <= 2
    finally:
        policy_module._PARSED_MAX = original
    assert relay == RelayPolicy(relay.networks)  # the memory is not part of the policy


@pytest.mark.parametrize("address,is_sender,smtputf8,ok", [
    ("", True, False, True),
    ("", False, False, False),
    ("bob@example.net", False, False, True),
    ('"bob smith"@example.net', False, False, True),
    ("bob", False, False, False),
    ("bob@", False, False, False),
    ("bob@exa mple.net", False, False, False),
    ("bob@example.net.", False, False, False),
    ("x" * 65 + "@example.net", False, False, False),
    ("bob@" + "d" * 260, False, False, False),
    ("用户@例子.测试", False, False, False),
    ("用户@例子.测试", False, True, True),
    ("bad\udce9@example.net", False, True, False),
    ("bob@[192.0.2.1]", False, False, True),
])
def test_address_rules(address, is_sender, smtputf8, ok):
    assert (address_problem(address, is_sender=is_sender, smtputf8=smtputf8) is None) is ok


# Characters around the edges of both checks: C0, DEL, C1, U+00A0 (a space to isspace), the
# Unicode spaces and separators, a zero-width space (no space to isspace), a surrogate, and
# plain address characters.
_EDGE_CHARS = st.sampled_from(
    [chr(c) for c in (*range(0, 33), *range(126, 161), 0x1680, 0x2000, 0x200B, 0x2028,
                      0x2029, 0x202F, 0x205F, 0x3000, 0xFEFF, 0xDCE9)]
    + list("ab.-@[]\"'"))


@settings(max_examples=3000, deadline=None)
@given(st.text(alphabet=st.one_of(_EDGE_CHARS, st.characters()), max_size=40))
def test_the_character_checks_match_a_test_of_every_character(text):
    # address_problem's control and space checks are regex searches (one call instead of a
    # Python test per character): they must find exactly what the per-character tests find.
    assert (policy._CONTROL.search(text) is not None) == \
        any(ord(ch) < 32 or 127 <= ord(ch) <= 159 for ch in text)
    assert (policy._SPACE.search(text) is not None) == any(ch.isspace() for ch in text)


@pytest.mark.parametrize("text,expected", [
    ("127.0.0.1:2525", ("127.0.0.1", 2525)),
    ("[::1]:2525", ("::1", 2525)),
    (":25", ("0.0.0.0", 25)),
])
def test_listen_addresses(text, expected):
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["2525", "host:", "host:99999", "host:port"])
def test_bad_listen_addresses(text):
    with pytest.raises(ListenerConfigError):
        parse_listen(text)


TRACE = Trace("client.example", "2001:db8::5", "mx.example", True, True, True, False,
              ("bob@example.net", "carol@example.net"))


@pytest.mark.parametrize("raw,has_id", [
    (b"Subject: a\r\nMessage-Id: <x@y>\r\n\r\nbody\r\n", True),
    (b"Subject: a\r\nMESSAGE-ID:\r\n <x@y>\r\n\r\nbody\r\n", True),
    (b"Subject: a\r\n\r\nMessage-ID: <only-in-the-body@y>\r\n", False),
    (b"\r\nno headers at all\r\n", False),
])
def test_message_id_detection_and_stamping(raw, has_id):
    assert has_message_id(raw) is has_id
    stamped = stamp(raw, TRACE)
    assert stamped.startswith(b"Received: from client.example ([IPv6:2001:db8::5])\r\n"
                              b"\tby mx.example (Elemta) with ESMTPSA;\r\n\t")
    assert stamped.endswith(raw.split(b"\r\n\r\n", 1)[1] if raw.count(b"\r\n\r\n") else raw)
    assert has_message_id(stamped)
    assert stamped.count(b"@mx.example>") == (0 if has_id else 1)

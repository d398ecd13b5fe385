"""Connection limits of the listener: one address can never lock the others out (issue 18).

Clients come from several loopback addresses (Linux routes all of 127.0.0.0/8 to lo), and the
relay networks are set so that the flooding addresses are untrusted: 127.0.0.1 and 127.0.0.3
are trusted, 127.0.0.2 and 127.0.0.4 are not.
"""

from __future__ import annotations

import ipaddress
import smtplib
import socket
from collections import Counter
from contextlib import ExitStack

import pytest

from app.auth.keys import create_key
from app.config import ConfigError
from app.extensions import db
from app.smtpd.admission import (
    RATE_WINDOW_SECONDS,
    SWEEP_SECONDS,
    Admission,
    AdmissionLimits,
    Refusal,
    RefusalThrottle,
    Ticket,
    client_key,
)
from tests.smtpd_helpers import (
    ProxiedSMTP,
    crlf,
    email_message,
    queued_id,
    running_listener,
    stored,
)

TRUSTED = {"relay_networks": "127.0.0.1/32,127.0.0.3/32,::1"}
FLOODER, OTHER_UNTRUSTED, TRUSTED_CLIENT = "127.0.0.2", "127.0.0.4", "127.0.0.3"


def open_from(port: int, source: str, stack: ExitStack) -> tuple[socket.socket, bytes]:
    """A raw connection from ``source``, and the first reply line the server sent."""
    sock = stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=30,
                                                        source_address=(source, 0)))
    line = b""
    while not line.endswith(b"\r\n"):
        chunk = sock.recv(1024)
        if not chunk:
            break
        line += chunk
    return sock, line


def closed_by_server(sock: socket.socket) -> bool:
    """Waits (30 s at most, a safety net) until the server closes; True if it did."""
    sock.settimeout(30)
    try:
        while sock.recv(1024):
            pass
    except TimeoutError:
        return False
    return True


def send_one(port: int, source: str, login: str | None = None) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, source_address=(source, 0)) as client:
        client.ehlo("client.example")
        if login:
            client.login("mailer", login)
        client.mail("alice@example.com")
        client.rcpt("bob@example.net")
        return client.data(crlf(email_message()))


def admin_key(app) -> str:
    with app.app_context():
        _, plain = create_key(db.session, "mailer", "admin")
        db.session.remove()
    return plain


def connection_refusals(app) -> list:
    return [e for e in stored(app)["events"]
            if e.event_type == "rejection" and "CONNECT refused" in (e.message or "")]


# ------------------------------------------------------------------ through the real listener

def test_300_idle_connections_from_one_address_leave_room_for_the_others(fresh_app):
    """The defaults (100 sessions, 50 per client, 120 per minute) against an idle flood."""
    app = fresh_app(**TRUSTED)
    key = admin_key(app)
    with running_listener(app) as port, ExitStack() as stack:
        greetings = Counter()
        for _ in range(300):
            _sock, line = open_from(port, FLOODER, stack)
            greetings[line.decode().split(",")[0]] += 1
        assert greetings == {
            "220 mx.test.example Elemta ESMTP\r\n": 50,
            f"421 4.7.0 Too many connections from {FLOODER}": 120 - 50,
            f"421 4.7.0 Too many connections per minute from {FLOODER}": 300 - 120,
        }
        # The 50 admitted ones still sit there, idle; the others get in and send.
        code, reply = send_one(port, TRUSTED_CLIENT)
        assert code == 250 and b"queued as msg-" in reply
        code, _ = send_one(port, OTHER_UNTRUSTED, login=key)  # untrusted, but AUTH (loopback)
        assert code == 250
    assert len(stored(app)["messages"]) == 2
    # Logged and recorded once per client and reason, not 250 times.
    refusals = connection_refusals(app)
    assert sorted((e.smtp_code, e.enhanced_code, e.delivery_ip) for e in refusals) == [
        (421, "4.7.0", FLOODER), (421, "4.7.0", FLOODER)]


def test_untrusted_clients_never_take_the_sessions_kept_for_the_relay_networks(fresh_app):
    # 10 sessions: 2 kept for the relay networks, 5 per untrusted client.
    app = fresh_app(smtpd_max_sessions=10, smtpd_stress_idle_timeout=300, **TRUSTED)
    with running_listener(app) as port, ExitStack() as stack:
        first = [open_from(port, FLOODER, stack)[1][:3] for _ in range(6)]
        assert first == [b"220"] * 5 + [b"421"]
        second = [open_from(port, OTHER_UNTRUSTED, stack)[1] for _ in range(5)]
        assert [line[:3] for line in second] == [b"220"] * 3 + [b"421"] * 2
        assert second[-1].startswith(b"421 4.7.0 Too many connections from outside the relay")
        trusted = [open_from(port, TRUSTED_CLIENT, stack)[1][:3] for _ in range(2)]
        assert trusted == [b"220", b"220"]
        # Now the listener is full for everybody.
        assert open_from(port, TRUSTED_CLIENT, stack)[1].startswith(b"421 4.3.2 ")


def test_near_the_session_cap_idle_sessions_get_the_short_timeout(fresh_app):
    """Sessions outside a mail transaction are cut after the stress timeout; a session in the
    middle of a transaction keeps the normal one and can finish its message."""
    app = fresh_app(smtpd_max_sessions=5, smtpd_stress_idle_timeout=1, **TRUSTED)
    with running_listener(app) as port, ExitStack() as stack:
        busy = stack.enter_context(smtplib.SMTP("127.0.0.1", port))
        busy.ehlo("client.example")
        assert busy.mail("alice@example.com")[0] == 250
        idle = [open_from(port, TRUSTED_CLIENT, stack)[0] for _ in range(2)]
        # The fourth session (4 of 5: 80 %) puts the listener under stress: the sessions
        # already idle get the short timeout too.
        idle.append(open_from(port, FLOODER, stack)[0])
        assert all(closed_by_server(sock) for sock in idle)
        assert busy.rcpt("bob@example.net")[0] == 250
        code, reply = busy.data(crlf(email_message()))
        assert code == 250
    assert [m.id for m in stored(app)["messages"]] == [queued_id(reply)]


def test_connection_rate_per_client(fresh_app):
    app = fresh_app(smtpd_client_connection_rate_limit=3, **TRUSTED)
    with running_listener(app) as port:
        with ExitStack() as stack:
            lines = [open_from(port, FLOODER, stack)[1] for _ in range(5)]
        assert [line[:3] for line in lines] == [b"220"] * 3 + [b"421"] * 2
        assert lines[3] == (f"421 4.7.0 Too many connections per minute from {FLOODER}, "
                            "try again later\r\n").encode()
        with ExitStack() as stack:
            # Another untrusted address has a rate of its own; the relay networks have none.
            assert open_from(port, OTHER_UNTRUSTED, stack)[1][:3] == b"220"
            assert [open_from(port, TRUSTED_CLIENT, stack)[1][:3] for _ in range(6)] == \
                [b"220"] * 6
    (event,) = connection_refusals(app)
    assert (event.smtp_code, event.enhanced_code, event.delivery_ip) == (421, "4.7.0", FLOODER)
    assert event.message == (f"SMTP CONNECT refused from {FLOODER}: Too many connections per "
                             f"minute from {FLOODER}, try again later")
    assert event.message_id is None and event.recipient is None


def test_behind_a_proxy_the_limits_count_the_address_in_the_proxy_header(fresh_app):
    app = fresh_app(relay_networks="192.0.2.0/24", smtpd_proxy_protocol=True,
                    smtpd_client_connection_count_limit=1)

    class OtherProxied(ProxiedSMTP):
        source_ip = "198.51.100.9"

    with running_listener(app) as port, ProxiedSMTP("127.0.0.1", port) as first:
        assert first.noop()[0] == 250
        with pytest.raises(smtplib.SMTPConnectError) as refused:
            ProxiedSMTP("127.0.0.1", port)
        assert refused.value.smtp_code == 421
        assert refused.value.smtp_error.startswith(b"4.7.0 Too many connections from 203.0.113.7")
        with OtherProxied("127.0.0.1", port) as other:  # the proxy's own address is no client
            assert other.noop()[0] == 250
    (event,) = connection_refusals(app)
    assert event.delivery_ip == ProxiedSMTP.source_ip


def test_a_reserve_that_leaves_untrusted_clients_nothing_is_refused_at_start(fresh_app):
    with pytest.raises(ConfigError, match="ELEMTA_SMTPD_TRUSTED_RESERVE: 10 must be below "
                                          "ELEMTA_SMTPD_MAX_SESSIONS"):
        fresh_app(smtpd_max_sessions=10, smtpd_trusted_reserve=10)


# ------------------------------------------------------------------ the rules, no network

class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def ip(text: str):
    return ipaddress.ip_address(text)


def test_rules_count_limit_and_leaving():
    admission = Admission(AdmissionLimits(max_sessions=10, trusted_reserve=2,
                                          client_count_limit=2, client_rate_limit=0))
    a, b = admission.admit(ip("192.0.2.1"), False), admission.admit(ip("192.0.2.1"), False)
    third = admission.admit(ip("192.0.2.1"), False)
    assert isinstance(a, Ticket) and isinstance(b, Ticket)
    assert isinstance(third, Refusal) and third.reason == "client-count"
    admission.leave(a)
    admission.leave(a)  # twice is once
    assert (admission.sessions, admission.untrusted) == (1, 1)
    assert isinstance(admission.admit(ip("192.0.2.1"), False), Ticket)


def test_rules_rate_window_restarts_after_a_minute_and_idle_clients_are_forgotten():
    clock = Clock()
    admission = Admission(AdmissionLimits(max_sessions=10, trusted_reserve=0,
                                          client_count_limit=0, client_rate_limit=2), clock)
    for _ in range(2):
        admission.leave(admission.admit(ip("192.0.2.1"), False))
    refused = admission.admit(ip("192.0.2.1"), False)
    assert isinstance(refused, Refusal) and refused.reason == "client-rate"
    clock.now += RATE_WINDOW_SECONDS
    admission.leave(admission.admit(ip("192.0.2.1"), False))
    clock.now += max(RATE_WINDOW_SECONDS, SWEEP_SECONDS)
    admission.admit(ip("192.0.2.99"), False)  # sweeps
    assert admission.client_sessions(ip("192.0.2.1")) == 0
    assert list(admission._clients) == ["192.0.2.99"]


def test_rules_ipv6_clients_count_per_64_and_trusted_clients_only_by_the_cap():
    admission = Admission(AdmissionLimits(max_sessions=3, trusted_reserve=1,
                                          client_count_limit=1, client_rate_limit=1))
    assert client_key(ip("2001:db8:1:2::5")) == "2001:db8:1:2::/64"
    assert isinstance(admission.admit(ip("2001:db8:1:2::5"), False), Ticket)
    assert admission.admit(ip("2001:db8:1:2::6"), False).reason == "client-rate"
    assert isinstance(admission.admit(ip("10.0.0.1"), True), Ticket)
    assert isinstance(admission.admit(ip("10.0.0.1"), True), Ticket)
    assert admission.admit(ip("10.0.0.1"), True).reason == "busy"


def test_rules_refusals_are_reported_once_a_minute_with_the_count_in_between():
    clock = Clock()
    throttle = RefusalThrottle(clock)
    refusal = Refusal("client-count", "421 4.7.0 ...", "192.0.2.1")
    assert throttle.due(refusal) == 0
    assert [throttle.due(refusal) for _ in range(3)] == [None, None, None]
    assert throttle.due(Refusal("client-rate", "421 4.7.0 ...", "192.0.2.1")) == 0
    clock.now += RATE_WINDOW_SECONDS
    assert throttle.due(refusal) == 3

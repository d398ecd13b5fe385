"""Routing: MX per RFC 5321 s5 / RFC 7505 through an injected resolver, the smarthost with
STARTTLS, implicit TLS and AUTH, opportunistic STARTTLS, and bounces reaching the sender."""

from __future__ import annotations

import email
import email.policy

import dns.exception
import dns.resolver
import pytest
from aiosmtpd.smtp import AuthResult, LoginPassword

from app.delivery import routing
from app.extensions import db
from tests.delivery_helpers import (
    Behaviour,
    FakeResolver,
    Peer,
    events,
    message_row,
    mx_to,
    recipients_of,
    rollup,
    run_worker,
)
from tests.helpers import queue_message
from tests.smtpd_helpers import free_port, make_certificate


@pytest.fixture
def mx_app(app, make_app):
    def factory(port: int, **config):
        settings = {"relay_host": "", "smtp_port": port, "smtp_timeout": 2,
                    "retry_schedule": "60,300", "worker_concurrency": 2}
        settings.update(config)
        return make_app(**settings)

    return factory


def queue(app, sender="alice@example.com", recipients=("bob@example.net",), subject="Hello"):
    with app.app_context():
        message_id = queue_message(db.session, sender=sender, recipients=recipients,
                                   subject=subject)
        db.session.remove()
    return message_id


def test_mx_by_preference_falls_back_to_the_next_host(mx_app):
    port = free_port()
    records = {("example.net", "MX"): ["20 mx2.example.net.", "10 mx1.example.net."],
               ("mx1.example.net", "A"): ["127.0.0.3"],  # nobody listens there
               ("mx2.example.net", "A"): ["127.0.0.2"]}
    with Peer(host="127.0.0.2", port=port) as peer:
        app = mx_app(port)
        message_id = queue(app)
        run_worker(app, FakeResolver(records))
    assert peer.recipients_received() == ["bob@example.net"]
    [event] = events(app, message_id, "delivery")
    assert (event.delivery_host, event.delivery_ip) == ("mx2.example.net", "127.0.0.2")


def test_lowest_preference_is_tried_first(mx_app):
    port = free_port()
    records = {("example.net", "MX"): ["20 mx2.example.net.", "10 mx1.example.net."],
               ("mx1.example.net", "A"): ["127.0.0.2"], ("mx2.example.net", "A"): ["127.0.0.1"]}
    with Peer(host="127.0.0.2", port=port) as first, Peer(host="127.0.0.1", port=port) as second:
        app = mx_app(port)
        queue(app)
        run_worker(app, FakeResolver(records))
    assert first.recipients_received() == ["bob@example.net"]
    assert second.received == []


def test_implicit_mx_when_the_domain_has_no_mx(mx_app):
    port = free_port()
    with Peer(port=port) as peer:
        app = mx_app(port)
        message_id = queue(app)
        run_worker(app, FakeResolver({("example.net", "A"): ["127.0.0.1"]}))
    assert peer.recipients_received() == ["bob@example.net"]
    [event] = events(app, message_id, "delivery")
    assert event.delivery_host == "example.net"


def test_null_mx_fails_permanently(mx_app):
    app = mx_app(free_port(), send_bounces=False)
    message_id = queue(app)
    run_worker(app, FakeResolver({("example.net", "MX"): ["0 ."]}))
    [recipient] = recipients_of(app, message_id).values()
    assert recipient.status == "failed"
    assert "null MX" in recipient.last_error
    [event] = events(app, message_id, "rejection")
    assert (event.enhanced_code, event.smtp_code) == ("5.1.10", None)
    assert message_row(app, message_id).queue_state == "failed"
    assert rollup(app) == {"failed": 1}


def test_non_existent_domain_fails_permanently(mx_app):
    app = mx_app(free_port(), send_bounces=False)
    message_id = queue(app)
    run_worker(app, FakeResolver({}))
    [recipient] = recipients_of(app, message_id).values()
    assert recipient.status == "failed"
    assert "does not exist" in recipient.last_error


def test_nxdomain_from_a_broken_resolver_defers(mx_app):
    """A resolver that denies even the root zone (no network) must not bounce mail."""
    app = mx_app(free_port())
    message_id = queue(app)
    run_worker(app, FakeResolver({}, broken=True))
    [recipient] = recipients_of(app, message_id).values()
    assert recipient.status == "deferred"
    assert "DNS is not working" in recipient.last_error
    assert "ELEMTA_RELAY_HOST" in recipient.last_error
    assert message_row(app, message_id).queue_state == "deferred"
    assert rollup(app) == {"deferred": 1}


def test_a_broken_resolver_is_logged_once_per_process(mx_app, caplog, monkeypatch):
    """Several workers (routers) and threads meet the broken resolver: one warning, then one
    notice when it works again."""
    monkeypatch.setattr(routing, "dns_health_notice", routing.DnsHealthNotice())
    app = mx_app(free_port(), send_bounces=False)

    def said(text: str) -> int:
        return sum(text in r.getMessage() for r in caplog.records)

    with caplog.at_level("INFO", logger="elemta.delivery"):
        for round_ in range(2):
            for n in range(3):
                queue(app, recipients=(f"user{round_}@example{n}.net",))
            run_worker(app, FakeResolver({}, broken=True))
        assert said("DNS is not working") == 1
        # The next workers' resolver works (the root zone resolves): said once.
        for n in range(2):
            queue(app, recipients=(f"user@gone{n}.example",))
            run_worker(app, FakeResolver({}))
        assert said("DNS works again") == 1
        # A later failure is news again.
        queue(app, recipients=("user@example9.net",))
        run_worker(app, FakeResolver({}, broken=True))
        assert said("DNS is not working") == 2


@pytest.mark.parametrize("error", [dns.exception.Timeout(timeout=1.0),
                                   dns.resolver.NoNameservers()])
def test_temporary_dns_errors_defer(mx_app, error):
    app = mx_app(free_port())
    message_id = queue(app)
    run_worker(app, FakeResolver({("example.net", "MX"): error}))
    [recipient] = recipients_of(app, message_id).values()
    assert recipient.status == "deferred"
    assert recipient.last_error.startswith("MX lookup for example.net failed")
    [event] = events(app, message_id, "tempfail")
    assert event.enhanced_code == "4.4.3"


def test_bounce_reaches_the_senders_server_with_the_original_headers(mx_app):
    port = free_port()
    records = {**mx_to("127.0.0.1", "example.net", "mx.example.net"),
               **mx_to("127.0.0.2", "example.com", "mx.example.com")}
    refusing = Behaviour(
        rcpt_replies={"bob@example.net": "550 5.1.1 <bob@example.net>: no such user"})
    with Peer(refusing, port=port) as remote, Peer(host="127.0.0.2", port=port) as senders:
        app = mx_app(port)
        message_id = queue(app, subject="Quarterly report")
        run_worker(app, FakeResolver(records))
    assert remote.received == []
    [dsn] = senders.received
    assert (dsn.mail_from, dsn.rcpt_tos) == ("", ["alice@example.com"])
    report = email.message_from_bytes(dsn.content, policy=email.policy.default)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    human, status, headers = report.get_payload()
    assert "no such user" in human.get_content()
    assert status.get_content_type() == "message/delivery-status"
    fields = status.as_string()
    assert "Final-Recipient: rfc822; bob@example.net" in fields
    assert "Action: failed" in fields and "Status: 5.1.1" in fields
    assert "Remote-MTA: dns; mx.example.net" in fields
    assert headers.get_content_type() == "text/rfc822-headers"
    original = headers.get_payload(decode=True).decode()
    assert "Subject: Quarterly report" in original
    assert "Message-ID: <test@example.com>" in original
    bounce_events = [e for e in events(app) if e.message_id != message_id]
    assert [e.event_type for e in bounce_events] == ["reception", "delivery"]
    assert bounce_events[0].sender == ""


@pytest.fixture
def certificate(tmp_path, monkeypatch):
    cert, key = make_certificate(tmp_path)
    # The relay's certificate is verified: trust our self-signed one for this test.
    monkeypatch.setenv("SSL_CERT_FILE", cert)
    return cert, key


def _server_context(cert: str, key: str):
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


def test_opportunistic_starttls_on_mx_delivery(mx_app, certificate):
    port = free_port()
    with Peer(port=port, tls_context=_server_context(*certificate)) as peer:
        app = mx_app(port)
        queue(app)
        run_worker(app, FakeResolver(mx_to()))
    [received] = peer.received
    assert received.tls


def _authenticator(server, session, envelope, mechanism, auth_data):
    ok = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == (
        b"relay-user", b"s3cret")
    # handled=False: aiosmtpd then answers 535 itself (its default, True, means "already did").
    return AuthResult(success=ok, handled=False, auth_data=auth_data)


def test_relay_with_starttls_and_auth(app, make_app, certificate):
    with Peer(tls_context=_server_context(*certificate), require_starttls=True,
              authenticator=_authenticator, auth_required=True) as peer:
        relay = make_app(relay_host=peer.address, relay_tls="starttls",
                         relay_username="relay-user", relay_password="s3cret", smtp_timeout=2)
        message_id = queue(relay)
        run_worker(relay)
    [received] = peer.received
    assert received.tls and received.login.login == b"relay-user"
    assert message_row(relay, message_id) is None


def test_relay_with_wrong_password_defers(app, make_app, certificate):
    with Peer(tls_context=_server_context(*certificate), require_starttls=True,
              authenticator=_authenticator, auth_required=True) as peer:
        relay = make_app(relay_host=peer.address, relay_tls="starttls",
                         relay_username="relay-user", relay_password="wrong", smtp_timeout=2)
        message_id = queue(relay)
        run_worker(relay)
    assert peer.received == []
    [recipient] = recipients_of(relay, message_id).values()
    assert recipient.status == "deferred"
    assert "535" in recipient.last_error


def test_relay_with_implicit_tls(app, make_app, certificate):
    with Peer(ssl_context=_server_context(*certificate)) as peer:
        relay = make_app(relay_host=peer.address, relay_tls="tls", smtp_timeout=2)
        queue(relay)
        run_worker(relay)
    [received] = peer.received
    assert received.rcpt_tos == ["bob@example.net"]


def test_relay_tls_trusts_a_private_ca_file(app, make_app, tmp_path):
    cert, key = make_certificate(tmp_path)  # not in the system's trust store
    with Peer(tls_context=_server_context(cert, key), require_starttls=True) as peer:
        relay = make_app(relay_host=peer.address, relay_tls="starttls", smtp_timeout=2,
                         relay_tls_ca_file=cert)
        message_id = queue(relay)
        run_worker(relay)
    [received] = peer.received
    assert received.tls
    assert message_row(relay, message_id) is None


def test_a_certificate_failure_is_recorded_as_a_tls_failure_with_its_reason(app, make_app,
                                                                            tmp_path):
    cert, key = make_certificate(tmp_path)
    with Peer(tls_context=_server_context(cert, key), require_starttls=True) as peer:
        relay = make_app(relay_host=peer.address, relay_tls="starttls", smtp_timeout=2)
        message_id = queue(relay)
        run_worker(relay)
    assert peer.received == []
    [recipient] = recipients_of(relay, message_id).values()
    assert recipient.status == "deferred"
    assert recipient.last_error.startswith(f"TLS failure with relay:{peer.address}")
    assert "certificate verification failed: self-signed certificate" in recipient.last_error
    assert "Could not connect" not in recipient.last_error
    [event] = events(relay, message_id, "tempfail")
    assert event.enhanced_code == "4.7.5"

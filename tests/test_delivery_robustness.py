"""The worker with mail and peers that are out of the ordinary: internationalised mail
(SMTPUTF8, RFC 6531), 8-bit bodies, control characters in remote replies, and bugs.

Whatever happens, every attempt ends in a recorded outcome: a job is never left to its lease
(which would bring it back every lease period, or deliver it twice).
"""

from __future__ import annotations

import datetime as dt
import logging
import smtplib

import pytest
import sqlalchemy as sa

from app.delivery import content
from app.delivery.smtp_client import RecipientResult
from app.extensions import db
from app.models import Message
from app.queue import service
from app.timeutil import utcnow
from tests.delivery_helpers import (
    Behaviour,
    Peer,
    events,
    message_row,
    recipients_of,
    run_worker,
)
from tests.helpers import queue_message
from tests.smtpd_helpers import queued_id, running_listener

# aiosmtpd's Controller offers SMTPUTF8 unless told otherwise.
UTF8_MESSAGE = ("From: a@example.com\r\nTo: undisclosed-recipients:;\r\n"
                "Subject: Grüße\r\nMessage-ID: <utf8@example.com>\r\n\r\nHallo Jörg.\r\n"
                ).encode()
ASCII_MESSAGE = (b"From: a@example.com\r\nTo: undisclosed-recipients:;\r\n"
                 b"Subject: Hello\r\nMessage-ID: <ascii@example.com>\r\n\r\nHello.\r\n")


@pytest.fixture
def relay_app(app, make_app):
    """Apps whose worker relays to a given peer (the ``app`` fixture emptied the database)."""

    def factory(peer: Peer, **config):
        settings = {"relay_host": peer.address, "smtp_timeout": 2,
                    "retry_schedule": "60,300", "worker_concurrency": 2}
        settings.update(config)
        return make_app(**settings)

    return factory


def through_listener(app, recipients: list[str], raw: bytes, sender: str = "a@example.com",
                     smtputf8: bool = True) -> str:
    """Submit a message to the real listener of ``app`` (as a client would); its queue id."""
    options = ["SMTPUTF8", "BODY=8BITMIME"] if smtputf8 else []
    with running_listener(app) as port, smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("client.example")
        code, _ = client.mail(sender, options)
        assert code == 250
        for address in recipients:
            assert client.rcpt(address)[0] == 250
        code, reply = client.data(raw)
        assert code == 250, reply
    return queued_id(reply)


def queue_raw(app, sender: str, recipients: list[str], raw: bytes) -> str:
    with app.app_context():
        message = service.accept_message(db.session, sender=sender, recipients=recipients,
                                         raw=raw, origin="api")
        message_id = message.id
        db.session.remove()
    return message_id


def bounces(app) -> list[Message]:
    with app.app_context():
        rows = list(db.session.scalars(sa.select(Message).where(Message.origin == "bounce")))
        db.session.expunge_all()
        db.session.remove()
        return rows


def assert_no_leases(app, message_id: str) -> None:
    for recipient in recipients_of(app, message_id).values():
        assert recipient.lease_owner is None and recipient.lease_expires_at is None


# ----------------------------------------------------------------- SMTPUTF8 (RFC 6531)


def test_smtputf8_mail_goes_out_with_smtputf8_to_a_server_offering_it(relay_app):
    with Peer(enable_SMTPUTF8=True) as peer:
        app = relay_app(peer)
        message_id = through_listener(app, ["jörg@example.net"], UTF8_MESSAGE)
        run_worker(app)
    [received] = peer.received
    assert received.rcpt_tos == ["jörg@example.net"]
    assert "SMTPUTF8" in received.mail_options
    assert "Subject: Grüße".encode() in received.content
    assert message_row(app, message_id) is None  # delivered: left the queue
    [event] = events(app, message_id, "delivery")
    assert (event.recipient, event.smtp_code) == ("jörg@example.net", 250)


def test_non_ascii_recipient_fails_with_5_6_7_where_smtputf8_is_not_offered(relay_app):
    # It used to crash smtplib (UnicodeEncodeError in RCPT) and stay leased for ever.
    with Peer(enable_SMTPUTF8=False) as peer:
        app = relay_app(peer)
        message_id = through_listener(app, ["jörg@example.net", "bob@example.net"],
                                      ASCII_MESSAGE)
        run_worker(app)
    # The ASCII recipient is delivered as usual, without SMTPUTF8 (not needed).
    original = [r for r in peer.received if r.mail_from == "a@example.com"]
    assert [r.rcpt_tos for r in original] == [["bob@example.net"]]
    assert "SMTPUTF8" not in original[0].mail_options
    recipients = recipients_of(app, message_id)
    assert recipients["bob@example.net"].status == "delivered"
    failed = recipients["jörg@example.net"]
    assert failed.status == "failed" and failed.attempts == 1
    assert "Non-ASCII address not permitted for that recipient" in failed.last_error
    assert "SMTPUTF8" in failed.last_error
    assert_no_leases(app, message_id)
    [event] = events(app, message_id, "rejection")
    assert (event.recipient, event.enhanced_code, event.smtp_code) == (
        "jörg@example.net", "5.6.7", None)
    assert (event.delivery_host, event.delivery_ip) == ("127.0.0.1", "127.0.0.1")
    assert message_row(app, message_id).queue_state == "failed"
    # The sender hears about it (and the bounce itself went out through the same peer).
    [bounce] = [r for r in peer.received if r.mail_from == ""]
    assert bounce.rcpt_tos == ["a@example.com"]
    assert b"Status: 5.6.7" in bounce.content


def test_utf8_headers_received_with_smtputf8_fail_where_smtputf8_is_not_offered(relay_app):
    with Peer(enable_SMTPUTF8=False) as peer:
        app = relay_app(peer, send_bounces=False)
        message_id = through_listener(app, ["bob@example.net"], UTF8_MESSAGE)
        run_worker(app)
    assert peer.received == []
    [recipient] = recipients_of(app, message_id).values()
    assert recipient.status == "failed"
    assert "message received with SMTPUTF8, UTF-8 headers" in recipient.last_error
    [event] = events(app, message_id, "rejection")
    assert event.enhanced_code == "5.6.7"


def test_ascii_mail_received_with_smtputf8_needs_no_smtputf8(relay_app):
    # RFC 6531 3.4: SMTPUTF8 is not asked for when nothing in the mail needs it.
    with Peer(enable_SMTPUTF8=False) as peer:
        app = relay_app(peer)
        message_id = through_listener(app, ["bob@example.net"], ASCII_MESSAGE)
        run_worker(app)
    assert [r.rcpt_tos for r in peer.received] == [["bob@example.net"]]
    assert "SMTPUTF8" not in peer.received[0].mail_options
    assert message_row(app, message_id) is None


def test_non_ascii_sender_fails_every_recipient_where_smtputf8_is_not_offered(relay_app):
    with Peer(enable_SMTPUTF8=False) as peer:
        app = relay_app(peer, send_bounces=False)
        message_id = queue_raw(app, "jörg@example.com", ["bob@example.net", "carol@example.net"],
                               ASCII_MESSAGE)
        run_worker(app)
    assert peer.received == []
    recipients = recipients_of(app, message_id)
    assert {r.status for r in recipients.values()} == {"failed"}
    assert all("non-ASCII sender address" in r.last_error for r in recipients.values())
    assert {e.enhanced_code for e in events(app, message_id, "rejection")} == {"5.6.7"}
    assert_no_leases(app, message_id)


def test_non_ascii_domain_goes_as_a_labels_where_smtputf8_is_not_offered(relay_app):
    with Peer(enable_SMTPUTF8=False) as peer:
        app = relay_app(peer)
        message_id = queue_raw(app, "a@bücher.example", ["bob@bücher.example"], ASCII_MESSAGE)
        run_worker(app)
    [received] = peer.received
    assert received.mail_from == "a@xn--bcher-kva.example"
    assert received.rcpt_tos == ["bob@xn--bcher-kva.example"]
    assert message_row(app, message_id) is None
    [event] = events(app, message_id, "delivery")
    assert event.recipient == "bob@bücher.example"  # the address as the queue knows it


def test_a_reused_connection_leaves_smtputf8_behind(relay_app):
    # smtplib keeps UTF-8 command encoding after an SMTPUTF8 transaction; the next message
    # on the same connection must be judged on its own (and not claim SMTPUTF8).
    with Peer(enable_SMTPUTF8=True) as peer:
        app = relay_app(peer, worker_concurrency=1)
        first = queue_raw(app, "a@example.com", ["jörg@example.net"], ASCII_MESSAGE)
        second = queue_raw(app, "a@example.com", ["bob@example.net"], ASCII_MESSAGE)
        run_worker(app)
    by_rcpt = {r.rcpt_tos[0]: r for r in peer.received}
    assert "SMTPUTF8" in by_rcpt["jörg@example.net"].mail_options
    assert "SMTPUTF8" not in by_rcpt["bob@example.net"].mail_options
    assert message_row(app, first) is None and message_row(app, second) is None


# ----------------------------------------------------------------- 8-bit bodies (RFC 6152)

EIGHT_BIT = ("From: a@example.com\r\nTo: bob@example.net\r\nSubject: 8bit\r\n"
             "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
             "Content-Transfer-Encoding: 8bit\r\n\r\nGrüße.\r\n").encode()


def test_8bit_body_goes_with_body_8bitmime_where_offered(relay_app):
    with Peer(enable_SMTPUTF8=False) as peer:
        app = relay_app(peer)
        message_id = queue_raw(app, "a@example.com", ["bob@example.net"], EIGHT_BIT)
        run_worker(app)
    [received] = peer.received
    assert "BODY=8BITMIME" in received.mail_options
    assert "SMTPUTF8" not in received.mail_options
    assert "Grüße".encode() in received.content
    assert message_row(app, message_id) is None


def test_8bit_body_to_a_server_without_8bitmime_is_sent_unchanged(relay_app):
    # Not converted to 7 bits (see docs/DELIVERY.md): whatever the server answers is the
    # recorded outcome. This one (aiosmtpd decoding data, so no 8BITMIME) refuses it.
    with Peer(decode_data=True, enable_SMTPUTF8=False) as peer:
        app = relay_app(peer, send_bounces=False)
        message_id = queue_raw(app, "a@example.com", ["bob@example.net"], EIGHT_BIT)
        run_worker(app)
    assert peer.received == []
    [recipient] = recipients_of(app, message_id).values()
    assert (recipient.status, recipient.last_error) == ("failed", "500 Error: strict ASCII mode")
    assert recipient.lease_owner is None


# ----------------------------------------------------------------- control characters


def test_control_characters_in_remote_replies_are_recorded_sanitised(relay_app):
    # PostgreSQL refuses NUL in text: recording used to fail there, the lease stayed and the
    # accepted recipient was delivered again when it expired.
    behaviour = Behaviour(rcpt_replies={"carol@example.net": "550 5.1.1 no\x00pe\x1b[31m"},
                          data_reply="250 2.0.0 ok\x00x\x7f")
    with Peer(behaviour) as peer:
        app = relay_app(peer, send_bounces=False)
        message_id = queue_raw(app, "a@example.com", ["bob@example.net", "carol@example.net"],
                               ASCII_MESSAGE)
        run_worker(app)
        run_worker(app)  # nothing is left to (re)deliver
    assert peer.recipients_received() == ["bob@example.net"]
    recipients = recipients_of(app, message_id)
    assert recipients["bob@example.net"].status == "delivered"
    assert recipients["carol@example.net"].status == "failed"
    assert recipients["carol@example.net"].last_error == "550 5.1.1 no?pe?[31m"
    assert_no_leases(app, message_id)
    [delivered] = events(app, message_id, "delivery")
    assert (delivered.message, delivered.smtp_code, delivered.enhanced_code) == (
        "250 2.0.0 ok?x?", 250, "2.0.0")
    [rejected] = events(app, message_id, "rejection")
    assert rejected.enhanced_code == "5.1.1"


def test_results_are_sanitised_and_bounded_wherever_they_come_from():
    result = RecipientResult(1, "bob@example.net", "tempfail",
                             "451 \udcff lone surrogate\r\nand\x85 C1 " + "x" * 5000,
                             451, "4.0.0", "mx\x00.example.net", "127.0.0.1\x00")
    assert result.text.startswith("451 ? lone surrogate and? C1 x")
    assert len(result.text) == 2000 and result.text.endswith("...")
    assert (result.remote_host, result.remote_ip) == ("mx?.example.net", "127.0.0.1?")


# ----------------------------------------------------------------- unexpected errors


class BuggyResolver:
    """A resolver that fails the way no DNS outcome does (a bug, not an answer)."""

    def resolve(self, qname, rdtype, **kwargs):
        raise RuntimeError("resolver bug")


@pytest.fixture
def mx_app(app, make_app):
    return make_app(relay_host="", retry_schedule="60,300", worker_concurrency=2)


def test_an_unexpected_error_is_a_temporary_failure_logged_once(mx_app, caplog):
    with mx_app.app_context():
        message_id = queue_message(db.session)
        db.session.remove()
    before = utcnow()
    with caplog.at_level(logging.ERROR, logger="elemta.delivery"):
        run_worker(mx_app, resolver=BuggyResolver())
    errors = [r for r in caplog.records
              if r.name == "elemta.delivery" and r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None
    assert message_id in errors[0].getMessage()
    [recipient] = recipients_of(mx_app, message_id).values()
    assert recipient.status == "deferred" and recipient.attempts == 1
    assert recipient.last_error == (
        "internal error: RuntimeError: resolver bug (see the worker log)")
    assert recipient.lease_owner is None
    # The retry schedule applies (first step 60 s, +-10%).
    assert recipient.next_attempt_at >= before + dt.timedelta(seconds=54)
    assert message_row(mx_app, message_id).queue_state == "deferred"
    [event] = events(mx_app, message_id, "tempfail")
    assert event.message == recipient.last_error and event.action == "deferred"


def test_an_unexpected_error_past_the_queue_lifetime_fails_and_bounces(mx_app):
    with mx_app.app_context():
        message_id = queue_message(db.session,
                                   created_at=utcnow() - dt.timedelta(days=6))
        db.session.remove()
    run_worker(mx_app, resolver=BuggyResolver())
    [recipient] = recipients_of(mx_app, message_id).values()
    assert recipient.status == "failed"
    assert recipient.last_error.startswith("Queue lifetime expired (last error: internal error")
    assert message_row(mx_app, message_id).queue_state == "failed"
    [bounce] = bounces(mx_app)
    assert [r.address for r in recipients_of(mx_app, bounce.id).values()] == [
        "alice@example.com"]


# ----------------------------------------------------------------- the content service


def test_content_service_prefetches_small_messages_and_loads_the_rest(app):
    small = queue_raw(app, "a@example.com", ["bob@example.net"], ASCII_MESSAGE)
    large = queue_raw(app, "", ["bob@example.net"], ASCII_MESSAGE + b"x" * 1000 + b"\r\n")
    with app.app_context():
        fetched = content.prefetch(db.session, [small, large, "msg-gone"], max_bytes=500)
        assert fetched == {small: ("a@example.com", ASCII_MESSAGE), large: ("", None)}
        assert content.load(db.session, large)[1].endswith(b"x\r\n")
        assert content.load(db.session, "msg-gone") is None
        assert content.prefetch(db.session, [], max_bytes=500) == {}
        db.session.remove()

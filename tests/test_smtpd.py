"""The SMTP listener accepts mail into the queue (API.md §11), with smtplib as the client."""

from __future__ import annotations

import smtplib

import pytest
import sqlalchemy as sa

from app.extensions import db
from app.models import DeliveryRollup
from app.queue import service
from app.smtpd.stamping import has_message_id
from tests.smtpd_helpers import (
    CLIENT_DATE,
    crlf,
    email_message,
    queued_id,
    raw_of,
    running_listener,
    stored,
)


@pytest.fixture
def port(app):
    with running_listener(app) as listening_port:
        yield listening_port


def test_ehlo_advertises_the_extensions(port, app):
    with smtplib.SMTP("127.0.0.1", port) as client:
        code, _ = client.ehlo("client.example")
        assert code == 250
        for extension in ("pipelining", "8bitmime", "smtputf8", "size"):
            assert client.has_extn(extension), extension
        assert client.esmtp_features["size"] == str(app.config["MAX_MESSAGE_BYTES"])
        assert not client.has_extn("starttls")  # no certificate configured


def test_help_lists_every_command_including_the_ones_elemta_overrides(port):
    with smtplib.SMTP("127.0.0.1", port) as client:
        client.ehlo("client.example")
        code, text = client.docmd("HELP")
        assert code == 250
        assert {"MAIL", "RCPT", "DATA", "RSET", "EHLO", "QUIT"} <= set(text.decode().split())
        assert client.docmd("HELP", "MAIL")[0] == 250


def test_plain_message_is_queued_before_the_250_with_its_id(port, app):
    msg = email_message(subject="Plain")
    with smtplib.SMTP("127.0.0.1", port) as client:
        client.ehlo("client.example")
        client.mail("alice@example.com")
        client.rcpt("bob@example.net")
        code, reply = client.data(crlf(msg))
    assert code == 250
    assert reply.startswith(b"2.0.0 Ok: queued as msg-")
    message_id = queued_id(reply)

    # The reply came after the commit: the message is there as soon as the client has it.
    with app.app_context():
        message = service.get_message(db.session, message_id)
        assert message.sender == "alice@example.com"
        assert message.origin == "smtp"
        assert message.queue_state == "pending"
        assert message.subject == "Plain"
        assert [r.address for r in message.recipients] == ["bob@example.net"]
        events = service.message_timeline(db.session, message_id)
        assert [e.event_type for e in events] == ["reception"]
        assert events[0].delivery_ip == "127.0.0.1"
        assert events[0].delivery_host == "client.example"
        db.session.remove()
    raw = raw_of(app, message_id)
    assert raw.startswith(b"Received: from client.example ([127.0.0.1])\r\n\tby mx.test.example "
                          b"(Elemta) with ESMTP\r\n\tfor <bob@example.net>;")
    # The client's Message-ID is kept, not replaced, and the rest is byte for byte.
    assert raw.count(b"Message-ID:") == 1 and b"<client-id@example.com>" in raw
    assert raw.endswith(crlf(msg))


def test_message_id_and_date_are_added_when_missing(port, app):
    msg = email_message(message_id=None, date=None)
    with smtplib.SMTP("127.0.0.1", port) as client:
        assert client.sendmail("alice@example.com", ["bob@example.net"], crlf(msg)) == {}
    messages = stored(app)["messages"]
    assert len(messages) == 1
    raw = raw_of(app, messages[0].id)
    assert has_message_id(raw)
    assert b"Message-ID: <" in raw and b"@mx.test.example>" in raw
    head = raw.split(b"\r\n\r\n")[0].decode()
    [date] = [line for line in head.split("\r\n") if line.startswith("Date: ")]
    assert date.endswith(" +0000")  # RFC 5322 numeric zone, not "GMT"
    received = head.split("\r\nFrom: ")[0]  # the Received field, its lines folded with TABs
    assert received.startswith("Received: ") and received.endswith(" +0000")


def test_a_date_given_by_the_client_is_kept(port, app):
    with smtplib.SMTP("127.0.0.1", port) as client:
        client.sendmail("alice@example.com", ["bob@example.net"], crlf(email_message()))
    raw = raw_of(app, stored(app)["messages"][0].id)
    assert raw.count(b"\r\nDate: ") == 1 and f"Date: {CLIENT_DATE}".encode() in raw


def test_multiple_recipients_make_one_message(port, app):
    to = ["bob@example.net", "carol@example.org", "dave@example.org", "Bob@example.net"]
    with smtplib.SMTP("127.0.0.1", port) as client:
        assert client.sendmail("alice@example.com", to, crlf(email_message())) == {}
    data = stored(app)
    assert len(data["messages"]) == 1
    # One delivery per mailbox: the same address in another case is not delivered twice.
    assert data["recipients"] == ["bob@example.net", "carol@example.org", "dave@example.org"]
    assert [e.event_type for e in data["events"]] == ["reception"]
    raw = raw_of(app, data["messages"][0].id)
    assert b"\tfor <" not in raw  # several recipients: not named in the trace header


def test_pipelined_commands_are_answered_in_order(port, app):
    body = crlf(email_message())
    with smtplib.SMTP("127.0.0.1", port) as client:
        client.ehlo("client.example")
        assert client.does_esmtp and client.has_extn("pipelining")
        # One write for the whole envelope, as a pipelining client does (RFC 2920).
        client.send(b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.net>\r\n"
                    b"RCPT TO:<bob>\r\nRCPT TO:<carol@example.org>\r\nDATA\r\n")
        replies = [client.getreply() for _ in range(5)]
        assert [code for code, _ in replies] == [250, 250, 501, 250, 354]
        # The message, its end and the next transaction's envelope in one write again.
        client.send(body + b".\r\nMAIL FROM:<<>>\r\n".replace(b"<<>>", b"<>")
                    + b"RCPT TO:<erin@example.com>\r\nDATA\r\n")
        first, mail2, rcpt2, data2 = (client.getreply() for _ in range(4))
        assert first[0] == 250 and mail2[0] == 250 and rcpt2[0] == 250 and data2[0] == 354
        client.send(body + b".\r\nQUIT\r\n")
        second = client.getreply()
        assert second[0] == 250
        assert client.getreply()[0] == 221
        client.close()
    data = stored(app)
    by_id = {m.id: m for m in data["messages"]}
    assert set(by_id) == {queued_id(first[1]), queued_id(second[1])}
    assert by_id[queued_id(second[1])].sender == ""  # the null sender of a bounce
    assert sorted(data["recipients"]) == ["bob@example.net", "carol@example.org",
                                          "erin@example.com"]


def test_8bit_message_is_stored_byte_for_byte(port, app):
    raw = ("From: alice@example.com\r\nTo: bob@example.net\r\nSubject: Grüße\r\n"
           f"Date: {CLIENT_DATE}\r\n"
           "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
           "Content-Transfer-Encoding: 8bit\r\nMessage-ID: <8bit@example.com>\r\n\r\n"
           "Grüße, naïve café — ✓\r\n").encode() + b"latin-1 \xe9t\xe9\r\n"
    with smtplib.SMTP("127.0.0.1", port) as client:
        client.ehlo("client.example")
        assert client.has_extn("8bitmime")
        client.mail("alice@example.com", ["BODY=8BITMIME"])
        client.rcpt("bob@example.net")
        code, reply = client.data(raw)
    assert code == 250
    stored_raw = raw_of(app, queued_id(reply))
    assert stored_raw.endswith(raw)


def test_smtputf8_addresses_are_accepted(port, app):
    sender, recipient = "pelé@exämple.com", "用户@例子.测试"
    raw = (f"From: {sender}\r\nTo: {recipient}\r\nSubject: ünïcode\r\nDate: {CLIENT_DATE}\r\n"
           "Message-ID: <u8@example.com>\r\n\r\nhi\r\n").encode()
    with smtplib.SMTP("127.0.0.1", port) as client:
        client.ehlo("client.example")
        assert client.has_extn("smtputf8")
        assert client.sendmail(sender, [recipient], raw,
                               mail_options=["SMTPUTF8", "BODY=8BITMIME"]) == {}
    data = stored(app)
    assert data["messages"][0].sender == sender
    assert data["recipients"] == [recipient]
    assert raw_of(app, data["messages"][0].id).endswith(raw)
    assert b"with UTF8SMTP" in raw_of(app, data["messages"][0].id)


def test_8bit_and_smtputf8_headers_read_as_utf8_in_the_queue_and_detail(port, app):
    # Raw UTF-8 header values (SMTPUTF8, 8BITMIME), an RFC 2047 word beside raw UTF-8, a
    # folded raw value and one stray Latin-1 byte (not UTF-8: replaced, not an error).
    raw = (f"From: Pelé <pelé@exämple.com>\r\nTo: 用户@例子.测试\r\nDate: {CLIENT_DATE}\r\n"
           "Subject: Grüße aus Köln – 日本\r\n"
           "X-Mixed: =?utf-8?q?caf=C3=A9?= und Bär\r\n"
           "X-Folded: Straße\r\n und Weg\r\n"
           "Message-ID: <u8-headers@example.com>\r\n").encode() + (
           b"X-Latin: caf\xe9\r\n\r\nhi\r\n")
    with smtplib.SMTP("127.0.0.1", port) as client:
        client.ehlo("client.example")
        assert client.sendmail("pelé@exämple.com", ["用户@例子.测试"], raw,
                               mail_options=["SMTPUTF8", "BODY=8BITMIME"]) == {}
    [message] = stored(app)["messages"]
    assert message.subject == "Grüße aus Köln – 日本"
    assert raw_of(app, message.id).endswith(raw)  # stored byte for byte all the same

    body = app.test_client().get(f"/api/queue/message/{message.id}").get_json()
    assert body["subject"] == "Grüße aus Köln – 日本"
    headers = [(name, value) for name, value in body["headers"] if name != "Received"]
    assert headers == [
        ("From", "Pelé <pelé@exämple.com>"), ("To", "用户@例子.测试"), ("Date", CLIENT_DATE),
        ("Subject", "Grüße aus Köln – 日本"), ("X-Mixed", "café und Bär"),
        ("X-Folded", "Straße und Weg"), ("Message-ID", "<u8-headers@example.com>"),
        ("X-Latin", "caf\ufffd"),
    ]
    listed = app.test_client().get("/api/queue/pending").get_json()
    assert [m["subject"] for m in listed] == ["Grüße aus Köln – 日本"]


def test_rfc2047_subject_is_still_decoded(port, app):
    msg = email_message(subject="Überweisung für Zoë ✓")  # EmailMessage encodes it (RFC 2047)
    assert b"=?utf-8?" in crlf(msg)
    with smtplib.SMTP("127.0.0.1", port) as client:
        assert client.sendmail("alice@example.com", ["bob@example.net"], crlf(msg)) == {}
    [message] = stored(app)["messages"]
    assert message.subject == "Überweisung für Zoë ✓"
    body = app.test_client().get(f"/api/queue/message/{message.id}").get_json()
    assert body["subject"] == "Überweisung für Zoë ✓"
    assert ["Subject", "Überweisung für Zoë ✓"] in body["headers"]


def test_non_ascii_address_without_smtputf8_is_refused(port, app):
    with smtplib.SMTP("127.0.0.1", port) as client:
        client.ehlo("client.example")
        client.mail("alice@example.com")
        client.send("RCPT TO:<用户@例子.测试>\r\n".encode())  # a client ignoring SMTPUTF8
        code, reply = client.getreply()
    assert code == 553 and reply.startswith(b"5.6.7")
    data = stored(app)
    assert data["messages"] == []
    assert [e.event_type for e in data["events"]] == ["rejection"]


def test_malformed_addresses_are_refused_with_a_rejection_event(port, app):
    with smtplib.SMTP("127.0.0.1", port) as client:
        client.ehlo("client.example")
        assert client.docmd("MAIL FROM:<alice>")[0] == 501
        assert client.docmd("MAIL FROM:<<<nonsense")[0] in (501, 553)
        assert client.mail("alice@example.com")[0] == 250
        assert client.docmd("RCPT TO:<bob>")[0] == 501
        assert client.docmd("RCPT TO:<bob@exa mple.net>")[0] in (501, 553)
        assert client.docmd("RCPT TO:<bob@example..net>")[0] in (501, 553)
        # Out of order is a client bug, not a refusal of mail: no event.
        assert client.docmd("MAIL FROM:<again@example.com>")[0] == 503
    events = stored(app)["events"]
    assert [e.event_type for e in events] == ["rejection"] * 5
    assert {e.smtp_code for e in events} <= {501, 553}
    assert events[2].recipient == "bob"
    assert events[2].enhanced_code == "5.1.3"
    assert all(e.delivery_ip == "127.0.0.1" for e in events)
    with app.app_context():  # refusals are not delivery outcomes: the rollup is untouched
        assert db.session.scalar(sa.select(sa.func.count()).select_from(DeliveryRollup)) == 0
        db.session.remove()


@pytest.mark.parametrize("command, code, stored_address", [
    ("MAIL FROM:<al\x00ice@example.com>", 501, "al\\x00ice@example.com"),
    ("MAIL FROM:<alice@exam\x00ple.com>", 501, "alice@exam\\x00ple.com"),
    ("MAIL FROM:<al\x1bice@example.com>", 501, "al\\x1bice@example.com"),
    ("RCPT TO:<b\x00ob@example.net>", 501, "b\\x00ob@example.net"),
    ("RCPT TO:<bob@example.net\x00>", 501, "bob@example.net\\x00"),
    ("RCPT TO:<b\x7fob@example.net>", 501, "b\\x7fob@example.net"),
    ("RCPT TO:<b\x08ob@example.net>", 501, "b\\x08ob@example.net"),
    # C1 controls are UTF-8 characters: under SMTPUTF8 they got through as an address.
    ("RCPT TO:<b\u0085ob@example.net>", 501, "b\\x85ob@example.net"),
    ("RCPT TO:<bob@exa\u009bmple.net>", 501, "bob@exa\\x9bmple.net"),
])
def test_control_characters_in_envelope_addresses_are_refused(port, app, command, code,
                                                              stored_address):
    # Each refusal is recorded (on PostgreSQL a NUL made the event's INSERT fail: refused
    # silently), with the control characters written out; the session goes on, and the
    # message that follows holds only the valid addresses.
    stage = command.split()[0]
    with smtplib.SMTP("127.0.0.1", port) as client:
        client.ehlo("client.example")
        if stage == "RCPT":
            assert client.mail("alice@example.com", ["SMTPUTF8"])[0] == 250
        client.send(command.encode("utf-8") + b"\r\n")
        refused, reply = client.getreply()
        if stage == "MAIL":
            assert client.mail("alice@example.com", ["SMTPUTF8"])[0] == 250
        assert client.rcpt("carol@example.net")[0] == 250
        assert client.data(crlf(email_message(to="carol@example.net")))[0] == 250
    assert refused == code, reply
    # Ours carry the enhanced code; aiosmtpd's own path parser refuses some with "Syntax".
    assert reply.startswith((b"5.1.7 " if stage == "MAIL" else b"5.1.3 ", b"Syntax: ")), reply
    data = stored(app)
    [message] = data["messages"]
    assert (message.sender, data["recipients"]) == ("alice@example.com", ["carol@example.net"])
    rejection, reception = data["events"]
    assert (rejection.event_type, rejection.smtp_code, reception.event_type) == (
        "rejection", code, "reception")
    refused_address = rejection.sender if stage == "MAIL" else rejection.recipient
    assert refused_address == stored_address
    assert raw_of(app, message.id).count(b"\x00") == 0


def test_control_characters_in_the_helo_name_are_stored_written_out(port, app):
    # The HELO name goes into the reception event: a NUL in it made every message of such a
    # client fail with 451 on PostgreSQL. The Received: header had its own cleaning already.
    with smtplib.SMTP("127.0.0.1", port) as client:
        assert client.ehlo("client\x00.example")[0] == 250
        assert client.sendmail("alice@example.com", ["bob@example.net"],
                               crlf(email_message())) == {}
    data = stored(app)
    [message] = data["messages"]
    [reception] = data["events"]
    assert reception.delivery_host == "client\\x00.example"
    assert raw_of(app, message.id).startswith(b"Received: from client?.example ([127.0.0.1])")


def test_one_session_carries_several_messages(port, app):
    with smtplib.SMTP("127.0.0.1", port) as client:
        for n in range(3):
            assert client.sendmail("alice@example.com", [f"r{n}@example.net"],
                                   crlf(email_message(subject=f"n{n}"))) == {}
    assert sorted(m.subject for m in stored(app)["messages"]) == ["n0", "n1", "n2"]


def test_plain_smtp_client_with_helo(port, app):
    with smtplib.SMTP("127.0.0.1", port) as client:
        assert client.helo("old.example")[0] == 250
        assert client.sendmail("alice@example.com", ["bob@example.net"],
                               crlf(email_message())) == {}
        assert not client.does_esmtp
    (message,) = stored(app)["messages"]
    assert raw_of(app, message.id).startswith(
        b"Received: from old.example ([127.0.0.1])\r\n\tby mx.test.example (Elemta) with SMTP\r\n")


def test_bare_lf_line_ends_are_stored_as_crlf(port, app):
    """smtplib sends bytes unchanged: a short message with LF line ends arrives as such."""
    lf_message = email_message(subject="LF").as_bytes()
    assert b"\r\n" not in lf_message
    with smtplib.SMTP("127.0.0.1", port) as client:
        client.ehlo("client.example")
        client.mail("alice@example.com")
        client.rcpt("bob@example.net")
        code, reply = client.data(lf_message)
    assert code == 250
    raw = raw_of(app, queued_id(reply))
    assert b"\n" not in raw.replace(b"\r\n", b"")
    # smtplib ends the data with CRLF when it does not: "...\n" + "\r\n".
    assert raw.endswith(lf_message.replace(b"\n", b"\r\n") + b"\r\n")


def _construction(session, loop) -> dict:
    """A session's attributes, comparable between two sessions: bound methods as (function,
    bound to the session itself or to what), asyncio objects by type."""
    import asyncio
    import inspect
    import weakref

    def norm(value):
        if isinstance(value, dict):
            return {key: norm(item) for key, item in value.items()}
        if isinstance(value, tuple):
            return tuple(norm(item) for item in value)
        if inspect.ismethod(value):
            return ("method", value.__func__,
                    "session" if value.__self__ is session else value.__self__)
        if isinstance(value, asyncio.StreamReader):
            return ("reader", value._limit, value._loop is loop)
        if isinstance(value, (weakref.ref, asyncio.Future)):
            return type(value)
        return value

    return {key: norm(value) for key, value in vars(session).items()}


@pytest.mark.parametrize("options", [
    {},
    {"hostname": "mx.example", "ident": "Elemta ESMTP", "data_size_limit": 1000,
     "enable_SMTPUTF8": True, "decode_data": False, "timeout": 30, "auth_require_tls": False},
    {"tls_context": "server", "proxy_protocol_timeout": 30, "require_starttls": True},
    {"auth_exclude_mechanism": ["LOGIN"], "auth_required": True, "data_size_limit": None,
     "authenticator": print},
    {"auth_callback": print, "ident": ""},
])
def test_a_session_is_built_as_aiosmtpd_builds_it(options, monkeypatch):
    """``ElemtaSMTP`` builds its sessions without aiosmtpd's per-connection method lookups
    (``inspect.getmembers``): the session has every attribute aiosmtpd's own constructor
    gives it, with the same values (and the same methods and hooks)."""
    import asyncio
    import ssl
    import types

    from app.smtpd import protocol
    from app.smtpd.handler import QueueHandler

    handler = QueueHandler(types.SimpleNamespace(relay_networks=["127.0.0.0/8"]), None, None)
    loop = asyncio.new_event_loop()
    try:
        options = dict(options, loop=loop)
        if options.get("tls_context") == "server":
            options["tls_context"] = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ours = protocol.ElemtaSMTP(handler, listener=None, **options)
        assert protocol._lookups(protocol.ElemtaSMTP, handler) is not None
        monkeypatch.setattr(protocol, "_lookups", lambda _protocol, _handler: None)
        theirs = protocol.ElemtaSMTP(handler, listener=None, **options)
        assert _construction(ours, loop) == _construction(theirs, loop)
        assert set(ours._smtp_methods) >= {"EHLO", "MAIL", "RCPT", "DATA", "QUIT"}
        assert set(ours._handle_hooks) >= {"EHLO", "RCPT", "DATA"}
        assert ours._auth_methods  # PLAIN and LOGIN, the handler's own
    finally:
        loop.close()


def test_sessions_of_one_handler_share_its_bound_hooks():
    """The handler's hooks and AUTH methods are bound once per handler: two sessions share
    them (aiosmtpd only reads them); a session that excludes a mechanism gets its own
    mapping and leaves the shared one whole; another handler gets its own."""
    import asyncio
    import types

    from app.smtpd import protocol
    from app.smtpd.handler import QueueHandler

    settings = types.SimpleNamespace(relay_networks=["127.0.0.0/8"])
    handler = QueueHandler(settings, None, None)
    loop = asyncio.new_event_loop()
    try:
        one = protocol.ElemtaSMTP(handler, listener=None, loop=loop)
        two = protocol.ElemtaSMTP(handler, listener=None, loop=loop)
        assert one._handle_hooks is two._handle_hooks
        assert one._auth_methods is two._auth_methods
        assert one._handle_hooks["DATA"] == handler.handle_DATA
        assert sorted(one._auth_methods) == ["LOGIN", "PLAIN"]
        assert one._smtp_methods["DATA"].__self__ is one  # the commands are each session's
        assert two._smtp_methods["DATA"].__self__ is two
        without = protocol.ElemtaSMTP(handler, listener=None, loop=loop,
                                      auth_exclude_mechanism=["LOGIN"])
        assert sorted(without._auth_methods) == ["PLAIN"]
        assert sorted(one._auth_methods) == ["LOGIN", "PLAIN"]
        other = protocol.ElemtaSMTP(QueueHandler(settings, None, None), listener=None,
                                    loop=loop)
        assert other._handle_hooks is not one._handle_hooks
    finally:
        loop.close()


def test_aiosmtpds_command_log_looks_at_the_level_first(caplog):
    """aiosmtpd logs every command line through ``sanitized_log``: below the level of
    ``mail.log`` nothing is formatted; at the level, the line is logged with AUTH data
    masked, as aiosmtpd does."""
    import logging

    import aiosmtpd.smtp as aiosmtpd_smtp

    from app.smtpd import protocol

    assert aiosmtpd_smtp.sanitized_log is protocol.sanitized_log
    mail_log = logging.getLogger("mail.log")

    class Loud:
        def __repr__(self):
            raise AssertionError("formatted below the level")

    old = mail_log.level
    try:
        mail_log.setLevel(logging.ERROR)
        with caplog.at_level(logging.ERROR, logger="mail.log"):
            aiosmtpd_smtp.sanitized_log(mail_log.info, "%r >> %r", Loud(), b"AUTH PLAIN x\r\n")
            aiosmtpd_smtp.sanitized_log(mail_log.debug, "readline: %r", Loud())
        assert not caplog.records
        with caplog.at_level(logging.DEBUG, logger="mail.log"):
            aiosmtpd_smtp.sanitized_log(mail_log.info, "%r >> %r", "peer",
                                        b"AUTH PLAIN c2VjcmV0\r\n")
        assert [r.getMessage() for r in caplog.records] == [
            "'peer' >> b'AUTH PLAIN ********\\r\\n'"]
    finally:
        mail_log.setLevel(old)


def test_a_handler_with_hooks_of_its_own_gets_aiosmtpds_constructor():
    """Lookups are kept per class: a handler with a hook set on the instance is looked up
    as aiosmtpd does."""
    import types

    from app.smtpd import protocol

    handler = types.SimpleNamespace(handle_DATA=lambda *args: "250 OK")
    assert protocol._lookups(protocol.ElemtaSMTP, handler) is None


def test_the_client_address_follows_the_session_and_its_proxy_header():
    """``client_ip`` is parsed once per session and PROXY header: a new session (STARTTLS
    starts one) or a PROXY header read later gives the address of those, not the kept one."""
    import asyncio
    import ipaddress
    import types

    from aiosmtpd.smtp import Session

    from app.smtpd import protocol
    from app.smtpd.handler import QueueHandler

    handler = QueueHandler(types.SimpleNamespace(relay_networks=["127.0.0.0/8"]), None, None)
    loop = asyncio.new_event_loop()
    try:
        server = protocol.ElemtaSMTP(handler, listener=None, loop=loop)
        assert server.client_ip is None
        server.session = Session(loop)
        server.session.peer = ("::ffff:192.0.2.7", 2525, 0, 0)
        assert server.client_ip == ipaddress.ip_address("192.0.2.7")
        assert server.client_ip == ipaddress.ip_address("192.0.2.7")
        server.session.proxy_data = types.SimpleNamespace(src_addr="198.51.100.9")
        assert server.client_ip == ipaddress.ip_address("198.51.100.9")
        server.session.proxy_data = types.SimpleNamespace(src_addr=None)
        assert server.client_ip == ipaddress.ip_address("192.0.2.7")
        server.session = Session(loop)
        server.session.peer = ("203.0.113.5", 25)
        assert server.client_ip == ipaddress.ip_address("203.0.113.5")
        server.session = Session(loop)
        server.session.peer = "not an address"
        assert server.client_ip is None
    finally:
        loop.close()

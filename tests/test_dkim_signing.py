"""DKIM signing at acceptance, verified as receivers verify it (issue 14).

Keys are published in a DNS server on loopback; dkimpy, Mail::DKIM and OpenDKIM verify the stored
message, the bytes every delivery attempt sends.
"""

from __future__ import annotations

import logging
import smtplib

import pytest
import sqlalchemy as sa

from app.dkim import keys as dkim_keys
from app.dkim.signing import signatures_of
from app.extensions import db
from app.models import Message, MessageContent
from app.queue import service
from tests.delivery_helpers import Behaviour, Peer, run_worker
from tests.dkim_verifiers import dkimpy_verifies, opendkim_results, perl_results
from tests.dns_server import LoopbackDns
from tests.helpers import queue_message
from tests.smtpd_helpers import crlf, email_message, queued_id, raw_of, running_listener


@pytest.fixture
def zone():
    with LoopbackDns() as server:
        yield server


def make_key(app, zone, domain="example.com", algorithm="rsa", selector=None, publish=True):
    with app.app_context():
        key = dkim_keys.create_key(db.session, domain, selector, algorithm)
        record = dkim_keys.dns_record(key)
        state, selector = key.state, key.selector
        db.session.remove()
    if publish:
        zone.add(record.name, "TXT", record.value)
    return selector, state


def send_over_smtp(app, sender="Alice <alice@example.com>", subject="Hello",
                   recipients=("bob@example.net",)) -> bytes:
    with running_listener(app) as port, smtplib.SMTP("127.0.0.1", port) as client:
        client.ehlo("app.example")
        client.mail("alice@example.com")
        for recipient in recipients:
            client.rcpt(recipient)
        code, reply = client.data(crlf(email_message(sender=sender, subject=subject)))
    assert code == 250
    return raw_of(app, queued_id(reply))


def tampered(raw: bytes) -> bytes:
    """What a careless relay might do: change a signed header and the body."""
    return raw.replace(b"Subject: Hello", b"Subject: Hello!").replace(b"Hi there.", b"Hi!")


def test_rsa_signature_verifies_with_dkimpy_and_mail_dkim(app, zone):
    selector, state = make_key(app, zone, algorithm="rsa")
    assert state == "active"
    raw = send_over_smtp(app)
    assert [s.as_dict() for s in signatures_of(raw)] == [
        {"domain": "example.com", "selector": selector, "algorithm": "rsa"}]
    head = raw.split(b"\r\n\r\n")[0]
    assert b"a=rsa-sha256" in head and b"c=relaxed/relaxed" in head and b" l=" not in head
    assert dkimpy_verifies(raw, zone) == [True]
    [perl] = perl_results(raw, zone)
    assert perl.startswith(f"example.com {selector} pass"), perl

    bad = tampered(raw)
    assert dkimpy_verifies(bad, zone) == [False]
    [perl] = perl_results(bad, zone)
    assert " fail " in f"{perl} ", perl


def test_ed25519_signature_verifies_with_dkimpy(app, zone):
    make_key(app, zone, algorithm="ed25519")
    raw = send_over_smtp(app)
    assert [s.algorithm for s in signatures_of(raw)] == ["ed25519"]
    assert b"a=ed25519-sha256" in raw
    assert dkimpy_verifies(raw, zone) == [True]
    assert dkimpy_verifies(tampered(raw), zone) == [False]


@pytest.mark.parametrize("algorithms", [("rsa",), ("ed25519",), ("rsa", "ed25519")])
def test_signatures_verify_with_opendkim(app, zone, algorithms):
    for algorithm in algorithms:
        make_key(app, zone, algorithm=algorithm)
    raw = send_over_smtp(app)
    assert sorted(s.algorithm for s in signatures_of(raw)) == sorted(algorithms)
    assert opendkim_results(raw, zone) == [(True, "")] * len(algorithms)
    for verified, complaint in opendkim_results(tampered(raw), zone):
        assert not verified and "dkim_eom(): Bad signature" in complaint, complaint


def test_ed25519_signature_verifies_with_mail_dkim(app, zone):
    selector, _ = make_key(app, zone, algorithm="ed25519")
    raw = send_over_smtp(app)
    [perl] = perl_results(raw, zone, algorithm="ed25519")
    assert perl.startswith(f"example.com {selector} pass"), perl
    [perl] = perl_results(tampered(raw), zone, algorithm="ed25519")
    assert " fail " in f"{perl} ", perl


def test_a_domain_with_both_keys_gets_both_signatures_each_valid(app, zone):
    rsa_selector, _ = make_key(app, zone, algorithm="rsa")
    ed_selector, _ = make_key(app, zone, algorithm="ed25519")
    raw = send_over_smtp(app)
    signatures = signatures_of(raw)
    assert sorted((s.selector, s.algorithm) for s in signatures) == sorted(
        [(rsa_selector, "rsa"), (ed_selector, "ed25519")])
    assert dkimpy_verifies(raw, zone) == [True, True]
    assert dkimpy_verifies(tampered(raw), zone) == [False, False]
    rsa_index = [s.algorithm for s in signatures].index("rsa")
    assert " pass" in perl_results(raw, zone)[rsa_index]
    assert " fail" in perl_results(tampered(raw), zone)[rsa_index]


def test_from_is_over_signed_so_a_second_from_breaks_the_signature(app, zone):
    make_key(app, zone)
    raw = send_over_smtp(app)
    head = raw.split(b"\r\n\r\n")[0].decode()
    signed = head.split("h=", 1)[1].split(";", 1)[0].replace("\r\n", "").replace(" ", "")
    assert signed.split(":").count("from") == 2  # From once more than it occurs
    assert "received" not in signed.split(":")
    forged = raw.replace(b"From: Alice", b"From: Mallory <m@evil.example>\r\nFrom: Alice", 1)
    assert dkimpy_verifies(forged, zone) == [False]


def test_a_subdomain_is_signed_by_the_parent_key_and_other_domains_not_at_all(app, zone):
    selector, _ = make_key(app, zone, domain="example.com")
    raw = send_over_smtp(app, sender="news@mail.example.com")
    assert [(s.domain, s.selector) for s in signatures_of(raw)] == [("example.com", selector)]
    assert dkimpy_verifies(raw, zone) == [True]
    unsigned = send_over_smtp(app, sender="someone@example.org")
    assert signatures_of(unsigned) == [] and b"DKIM-Signature" not in unsigned


def test_rotation_standby_key_signs_only_after_the_switch(app, zone):
    old, _ = make_key(app, zone, selector="s1")
    new, state = make_key(app, zone, selector="s2")
    assert state == "standby"
    assert [s.selector for s in signatures_of(send_over_smtp(app))] == [old]
    with app.app_context():
        key, retired = dkim_keys.activate_key(
            db.session, dkim_keys.find_key(db.session, "example.com", "s2"))
        assert (key.state, [k.selector for k in retired]) == ("active", ["s1"])
        db.session.remove()
    raw = send_over_smtp(app)
    assert [s.selector for s in signatures_of(raw)] == [new]
    assert dkimpy_verifies(raw, zone) == [True]
    with app.app_context():
        dkim_keys.retire_key(db.session, dkim_keys.find_key(db.session, "example.com", "s2"))
        db.session.remove()
    assert signatures_of(send_over_smtp(app)) == []


def test_send_test_mail_is_signed_and_the_detail_names_the_key(app, client, zone):
    selector, _ = make_key(app, zone, algorithm="ed25519")
    response = client.post("/api/send-test", json={"from": "ops@example.com",
                                                   "to": "bob@example.net"})
    assert response.status_code == 200
    message_id = response.get_json()["message_id"]
    detail = client.get(f"/api/queue/message/{message_id}").get_json()
    assert detail["dkim"] == [{"domain": "example.com", "selector": selector,
                               "algorithm": "ed25519"}]
    assert dkimpy_verifies(raw_of(app, message_id), zone) == [True]
    date = [v for k, v in detail["headers"] if k == "Date"][0]
    assert date.endswith("+0000"), date


def test_detail_of_an_unsigned_message_says_so(app, client):
    with app.app_context():
        message_id = queue_message(db.session)
        db.session.remove()
    assert client.get(f"/api/queue/message/{message_id}").get_json()["dkim"] == []


def test_a_retry_sends_the_same_signed_bytes(make_app, app, zone):
    make_key(app, zone)
    raw = send_over_smtp(app, recipients=("bob@example.net", "carol@example.net"))
    behaviour = Behaviour(rcpt_replies={"carol@example.net": "452 4.2.2 Mailbox full"})
    with Peer(behaviour) as peer:
        relay = make_app(relay_host=peer.address, smtp_timeout=5)
        run_worker(relay)
        behaviour.rcpt_replies.clear()
        with relay.app_context():
            [message_id] = db.session.scalars(sa.select(Message.id))
            service.retry_message(db.session, message_id, "test")  # due now
            db.session.remove()
        run_worker(relay)
    assert [m.rcpt_tos for m in peer.received] == [["bob@example.net"], ["carol@example.net"]]
    assert [m.content for m in peer.received] == [raw, raw]
    assert dkimpy_verifies(peer.received[1].content, zone) == [True]


def test_bounces_are_signed_for_the_hostname_domain(make_app, app, zone):
    make_key(app, zone, domain="example.com")
    with Peer(Behaviour(rcpt_replies={"bob@example.net": "550 5.1.1 No such user"})) as peer:
        relay = make_app(relay_host=peer.address, smtp_timeout=5,
                         smtp_hostname="mta.example.com")
        with relay.app_context():
            queue_message(db.session, sender="alice@example.org")
            db.session.remove()
        run_worker(relay)
    [bounce] = [m for m in peer.received if m.mail_from == ""]
    assert b"From: Mail Delivery System <MAILER-DAEMON@mta.example.com>" in bounce.content
    assert [s.domain for s in signatures_of(bounce.content)] == ["example.com"]
    assert dkimpy_verifies(bounce.content, zone) == [True]


def test_the_private_key_appears_in_no_response_output_or_log(app, client, runner, zone, caplog):
    caplog.set_level(logging.DEBUG)
    created = client.post("/api/dkim/keys", json={"domain": "example.com"})
    assert created.status_code == 201
    cli = runner.invoke(args=["dkim", "create", "--domain", "example.com", "--algorithm",
                              "ed25519"])
    assert cli.exit_code == 0, cli.output
    send_over_smtp(app)
    with app.app_context():
        secrets = [k.private_key for k in db.session.scalars(sa.select(dkim_keys.DkimKey))]
        contents = list(db.session.scalars(sa.select(MessageContent.raw)))
        db.session.remove()
    rsa_body = "".join(secrets[0].splitlines()[1:-1])
    outputs = [created.get_data(as_text=True), client.get("/api/dkim/keys").get_data(True),
               client.get(f"/api/dkim/keys/{created.get_json()['id']}").get_data(True),
               cli.output, runner.invoke(args=["dkim", "list", "--json"]).output,
               runner.invoke(args=["dkim", "show", "example.com",
                                   created.get_json()["selector"]]).output,
               caplog.text, *(c.decode() for c in contents)]
    for text in outputs:
        assert rsa_body[:40] not in text and secrets[1] not in text


def test_a_message_whose_header_cannot_be_parsed_is_queued_unsigned(app, zone):
    make_key(app, zone)
    broken = (b"From: alice@example.com\r\nTo: bob@example.net\r\nnot a header line\r\n"
              b"Subject: Hello\r\n\r\nHi there.\r\n")
    with running_listener(app) as port, smtplib.SMTP("127.0.0.1", port) as client:
        client.ehlo("app.example")
        client.mail("alice@example.com")
        client.rcpt("bob@example.net")
        code, reply = client.data(broken)
    assert code == 250  # DKIM never costs a message
    raw = raw_of(app, queued_id(reply))
    assert b"not a header line" in raw and signatures_of(raw) == []


@pytest.fixture
def key_reads(monkeypatch):  # type: ignore[no-untyped-def]
    """Every read of the active keys. On PostgreSQL the read runs on psycopg's own cursor
    (app/rawselect.py), which SQLAlchemy's statement events do not see: the reads are counted
    where they are made."""
    from app.dkim import signing
    from app.smtpd import acceptor

    reads = []
    # The keys alone, or (the listener's group commit on PostgreSQL) with the batch's rules.
    for select in (signing._ACTIVE_KEYS_READ, acceptor._KEYS_AND_RULES_READ):

        def counted(connection, params=None, read=select.rows):  # type: ignore[no-untyped-def]
            reads.append(connection)
            return read(connection, params)

        monkeypatch.setattr(select, "rows", counted)
    return reads


def test_the_group_commit_reads_the_keys_and_the_rules_as_each_read_alone(app, zone):
    """On PostgreSQL the group commit reads the keys and the rules in force in one statement:
    the signing gets the keys ``active_keys`` reads, the queueing the rules of
    ``HOLD_DEFER_RULES`` (in force now, hold and defer only, by id), with the same values."""
    import datetime as dt

    from app.control.rules import create_rule
    from app.dkim import signing
    from app.queue import accepting
    from app.smtpd import acceptor
    from app.timeutil import utcnow

    make_key(app, zone)
    make_key(app, zone, algorithm="ed25519")
    make_key(app, zone, domain="mail.example.org")
    until = (utcnow() + dt.timedelta(hours=2)).replace(microsecond=0)
    with app.app_context():
        for action, fields in [("defer", {"domain": "slow.example"}),
                               ("bounce", {"sender": "x@spam.example"}),
                               ("hold", {"sender": "mallory@spam.example"}),
                               ("hold", {"recipient": "bob@example.net"})]:
            create_rule(db.session, action=action, expires_at=until, actor="test", **fields)
        db.session.commit()
        db.session.remove()
    with app.app_context():
        session = db.session
        rules = acceptor._read_keys_and_rules(session)
        together = signing.active_keys(session)
        db.session.remove()
    with app.app_context():
        session = db.session
        alone = signing.active_keys(session)
        rules_alone = accepting._HOLD_DEFER_READ.rows(session.connection(), {"now": utcnow()})
        db.session.remove()
    assert {domain: len(keys) for domain, keys in alone.items()} == {"example.com": 2,
                                                                      "mail.example.org": 1}
    if rules is None:  # SQLite: each is read where it is needed
        return
    assert together == alone
    assert [tuple(rule) for rule in rules] == [tuple(rule) for rule in rules_alone]
    assert [rule.action for rule in rules] == ["defer", "hold", "hold"]
    assert all(rule.expires_at == until for rule in rules)


def test_a_group_commit_reads_the_keys_once_signs_every_message_and_a_retired_key_stops(
        app, zone, key_reads):
    """The listener's batch: one key query per transaction (no flush per message), each
    message signed; the memo ends with the transaction, so a retired key signs nothing more."""
    from app.smtpd.acceptor import Job

    selector, _ = make_key(app, zone)
    raw = crlf(email_message(sender="Alice <alice@example.com>", subject="Batch"))
    jobs = [Job("alice@example.com", ("bob@example.net",), raw, _trace()) for _ in range(5)]
    ids, _statements = _accept_watching_statements(app, jobs)
    assert len(key_reads) == 1
    for queue_id in ids:
        assert [s.selector for s in signatures_of(raw_of(app, queue_id))] == [selector]

    with app.app_context():
        dkim_keys.retire_key(db.session, dkim_keys.find_key(db.session, "example.com", selector))
        db.session.remove()
    [later], _statements = _accept_watching_statements(app, jobs[:1])
    assert signatures_of(raw_of(app, later)) == []


def _trace():  # type: ignore[no-untyped-def]
    from app.smtpd.stamping import Trace

    return Trace(helo="client.example", client_ip="127.0.0.1", hostname="mx.example",
                 esmtp=True, tls=False, authenticated=False, smtputf8=False,
                 recipients=("bob@example.net",))


def _accept_watching_statements(app, jobs):  # type: ignore[no-untyped-def]
    """Queue ``jobs`` in one group commit; their ids and the statements it sent."""
    from app.smtpd.acceptor import accept_batch

    statements: list[str] = []

    def seen(_conn, _cursor, statement, *_args):  # type: ignore[no-untyped-def]
        statements.append(statement)

    with app.app_context():
        engine = db.engine
    sa.event.listen(engine, "before_cursor_execute", seen)
    try:
        ids = accept_batch(app, jobs)
    finally:
        sa.event.remove(engine, "before_cursor_execute", seen)
    assert all(isinstance(i, str) for i in ids), ids
    return ids, statements


def _batch_statements(app, senders):  # type: ignore[no-untyped-def]
    """Queue one message per From: sender in one group commit; its ids and statements."""
    from app.smtpd.acceptor import Job

    jobs = [Job(sender, ("bob@example.net",), crlf(email_message(sender=sender, subject="B")),
                _trace()) for sender in senders]
    return _accept_watching_statements(app, jobs)


def test_the_keys_are_read_once_per_transaction_whatever_the_from_domains(app, zone,
                                                                           key_reads):
    """One key query for a batch whose messages come from several domains (a subdomain signed
    by its parent's key, a domain without keys), each message signed as it would be alone."""
    selector, _ = make_key(app, zone)
    senders = ["alice@example.com", "bob@mail.example.com", "carol@unsigned.example",
               "dave@example.com"]
    ids, _statements = _batch_statements(app, senders)
    assert len(key_reads) == 1
    signed = [[s.selector for s in signatures_of(raw_of(app, i))] for i in ids]
    assert signed == [[selector], [selector], [], [selector]]


def test_without_an_active_key_no_from_field_is_parsed(app, monkeypatch, key_reads):
    """No active key at all: the batch reads the keys once and never looks for a From:
    domain (parsing it is most of signing's cost for mail nobody signs)."""
    from app.dkim import signing

    def never(_headers):  # type: ignore[no-untyped-def]
        raise AssertionError("From: parsed although no key is active")

    monkeypatch.setattr(signing, "from_domain", never)
    monkeypatch.setattr(signing, "header_fields", never)
    ids, _statements = _batch_statements(app, ["alice@example.com", "bob@example.org"])
    assert len(key_reads) == 1
    assert [signatures_of(raw_of(app, i)) for i in ids] == [[], []]

"""The listener's limits and failure behaviour: size, recipients, lines, sessions, timeouts,
errors, and a database that fails (API.md §11; 451, never 250, nothing half-written)."""

from __future__ import annotations

import datetime as dt
import smtplib
import socket

import pytest
import sqlalchemy as sa

from app.control.rules import create_rule
from app.extensions import db
from app.models import Message, Rule
from app.queue.shape import read_shape
from app.smtpd.acceptor import Job, accept_batch
from app.smtpd.server import ListenerSettings, ListenerThread
from app.smtpd.stamping import Trace
from app.timeutil import utcnow
from tests.smtpd_helpers import crlf, email_message, free_port, queued_id, running_listener, stored


def test_size_limit_is_advertised_and_enforced(fresh_app):
    app = fresh_app(max_message_bytes=2000)
    big = crlf(email_message(body=("y" * 70 + "\n") * 40))
    assert len(big) > 2000
    with running_listener(app) as port, smtplib.SMTP("127.0.0.1", port) as client:
        client.ehlo("client.example")
        assert client.esmtp_features["size"] == "2000"
        # Declared too large up front: refused at MAIL.
        code, _ = client.mail("alice@example.com", ["SIZE=5000"])
        assert code == 552
        # Not declared: the data itself is refused, after it was read.
        client.mail("alice@example.com")
        client.rcpt("bob@example.net")
        code, _ = client.data(big)
        assert code == 552
        # The session goes on: a message within the limit is accepted.
        assert client.sendmail("alice@example.com", ["bob@example.net"],
                               crlf(email_message())) == {}
    data = stored(app)
    assert len(data["messages"]) == 1
    refusals = [e for e in data["events"] if e.event_type == "rejection"]
    assert [e.smtp_code for e in refusals] == [552, 552]
    assert refusals[1].recipient == "bob@example.net"


def test_too_many_recipients(fresh_app):
    app = fresh_app(max_recipients=3)
    with running_listener(app) as port, smtplib.SMTP("127.0.0.1", port) as client:
        client.ehlo("client.example")
        client.mail("alice@example.com")
        codes = [client.rcpt(f"r{n}@example.net")[0] for n in range(6)]
        assert codes == [250, 250, 250, 452, 452, 452]
        code, reply = client.data(crlf(email_message()))
        assert code == 250
    data = stored(app)
    assert data["recipients"] == ["r0@example.net", "r1@example.net", "r2@example.net"]
    # One event for the transaction's overflow, not one per refused recipient.
    refusals = [e for e in data["events"] if e.event_type == "rejection"]
    assert [(e.smtp_code, e.enhanced_code) for e in refusals] == [(452, "4.5.3")]


def test_line_and_command_length_limits(fresh_app):
    app = fresh_app()
    with running_listener(app) as port, smtplib.SMTP("127.0.0.1", port) as client:
        client.ehlo("client.example")
        assert client.docmd("NOOP " + "x" * 600)[0] == 500  # over 512 octets
        client.mail("alice@example.com")
        client.rcpt("bob@example.net")
        long_line = b"Subject: long\r\n\r\n" + b"z" * 1200 + b"\r\n"
        code, _ = client.data(long_line)
        assert code == 500  # RFC 5321 4.5.3.1.6: 1000 octets a line
    data = stored(app)
    assert data["messages"] == []
    assert [e.smtp_code for e in data["events"]] == [500]


def test_sessions_beyond_the_cap_get_421(fresh_app):
    app = fresh_app(smtpd_max_sessions=1)
    with running_listener(app) as port, smtplib.SMTP("127.0.0.1", port) as first:
        assert first.noop()[0] == 250
        with pytest.raises(smtplib.SMTPConnectError) as refused:
            smtplib.SMTP("127.0.0.1", port)
        assert refused.value.smtp_code == 421
        assert first.noop()[0] == 250  # the admitted session is unaffected


def test_idle_client_is_disconnected(fresh_app):
    app = fresh_app(smtpd_idle_timeout=1)
    with running_listener(app) as port, socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(30)  # a safety net only: the server closes after one idle second
        greeting = sock.recv(1024)
        assert greeting.startswith(b"220 ")
        rest = b""
        while chunk := sock.recv(1024):
            rest += chunk
        assert rest == b""  # closed by the server without a word from us


def test_too_many_errors_end_the_session(fresh_app):
    app = fresh_app(relay_networks="192.0.2.0/24")
    with running_listener(app) as port, smtplib.SMTP("127.0.0.1", port) as client:
        client.ehlo("client.example")
        client.mail("alice@example.com")
        codes = [client.rcpt(f"r{n}@example.net")[0] for n in range(19)]
        assert set(codes) == {554}
        code, reply = client.rcpt("last@example.net")
        assert code == 554
        assert client.getreply()[0] == 421
    assert len(stored(app)["events"]) == 20


TRIGGERS = {
    "sqlite": ["CREATE TRIGGER smtpd_test_failure BEFORE INSERT ON recipients "
               "WHEN NEW.address LIKE 'dbfail%' BEGIN SELECT RAISE(ABORT, 'injected'); END"],
    "postgresql": [
        "CREATE FUNCTION smtpd_test_failure() RETURNS trigger AS $$ BEGIN "
        "IF NEW.address LIKE 'dbfail%' THEN RAISE EXCEPTION 'injected'; END IF; "
        "RETURN NEW; END $$ LANGUAGE plpgsql",
        "CREATE TRIGGER smtpd_test_failure BEFORE INSERT ON recipients "
        "FOR EACH ROW EXECUTE FUNCTION smtpd_test_failure()"],
}
DROP = {
    "sqlite": ["DROP TRIGGER IF EXISTS smtpd_test_failure"],
    "postgresql": ["DROP TRIGGER IF EXISTS smtpd_test_failure ON recipients",
                   "DROP FUNCTION IF EXISTS smtpd_test_failure()"],
}


@pytest.fixture
def failing_recipient_insert(app):
    """The database refuses to store recipients named dbfail*: a real failure half-way
    through the acceptance transaction (the message row is already written by then)."""
    with app.app_context():
        dialect = db.engine.dialect.name
        with db.engine.begin() as conn:
            for statement in TRIGGERS[dialect]:
                conn.execute(sa.text(statement))
    yield
    with app.app_context():
        with db.engine.begin() as conn:
            for statement in DROP[dialect]:
                conn.execute(sa.text(statement))


def test_database_failure_during_data_answers_451_and_stores_nothing(app,
                                                                     failing_recipient_insert):
    with running_listener(app) as port, smtplib.SMTP("127.0.0.1", port) as client:
        client.ehlo("client.example")
        client.mail("alice@example.com")
        client.rcpt("bob@example.net")
        client.rcpt("dbfail@example.net")
        code, reply = client.data(crlf(email_message()))
        assert code == 451
        assert reply.startswith(b"4.3.0")
        # The session survives, and the next message is queued normally.
        assert client.sendmail("alice@example.com", ["carol@example.org"],
                               crlf(email_message())) == {}
    data = stored(app)
    assert len(data["messages"]) == 1
    assert data["recipients"] == ["carol@example.org"]
    assert data["contents"] == [data["messages"][0].id]
    assert [e.event_type for e in data["events"]] == ["reception"]


def test_unreachable_database_answers_451(make_app, tmp_path):
    """No database: RCPT cannot be checked against suppressions and rules, so it is answered
    451 (the client tries again later) and no message can follow."""
    app = make_app(database_url=f"sqlite:///{tmp_path}/missing/dir/elemta.db")
    with running_listener(app) as port, smtplib.SMTP("127.0.0.1", port) as client:
        client.ehlo("client.example")
        client.mail("alice@example.com")
        code, text = client.rcpt("bob@example.net")
        assert (code, text.decode()) == (
            451, "4.3.0 <bob@example.net>: Temporary lookup failure; try again later")
        assert client.docmd("DATA")[0] == 503


def test_cli_help_and_bad_listen_address(runner):
    result = runner.invoke(args=["smtpd", "--help"])
    assert result.exit_code == 0 and "--listen" in result.output
    result = runner.invoke(args=["smtpd", "--listen", "nowhere"])
    assert result.exit_code != 0
    assert "host:port" in result.output


def test_cli_refuses_a_port_in_use(runner):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = runner.invoke(args=["smtpd", "--listen", f"127.0.0.1:{port}"])
    assert result.exit_code != 0
    assert "Cannot listen" in result.output


def test_queued_reply_carries_the_id_of_the_stored_message(fresh_app):
    app = fresh_app()
    with running_listener(app) as port, smtplib.SMTP("127.0.0.1", port) as client:
        client.ehlo("client.example")
        client.mail("alice@example.com")
        client.rcpt("bob@example.net")
        _, reply = client.data(crlf(email_message()))
    assert [m.id for m in stored(app)["messages"]] == [queued_id(reply)]


def test_a_failing_message_does_not_cost_the_others_of_its_batch(app, failing_recipient_insert):
    """Group commit: the batch fails as a whole, then each message is retried alone."""
    trace = Trace("client.example", "127.0.0.1", "mx.test.example", True, False, False, False,
                  ("x@example.net",))
    raw = crlf(email_message())
    jobs = [Job("alice@example.com", ("good1@example.net",), raw, trace),
            Job("alice@example.com", ("dbfail@example.net",), raw, trace),
            Job("alice@example.com", ("good2@example.net",), raw, trace)]
    first, failed, last = accept_batch(app, jobs)
    assert isinstance(failed, Exception)
    data = stored(app)
    assert sorted(m.id for m in data["messages"]) == sorted([first, last])
    assert data["recipients"] == ["good1@example.net", "good2@example.net"]
    assert len(data["contents"]) == 2
    assert [e.event_type for e in data["events"]] == ["reception", "reception"]


def test_a_batch_is_one_transaction(app):
    trace = Trace("client.example", "127.0.0.1", "mx.test.example", True, False, False, False,
                  ("x@example.net",))
    jobs = [Job("alice@example.com", (f"r{n}@example.net",), crlf(email_message()), trace)
            for n in range(5)]
    ids = accept_batch(app, jobs)
    assert all(isinstance(i, str) and i.startswith("msg-") for i in ids)
    assert sorted(m.id for m in stored(app)["messages"]) == sorted(ids)


def test_a_batch_reads_the_rules_in_force_and_commits_its_queue_shape(app):
    """The batch's reads (rules, keys) and its queue-shape write with the COMMIT go in
    pipelines on PostgreSQL: the rules read in the batch's transaction apply, a rule made
    after one batch applies to the next, and the shape counts every message of each batch."""
    trace = Trace("client.example", "127.0.0.1", "mx.test.example", True, False, False, False,
                  ("x@example.net",))
    raw = crlf(email_message())
    until = (utcnow() + dt.timedelta(hours=2)).replace(microsecond=0)
    with app.app_context():
        hold = create_rule(db.session, action="hold", expires_at=until,
                           sender="mallory@spam.example", actor="test").id
        db.session.remove()
    first = accept_batch(app, [Job("alice@example.com", ("bob@example.org",), raw, trace),
                               Job("mallory@spam.example", ("dave@example.net",), raw, trace)])
    with app.app_context():
        defer = create_rule(db.session, action="defer", expires_at=until, domain="slow.example",
                            actor="test").id
        db.session.remove()
    second = accept_batch(app, [Job("alice@example.com", ("carol@slow.example",), raw, trace),
                                Job("mallory@spam.example", ("erin@example.net",), raw, trace),
                                Job("alice@example.com", ("frank@example.net",), raw, trace)])
    assert all(isinstance(i, str) for i in first + second)
    with app.app_context():
        session = db.session
        states = [session.get(Message, i).queue_state for i in first + second]
        hits = dict(session.execute(sa.select(Rule.id, Rule.hits)).all())
        held = read_shape(session, "held").total.buckets
        pending = read_shape(session, "pending").total.buckets
        deferred = read_shape(session, "deferred").total.buckets
        db.session.remove()
    assert states == ["pending", "held", "deferred", "held", "pending"]
    assert hits == {hold: 2, defer: 1}
    assert (sum(pending), sum(held), sum(deferred)) == (2, 2, 1)


def test_stop_says_goodbye_to_connected_clients(fresh_app):
    app = fresh_app()
    settings = ListenerSettings.from_config(app.config, host="127.0.0.1", port=free_port())
    listener = ListenerThread(app, settings).start()
    try:
        client = smtplib.SMTP("127.0.0.1", settings.port)
        client.ehlo("client.example")
    finally:
        listener.stop()
    assert client.getreply() == (421, b"4.3.2 Service shutting down")
    client.close()
    with pytest.raises(OSError):  # and nothing listens any more
        socket.create_connection(("127.0.0.1", settings.port), timeout=5).close()

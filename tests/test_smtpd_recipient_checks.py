"""The RCPT checks of all sessions, coalesced (``app/smtpd/recipient_checks.py``): checks that
arrive while a run is busy or waits for a storage thread are answered by the next run, in one
statement, each with exactly the reply it would have had alone; rule hits stay exact; a
failing run fails every check it took (docs/PERFORMANCE.md, "Intake, concurrent RCPT checks
in one statement")."""

from __future__ import annotations

import asyncio
import datetime as dt
import smtplib
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa

from app.control.rules import create_rule
from app.control.suppression import add_suppression
from app.extensions import db
from app.models import Rule
from app.smtpd import recipient_checks
from app.smtpd.storage import Storage
from app.timeutil import utcnow
from tests.smtpd_helpers import running_listener

SUPPRESSED = "550 5.1.1 <{address}>: Recipient address suppressed (user unknown)"


def _seed(app) -> dict[str, int]:
    """A suppression and two bounce rules (one on a sender, one on a domain); their ids."""
    later = utcnow() + dt.timedelta(hours=1)
    with app.app_context():
        add_suppression(db.session, "gone@example.net", "user unknown", None, "test")
        ids = {
            "sender": create_rule(db.session, action="bounce", expires_at=later,
                                  sender="spammer@", actor="test").id,
            "domain": create_rule(db.session, action="bounce", expires_at=later,
                                  domain="bounced.example", actor="test").id,
        }
        db.session.remove()
    return ids


def _hits(app) -> dict[int, int]:
    with app.app_context():
        hits = {rule_id: n for rule_id, n in db.session.execute(sa.select(Rule.id, Rule.hits))}
        db.session.remove()
    return hits


def _expected(ids: dict[str, int], sender: str, address: str) -> str | None:
    if address.strip().lower() == "gone@example.net":
        return SUPPRESSED.format(address=address)
    if sender.startswith("spammer@"):
        return f"550 5.7.1 <{address}>: Refused by rule {ids['sender']}"
    if address.endswith("@bounced.example"):
        return f"550 5.7.1 <{address}>: Refused by rule {ids['domain']}"
    return None


CHECKS = [(sender, address)
          for sender in ("alice@example.com", "spammer@example.com", "")
          for address in ("gone@example.net", "GONE@example.net", "x@bounced.example",
                          "fine@example.net")]


async def _checks_behind_a_busy_thread(storage: Storage, checks) -> list:
    """``checks`` asked at once while the storage's only thread is busy: the first check's
    run is handed to the pool, then the others arrive; then the thread is freed."""
    gate = threading.Event()
    busy = asyncio.ensure_future(storage.run_plain(gate.wait, 30))
    first = asyncio.ensure_future(storage.recipient_checks.refusal(*checks[0]))
    for _ in range(5):  # the first run is handed to the pool, where it waits for the thread
        await asyncio.sleep(0)
    others = [asyncio.ensure_future(storage.recipient_checks.refusal(*c)) for c in checks[1:]]
    await asyncio.sleep(0)
    gate.set()
    await busy
    return await asyncio.gather(first, *others, return_exceptions=True)


def test_checks_arriving_while_a_run_waits_are_answered_by_it_each_its_own_reply(app) -> None:
    ids = _seed(app)
    before = _hits(app)
    storage = Storage(app, 1)
    try:
        replies = asyncio.run(_checks_behind_a_busy_thread(storage, CHECKS))
        assert (storage.recipient_checks.runs, storage.recipient_checks.checks) == \
            (1, len(CHECKS))
    finally:
        storage.close()
    for (sender, address), reply in zip(CHECKS, replies, strict=True):
        expected = _expected(ids, sender, address)
        if expected is None:
            assert reply is None, (sender, address)
        else:
            assert reply is not None and reply.startswith(expected), (sender, address, reply)
    after = _hits(app)
    # Each recipient refused by a rule counts one hit: spammer's x@bounced.example and
    # fine@example.net, and x@bounced.example of the other two senders.
    assert after[ids["sender"]] - before[ids["sender"]] == 2
    assert after[ids["domain"]] - before[ids["domain"]] == 2


def test_a_lone_check_runs_at_once_and_sees_a_new_suppression(app) -> None:
    storage = Storage(app, 2)
    checks = storage.recipient_checks

    async def check(address: str) -> str | None:
        return await checks.refusal("alice@example.com", address)

    try:
        assert asyncio.run(check("late@example.net")) is None
        with app.app_context():
            add_suppression(db.session, "late@example.net", "user unknown", None, "test")
            db.session.remove()
        assert asyncio.run(check("late@example.net")) == SUPPRESSED.format(
            address="late@example.net")
        assert (checks.runs, checks.checks) == (2, 2)
    finally:
        storage.close()


def test_a_failing_run_fails_every_check_it_took(app, monkeypatch) -> None:
    """A real database error: every waiting caller gets it (the listener then answers 451);
    the connection is discarded and the next check answers."""
    _seed(app)
    storage = Storage(app, 1)
    real = recipient_checks.refusals_of

    def failing(connection, _checks):
        connection.exec_driver_sql("SELECT * FROM no_such_table")  # fails on both

    try:
        monkeypatch.setattr(recipient_checks, "refusals_of", failing)
        replies = asyncio.run(_checks_behind_a_busy_thread(storage, CHECKS))
        assert len(replies) == len(CHECKS)
        assert all(isinstance(r, sa.exc.DBAPIError) for r in replies), replies
        assert not storage._connections  # discarded (PostgreSQL; none on SQLite)
        monkeypatch.setattr(recipient_checks, "refusals_of", real)
        assert asyncio.run(storage.recipient_checks.refusal(
            "alice@example.com", "gone@example.net")) == SUPPRESSED.format(
                address="gone@example.net")
    finally:
        storage.close()


@pytest.mark.parametrize("sessions", [8])
def test_concurrent_rcpts_over_smtp_get_each_their_own_reply(app, sessions: int) -> None:
    """Several SMTP sessions at once, each a sender and its recipients (suppressed, refused
    by a rule, accepted): each RCPT gets its own reply, and rule hits are exact."""
    ids = _seed(app)
    before = _hits(app)
    start = threading.Barrier(sessions)

    def session(n: int, port: int) -> list[tuple[str, str, int, str]]:
        sender = ("spammer@example.com", "alice@example.com")[n % 2]
        answers = []
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.ehlo("client.example")
            start.wait(30)
            for round_ in range(3):
                client.mail(sender)
                for address in (f"s{n}r{round_}@bounced.example", "gone@example.net",
                                f"ok{n}@example.net"):
                    code, text = client.rcpt(address)
                    answers.append((sender, address, code, text.decode()))
                client.rset()
        return answers

    with running_listener(app) as port, ThreadPoolExecutor(sessions) as pool:
        results = [a for f in [pool.submit(session, n, port) for n in range(sessions)]
                   for a in f.result()]
    for sender, address, code, text in results:
        expected = _expected(ids, sender, address)
        if expected is None:
            assert code == 250, (sender, address, code, text)
        else:
            assert code == 550 and f"{code} {text}".startswith(expected), (sender, address, text)
    after = _hits(app)
    spammers = (sessions + 1) // 2
    assert after[ids["sender"]] - before[ids["sender"]] == spammers * 3 * 2
    assert after[ids["domain"]] - before[ids["domain"]] == (sessions - spammers) * 3


def test_a_failing_check_answers_rcpt_451_and_queues_nothing(app, monkeypatch) -> None:
    """The database fails the check: RCPT gets a temporary 451 (the client tries again later),
    so neither is a good recipient refused nor a suppressed one queued; once the fault passes,
    the same session gets the usual answers."""
    _seed(app)
    real = recipient_checks.refusals_of

    def failing(connection, _checks):
        connection.exec_driver_sql("SELECT * FROM no_such_table")  # fails on both

    with running_listener(app) as port, smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.example")
        monkeypatch.setattr(recipient_checks, "refusals_of", failing)
        client.mail("alice@example.com")
        for address in ("gone@example.net", "fine@example.net"):
            code, text = client.rcpt(address)
            assert (code, text.decode()) == (
                451, f"4.3.0 <{address}>: Temporary lookup failure; try again later")
        assert client.docmd("DATA")[0] == 503  # no recipient was accepted
        client.rset()
        monkeypatch.setattr(recipient_checks, "refusals_of", real)
        client.mail("alice@example.com")
        assert client.rcpt("gone@example.net")[0] == 550
        assert client.rcpt("fine@example.net")[0] == 250
        client.rset()
    with app.app_context():
        assert db.session.scalar(sa.text("SELECT count(*) FROM messages")) == 0
        db.session.remove()

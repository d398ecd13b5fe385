"""SMTP PIPELINING (RFC 2920) in the delivery client, against real aiosmtpd peers on loopback.

Every case runs against a peer that advertises PIPELINING and one that does not: the
per-recipient results must be the same on both paths, the pipelining peer must have read
MAIL, every RCPT and DATA in one chunk, and the connection must stay usable afterwards.
"""

from __future__ import annotations

import pytest

from app.delivery.routing import Hop, Route
from app.delivery.smtp_client import ConnectionPool, SmtpClient
from app.extensions import db
from tests.delivery_helpers import Behaviour, Peer, events, recipients_of, run_worker
from tests.helpers import queue_message

MESSAGE = (b"From: alice@example.com\r\nTo: bob@example.net\r\nSubject: Hi\r\n\r\n"
           b"Hello\r\n.a line that starts with a dot\r\n")
RECIPIENTS = [(1, "bob@example.net"), (2, "carol@example.net"), (3, "dave@example.net")]


_POOLS: list[ConnectionPool] = []


@pytest.fixture(autouse=True)
def _close_pooled_connections():
    yield
    while _POOLS:
        _POOLS.pop().close_idle(0)


def _client(peer: Peer) -> tuple[SmtpClient, Route]:
    route = Route("example.net", (Hop("mx.example.net", peer.host, peer.port),), "none")
    pool = ConnectionPool(2)
    _POOLS.append(pool)
    return SmtpClient(pool, local_hostname="elemta.test", timeout=15), route


def _outcomes(results) -> list[tuple[int, str, int | None, str | None, str]]:
    return [(r.recipient_id, r.kind, r.smtp_code, r.enhanced_code, r.text) for r in results]


def _batches(peer: Peer) -> list[bytes]:
    """The chunks the peer read that carry a MAIL command."""
    with peer.lock:
        return [chunk for chunk in peer.reads if b"MAIL FROM:" in chunk.upper()]


def _assert_one_batch(peer: Peer, pipelining: bool, recipients: int) -> None:
    batches = _batches(peer)
    assert batches
    for batch in batches:
        if pipelining:
            assert batch.upper().count(b"RCPT TO:") == recipients
            assert batch.upper().endswith(b"\r\nDATA\r\n")
        else:
            assert b"RCPT TO:" not in batch.upper()  # lockstep: MAIL alone, then its reply


def _deliver_again_on_the_same_connection(client: SmtpClient, route: Route, peer: Peer) -> None:
    before = peer.connections
    peer.behaviour = Behaviour()
    results = client.deliver(route, "alice@example.com", [(9, "erin@example.net")], MESSAGE)
    assert [r.kind for r in results] == ["delivered"]
    assert peer.connections == before
    assert peer.received[-1].rcpt_tos == ["erin@example.net"]


@pytest.fixture(params=[True, False], ids=["pipelining", "lockstep"])
def pipelining(request) -> bool:
    return request.param


def test_all_accepted_in_one_batch(pipelining):
    with Peer(pipelining=pipelining, record_reads=True) as peer:
        client, route = _client(peer)
        results = client.deliver(route, "alice@example.com", RECIPIENTS, MESSAGE)
        assert _outcomes(results) == [(rid, "delivered", 250, "2.0.0", "250 2.0.0 Ok: queued")
                                      for rid, _ in RECIPIENTS]
        assert results[0].remote_host == "mx.example.net" and results[0].remote_ip == "127.0.0.1"
        _assert_one_batch(peer, pipelining, 3)
        assert peer.received[0].rcpt_tos == [a for _, a in RECIPIENTS]
        assert peer.received[0].content == MESSAGE  # dot-stuffing undone by the peer
        _deliver_again_on_the_same_connection(client, route, peer)


def test_mail_refused_gives_every_recipient_its_reply(pipelining):
    behaviour = Behaviour(mail_reply="550 5.7.1 Sender blocked")
    with Peer(behaviour, pipelining=pipelining, record_reads=True) as peer:
        client, route = _client(peer)
        results = client.deliver(route, "alice@example.com", RECIPIENTS, MESSAGE)
        assert _outcomes(results) == [(rid, "rejection", 550, "5.7.1", "550 5.7.1 Sender blocked")
                                      for rid, _ in RECIPIENTS]
        _assert_one_batch(peer, pipelining, 3)
        assert peer.received == []
        # The RCPT and DATA replies (503s) were drained: the next transaction reads its own.
        _deliver_again_on_the_same_connection(client, route, peer)


def test_mail_refused_temporarily(pipelining):
    with Peer(Behaviour(mail_reply="451 4.3.0 Try later"), pipelining=pipelining) as peer:
        client, route = _client(peer)
        results = client.deliver(route, "alice@example.com", RECIPIENTS[:2], MESSAGE)
        assert _outcomes(results) == [(rid, "tempfail", 451, "4.3.0", "451 4.3.0 Try later")
                                      for rid, _ in RECIPIENTS[:2]]
        _deliver_again_on_the_same_connection(client, route, peer)


def _deliver_with_rcpt_replies(pipelining, rcpt_replies, recipients):
    """Deliver to ``recipients`` through a peer answering RCPT with ``rcpt_replies``: the
    outcomes, and the recipients of what the peer received. Checks on the way that the
    commands went as one batch when pipelined and that the connection serves the next
    transaction (every reply, DATA's 503 included, was read)."""
    with Peer(Behaviour(rcpt_replies=rcpt_replies), pipelining=pipelining,
              record_reads=True) as peer:
        client, route = _client(peer)
        results = client.deliver(route, "alice@example.com", recipients, MESSAGE)
        _assert_one_batch(peer, pipelining, len(recipients))
        received = [m.rcpt_tos for m in peer.received]
        _deliver_again_on_the_same_connection(client, route, peer)
    return _outcomes(results), received


def test_some_recipients_refused(pipelining):
    outcomes, received = _deliver_with_rcpt_replies(
        pipelining, {"carol@example.net": "550 5.1.1 No such user",
                     "dave@example.net": "452 4.2.2 Mailbox full"}, RECIPIENTS)
    assert outcomes == [
        (1, "delivered", 250, "2.0.0", "250 2.0.0 Ok: queued"),
        (2, "rejection", 550, "5.1.1", "550 5.1.1 No such user"),
        (3, "tempfail", 452, "4.2.2", "452 4.2.2 Mailbox full"),
    ]
    assert received == [["bob@example.net"]]


def test_all_recipients_refused(pipelining):
    outcomes, received = _deliver_with_rcpt_replies(
        pipelining, {"bob@example.net": "550 5.1.1 No such user",
                     "carol@example.net": "450 4.1.1 Try later"}, RECIPIENTS[:2])
    assert outcomes == [
        (1, "rejection", 550, "5.1.1", "550 5.1.1 No such user"),
        (2, "tempfail", 450, "4.1.1", "450 4.1.1 Try later"),
    ]
    # Nothing sent; pipelined, DATA went too and got its 503, read before the RSET.
    assert received == []


def test_data_refused(pipelining):
    behaviour = Behaviour(data_reply="554 5.6.0 Content rejected")
    with Peer(behaviour, pipelining=pipelining) as peer:
        client, route = _client(peer)
        results = client.deliver(route, "alice@example.com", RECIPIENTS[:2], MESSAGE)
        assert _outcomes(results) == [(rid, "rejection", 554, "5.6.0",
                                       "554 5.6.0 Content rejected")
                                      for rid, _ in RECIPIENTS[:2]]
        _deliver_again_on_the_same_connection(client, route, peer)


def test_a_421_closes_and_the_recipients_not_answered_get_it(pipelining):
    behaviour = Behaviour(rcpt_replies={"carol@example.net": "421 4.3.2 Shutting down"})
    with Peer(behaviour, pipelining=pipelining) as peer:
        client, route = _client(peer)
        results = client.deliver(route, "alice@example.com", RECIPIENTS[:2], MESSAGE)
        assert results[1].kind == "tempfail" and results[1].smtp_code == 421
        if pipelining:
            # Nothing is read after a 421 (a real server closes the channel): the accepted
            # recipient's transaction never ended. In lockstep, aiosmtpd (which keeps the
            # channel open) still took DATA.
            assert results[0].kind == "tempfail" and results[0].smtp_code == 421
            assert peer.received == []
        assert client.pool._idle["example.net"] == []  # closed, never reused


def test_a_stale_reused_connection_is_retried_fresh_and_delivers_once(pipelining):
    with Peer(pipelining=pipelining) as peer:
        client, route = _client(peer)
        first = client.deliver(route, "alice@example.com", RECIPIENTS[:1], MESSAGE)
        assert [r.kind for r in first] == ["delivered"]
        before = peer.connections  # the controller's own trigger connection counts too
        # The server drops the pooled connection when it reads the next MAIL (as after an
        # idle timeout): nothing was answered, so the transaction runs again on a new one.
        peer.behaviour = Behaviour(drop_at="mail", drops=1)
        results = client.deliver(route, "alice@example.com", RECIPIENTS[1:], MESSAGE)
        assert [r.kind for r in results] == ["delivered", "delivered"]
        assert peer.connections == before + 1
        assert peer.recipients_received() == [a for _, a in RECIPIENTS]  # each exactly once


def test_a_drop_after_mail_was_answered_is_a_temporary_failure(pipelining):
    with Peer(Behaviour(drop_at="rcpt"), pipelining=pipelining) as peer:
        client, route = _client(peer)
        before = peer.connections
        results = client.deliver(route, "alice@example.com", RECIPIENTS[:2], MESSAGE)
        assert [r.kind for r in results] == ["tempfail", "tempfail"]
        assert all(r.text.startswith("Connection to mx.example.net[127.0.0.1]") for r in results)
        assert peer.received == [] and peer.connections == before + 1  # not tried again


def test_smtputf8_and_8bitmime_parameters(pipelining):
    message = ("From: élise@exämple.com\r\nTo: zoë@example.net\r\nSubject: Grüße\r\n\r\n"
               "Schöne Grüße\r\n").encode()
    with Peer(pipelining=pipelining, record_reads=True, enable_SMTPUTF8=True) as peer:
        client, route = _client(peer)
        results = client.deliver(route, "élise@exämple.com", [(1, "zoë@example.net")], message)
        assert [r.kind for r in results] == ["delivered"]
        received = peer.received[0]
        assert received.mail_from == "élise@exämple.com"
        assert received.rcpt_tos == ["zoë@example.net"]
        assert "SMTPUTF8" in received.mail_options and "BODY=8BITMIME" in received.mail_options
        assert received.content == message
        _assert_one_batch(peer, pipelining, 1)
        _deliver_again_on_the_same_connection(client, route, peer)  # back to ASCII commands


def test_the_worker_over_a_pipelining_peer(app, make_app):
    """End to end, on the test database: partial acceptance recorded per recipient."""
    behaviour = Behaviour(rcpt_replies={"carol@example.net": "550 5.1.1 No such user"})
    with Peer(behaviour, pipelining=True, record_reads=True) as peer:
        relay = make_app(relay_host=peer.address, smtp_timeout=15, retry_schedule="60,300",
                         worker_concurrency=2, send_bounces=False)
        with relay.app_context():
            message_id = queue_message(db.session, sender="alice@example.com",
                                       recipients=("bob@example.net", "carol@example.net"),
                                       subject="Hello")
            db.session.remove()
        run_worker(relay)
        states = {a: r.status for a, r in recipients_of(relay, message_id).items()}
        assert states == {"bob@example.net": "delivered", "carol@example.net": "failed"}
        kinds = sorted((e.recipient, e.event_type, e.smtp_code) for e in events(relay, message_id)
                       if e.event_type in ("delivery", "rejection"))
        assert kinds == [("bob@example.net", "delivery", 250),
                         ("carol@example.net", "rejection", 550)]
        _assert_one_batch(peer, True, 2)
        assert peer.recipients_received() == ["bob@example.net"]


@pytest.mark.parametrize("address", [
    "", "bob@example.net", "a.b+c@x-y.example", "o'neil@example.com", "{x}|~@example.com",
    "zoë@example.net", '"john doe"@example.com', "a..b@example.com", ".a@example.com",
    "a@b@example.com", "<bob@example.net>", "bob", "bob@", "Bob <bob@example.net>",
])
def test_pipelined_paths_are_what_smtplib_would_send(address):
    """The fast path for plain addresses gives exactly smtplib.quoteaddr's text."""
    import smtplib

    from app.delivery.smtp_exchange import _path

    assert _path(address) == smtplib.quoteaddr(address)

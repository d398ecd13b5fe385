"""Live streams (API.md §7) against a real threaded server with real WebSocket clients.

Every test runs on SQLite and PostgreSQL. Changes are made through the REST API, by other
processes and directly in the database, and must reach the connected clients. Waiting is done
with generous receive timeouts, never with timed assertions.
"""

from __future__ import annotations

import datetime as dt
import json
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from flask import Flask
from simple_websocket import ConnectionClosed

from app.events import record_event
from app.extensions import db
from app.models import DeliveryEvent, SystemLog
from app.queue.service import hold_message
from app.stream import frames
from app.stream.hub import shutdown_streams
from app.timeutil import utcnow
from tests.conftest import TEST_ADMIN_KEY, empty_database
from tests.delivery_helpers import Peer
from tests.helpers import queue_message
from tests.stream_helpers import (
    LiveServer,
    close_quietly,
    flask_cli,
    live_server,
    no_frame,
    raw_websocket,
    receive,
    receive_until,
    run_in_other_process,
    wait_until,
)

ADMIN = {"Authorization": f"Bearer {TEST_ADMIN_KEY}"}


@pytest.fixture
def stream_app(make_app) -> Iterator[Flask]:
    application = make_app(stream_poll_interval=0.2)
    empty_database(application)
    yield application


@pytest.fixture
def server(stream_app: Flask) -> Iterator[LiveServer]:
    live = LiveServer(stream_app).start()
    yield live
    live.stop()


def add_log(app: Flask, message: str, level: str = "info", levelno: int = 20) -> int:
    with app.app_context():
        row = SystemLog(timestamp=utcnow(), levelno=levelno, level=level, logger="elemta.test",
                        message=message, process="test")
        db.session.add(row)
        db.session.commit()
        row_id = row.id
        db.session.remove()
    return row_id


def add_event(app: Flask, event_type: str, message: str, **fields) -> int:
    with app.app_context():
        event = record_event(db.session, event_type, message_id=fields.pop("message_id", None),
                             message=message, **fields)
        db.session.commit()
        event_id = event.id
        db.session.remove()
    return event_id


def is_type(frame_type: str, **data):
    def predicate(frame: dict) -> bool:
        return frame["type"] == frame_type and all(frame["data"].get(k) == v
                                                   for k, v in data.items())
    return predicate


def queued(app: Flask, **kwargs) -> str:
    with app.app_context():
        message_id = queue_message(db.session, **kwargs)
        db.session.remove()
    return message_id


# --------------------------------------------------------------------------- changes arrive


def test_rest_action_reaches_queue_and_log_sockets(server, stream_app):
    message_id = queued(stream_app)
    queue_ws = server.connect("/api/queue/ws")
    logs_ws = server.connect("/api/logs/ws")
    first = receive(queue_ws)
    assert first["type"] == "queue_stats"
    assert first["data"] == {"pending": 1, "deferred": 0, "held": 0, "failed": 0, "total": 1}

    status, body = server.request("POST", f"/api/queue/message/{message_id}/hold", headers=ADMIN)
    assert status == 200, body

    frames = receive_until(queue_ws, is_type("queue_stats", held=1))
    events = [f for f in frames if f["type"] == "queue_event"]
    assert [e["data"] for e in events] == [{"message_id": message_id, "action": "held",
                                            "queue": "held"}]
    assert frames[-1]["data"] == {"pending": 0, "deferred": 0, "held": 1, "failed": 0, "total": 1}

    event = receive(logs_ws)
    assert event["type"] == "message_event"
    item = event["data"]
    assert list(item) == ["id", "timestamp", "event_type", "message_id", "sender", "recipient",
                          "delivery_ip", "delivery_host", "smtp_code", "spam_score", "threats",
                          "message", "failure_class"]
    assert item["event_type"] == "system" and item["message_id"] == message_id
    assert item["threats"] == []
    assert isinstance(event["cursor"], str)


def test_send_test_email_reaches_queue_socket(server):
    queue_ws = server.connect("/api/queue/ws")
    assert receive(queue_ws)["data"]["total"] == 0
    status, body = server.request("POST", "/api/send-test", {"from": "a@example.com",
                                                             "to": "b@example.net"}, ADMIN)
    assert status == 200, body
    frames = receive_until(queue_ws, is_type("queue_stats", pending=1))
    assert {"message_id": body["message_id"], "action": "queued", "queue": "pending"} in [
        f["data"] for f in frames if f["type"] == "queue_event"]


def test_cli_action_in_another_process_reaches_client(server, stream_app, database_url):
    message_id = queued(stream_app)
    queue_ws = server.connect("/api/queue/ws")
    receive(queue_ws)
    flask_cli(database_url, "queue", "hold", message_id)
    frames = receive_until(queue_ws, is_type("queue_event", message_id=message_id))
    assert frames[-1]["data"] == {"message_id": message_id, "action": "held", "queue": "held"}


def test_message_accepted_by_another_process_reaches_client(server, database_url):
    logs_ws = server.connect("/api/logs/ws?type=message_event&event_type=reception")
    queue_ws = server.connect("/api/queue/ws")
    receive(queue_ws)
    out = run_in_other_process(database_url, (
        "from app import create_app\n"
        "from app.extensions import db\n"
        "from app.queue import service\n"
        "app = create_app()\n"
        "with app.app_context():\n"
        "    m = service.accept_message(db.session, sender='x@example.com',\n"
        "        recipients=['y@example.net'], raw=b'Subject: other\\r\\n\\r\\nhi\\r\\n',\n"
        "        origin='api')\n"
        "    print(m.id)\n"
    ))
    message_id = out.strip().splitlines()[-1]
    frame = receive(logs_ws)
    assert frame["type"] == "message_event"
    assert frame["data"]["message_id"] == message_id
    assert frame["data"]["event_type"] == "reception"
    frames = receive_until(queue_ws, is_type("queue_event", message_id=message_id))
    assert frames[-1]["data"]["action"] == "queued"


def test_delivery_by_a_worker_process_reaches_client(server, stream_app, database_url):
    message_id = queued(stream_app)
    queue_ws = server.connect("/api/queue/ws")
    logs_ws = server.connect("/api/logs/ws?type=message_event&event_type=delivery")
    assert receive(queue_ws)["data"]["pending"] == 1
    with Peer() as peer:  # a real SMTP server on loopback, reached through the relay setting
        environment = {"ELEMTA_RELAY_HOST": peer.address, "ELEMTA_LOG_TO_DATABASE": "false"}
        flask_cli(database_url, "worker", "--once", env=environment)
        assert peer.recipients_received() == ["bob@example.net"]
    frames = receive_until(queue_ws, is_type("queue_stats", total=0))
    assert {"message_id": message_id, "action": "delivered", "queue": None} in [
        f["data"] for f in frames if f["type"] == "queue_event"]
    delivery = receive(logs_ws)["data"]
    assert delivery["message_id"] == message_id and delivery["recipient"] == "bob@example.net"


def test_log_record_from_another_process_reaches_client(server, database_url):
    logs_ws = server.connect("/api/logs/ws?type=log&level=warn")
    run_in_other_process(database_url, (
        "import logging\n"
        "from app import create_app\n"
        "app = create_app({'LOG_TO_DATABASE': True})\n"
        "logging.getLogger('elemta.other').info('not wanted: below warn')\n"
        "logging.getLogger('elemta.other').warning('hello from another process')\n"
        # Written before exiting, however slow the machine: the exit-time flush gives up after
        # SHUTDOWN_TIMEOUT (5 s) by design, a bound this test must not race against.
        "from app.logs.handler import shutdown_database_logging\n"
        "shutdown_database_logging(timeout=120)\n"
    ))
    frame = receive(logs_ws)
    assert frame["type"] == "log"
    item = frame["data"]
    assert list(item) == ["id", "timestamp", "level", "logger", "message", "process"]
    assert item["message"] == "hello from another process"
    assert item["level"] == "warn" and item["logger"] == "elemta.other"
    assert no_frame(logs_ws)


def test_a_change_reaches_every_client_by_the_next_poll(make_app, monkeypatch):
    """API.md §7: a change made by any process reaches every connected client within 2 s.

    The 2 s are the production poll interval (STREAM_POLL_INTERVAL, 0.5 s) plus one poll and
    the fan-out. A stopwatch would measure the machine as much as the product: on a loaded CI
    host a starved thread or a slow `flask` start can take seconds whatever the design. So the
    guarantee is asserted in polls, which load cannot change: the change is sent by the first
    poll that *starts* after its commit (a poll already running then may or may not see it).
    With a poll every 0.5 s, that is at most 0.5 s plus one poll's work after the commit. The
    change is committed on a connection of its own, as another process would (tests above do
    it from real other processes), so the time from the commit to the frames can be taken:
    printed (pytest -rP shows it) for information, not asserted.
    """
    from app.stream.hub import DEFAULT_POLL_INTERVAL

    app = make_app()  # the production poll interval
    assert app.config.get("STREAM_POLL_INTERVAL", DEFAULT_POLL_INTERVAL) == 0.5
    empty_database(app)
    message_id = queued(app)
    read_events = frames.events_after
    lock = threading.Lock()
    polls: list[list[int]] = []  # event ids each poll's read returned, in poll order

    def counted(session, after, limit=frames.ROW_BATCH):
        with lock:
            polls.append([])
            mine = polls[-1]
        rows = read_events(session, after, limit)
        mine.extend(r.id for r in rows)
        return rows

    monkeypatch.setattr(frames, "events_after", counted)
    with live_server(app) as live:
        clients = [live.connect("/api/queue/ws") for _ in range(3)]
        for client in clients:
            assert receive(client)["data"]["pending"] == 1
        with app.app_context():
            hold_message(db.session, message_id, actor="elsewhere")  # commits
            committed = time.monotonic()
            db.session.remove()
        with lock:
            started_before = len(polls)  # polls begun before the hold process had returned
        for client in clients:
            receive_until(client, is_type("queue_event", message_id=message_id, action="held"))
        print(f"commit to every client's frame: {time.monotonic() - committed:.3f} s")
    with app.app_context():
        [held_id] = db.session.scalars(sa.select(DeliveryEvent.id).where(
            DeliveryEvent.message_id == message_id, DeliveryEvent.action == "held")).all()
        db.session.remove()
    sent_by = next(n for n, ids in enumerate(polls, 1) if held_id in ids)
    assert sent_by <= started_before + 1, (sent_by, started_before)


def test_queue_stats_never_run_ahead_of_the_events_behind_them(server, stream_app,
                                                               monkeypatch):
    """A change committed in the middle of a hub poll: its queue_event is not sent after the
    counts that include it (a client seeing "held 1" has seen the "held")."""
    message_id = queued(stream_app)
    queue_ws = server.connect("/api/queue/ws")
    assert receive(queue_ws)["data"]["pending"] == 1
    read_events = frames.events_after
    armed = [True]

    def read_then_another_process_commits(session, after, limit=frames.ROW_BATCH):
        rows = read_events(session, after, limit)
        if armed and armed.pop():
            # The race, made certain: a commit lands between the poll's reads.
            with stream_app.app_context():
                hold_message(db.session, message_id, actor="elsewhere")
                db.session.remove()
        return rows

    monkeypatch.setattr(frames, "events_after", read_then_another_process_commits)
    received = receive_until(queue_ws, is_type("queue_stats", held=1))
    assert {"message_id": message_id, "action": "held", "queue": "held"} in [
        f["data"] for f in received if f["type"] == "queue_event"], received


# --------------------------------------------------------------------------- filters


def test_filters_select_frames(server, stream_app):
    everything = server.connect("/api/logs/ws")
    errors_and_deliveries = server.connect("/api/logs/ws?level=ERROR&event_type=delivery")
    warnings_only = server.connect("/api/logs/ws?level=warning&type=log")
    events_only = server.connect("/api/logs/ws?type=message_event")

    add_log(stream_app, "debug line", "debug", 10)
    add_log(stream_app, "warn line", "warn", 30)
    add_log(stream_app, "error line", "error", 40)
    add_event(stream_app, "reception", "received", message_id="msg-aaaaaaaaaaaa")
    add_event(stream_app, "delivery", "delivered", message_id="msg-aaaaaaaaaaaa",
              recipient="b@example.net")
    add_log(stream_app, "fatal end", "fatal", 50)
    add_event(stream_app, "system", "end")

    def summary(client, count):
        frames = [receive(client) for _ in range(count)]
        assert no_frame(client)
        # Each kind arrives in id order; the two kinds may interleave.
        return ([f["data"]["message"] for f in frames if f["type"] == "log"],
                [f["data"]["message"] for f in frames if f["type"] == "message_event"])

    assert summary(everything, 7) == (["debug line", "warn line", "error line", "fatal end"],
                                      ["received", "delivered", "end"])
    assert summary(errors_and_deliveries, 3) == (["error line", "fatal end"], ["delivered"])
    assert summary(warnings_only, 3) == (["warn line", "error line", "fatal end"], [])
    assert summary(events_only, 3) == ([], ["received", "delivered", "end"])


def test_queue_socket_ignores_events_that_change_no_queue(server, stream_app):
    queue_ws = server.connect("/api/queue/ws")
    receive(queue_ws)
    add_event(stream_app, "rejection", "refused by the listener")  # no action: not a queue change
    message_id = queued(stream_app)
    frames = receive_until(queue_ws, is_type("queue_event", message_id=message_id))
    assert [f["type"] for f in frames].count("queue_event") == 1


@pytest.mark.parametrize("query", [
    "level=loud", "event_type=bounce", "type=everything", "since_event=-1", "since_log=x",
    "cursor=abc", "cursor=5-7&since_event=3",
    # Row ids are 64-bit: beyond that once passed, then closed the stream with 1011.
    "since_log=9223372036854775808", "since_event=9223372036854775808",
    "queue:since_event=99999999999999999999999", "queue:cursor=9223372036854775808-1",
    "cursor=1-1.9999999999999999999", "queue:cursor=%C2%B2-1", "since_event=%C2%B2",
])
def test_invalid_parameters_refuse_the_upgrade(server, query):
    path = "/api/queue/ws" if query.startswith(("cursor=5", "queue:")) else "/api/logs/ws"
    query = query.removeprefix("queue:")
    status, body = server.handshake(f"{path}?{query}")
    assert status == 400
    assert set(body) == {"error", "code", "details"} and body["code"] == "VALIDATION_ERROR"
    assert isinstance(body["details"], dict)
    assert server.hub.subscriber_count == 0


def test_plain_http_request_to_a_stream_is_a_contract_error(server):
    answers = [server.request("GET", path) for path in ("/api/logs/ws", "/api/queue/ws")]
    status, body = answers[0]
    assert status == 400
    assert body["code"] == "VALIDATION_ERROR" and "WebSocket" in body["error"]
    # The queue stream once answered "Unknown queue type 'ws'" (the listing's rule).
    assert answers[1] == answers[0]


def test_the_largest_resume_ids_are_accepted(server):
    last = 2**63 - 1
    status, _ = server.handshake(f"/api/logs/ws?since_log={last}&since_event={last}")
    assert status == 101
    for path in (f"/api/queue/ws?since_event={last}", f"/api/queue/ws?cursor={last}-{last}"):
        ws = server.connect(path)
        assert receive(ws)["type"] == "queue_stats"


def test_malformed_handshake_is_a_contract_error(server):
    status, body = server.handshake("/api/logs/ws", {"Sec-WebSocket-Key": ""})
    assert status == 400 and body["code"] == "VALIDATION_ERROR"
    status, body = server.handshake("/api/queue/ws", {"Sec-WebSocket-Version": "8"})
    assert status == 400 and body["code"] == "VALIDATION_ERROR"
    assert server.hub.subscriber_count == 0


def test_unknown_parameters_are_ignored(server):
    ws = server.connect("/api/queue/ws?colour=blue")
    assert receive(ws)["type"] == "queue_stats"


# --------------------------------------------------------------------------- resume


def test_reconnect_with_cursor_misses_nothing_and_repeats_nothing(server, stream_app):
    ws = server.connect("/api/logs/ws")
    first = [add_event(stream_app, "system", f"before {i}") for i in range(3)]
    first_logs = [add_log(stream_app, f"log before {i}") for i in range(2)]
    frames = [receive(ws) for _ in range(len(first) + len(first_logs))]
    assert sorted(f["data"]["id"] for f in frames if f["type"] == "message_event") == first
    cursor = frames[-1]["cursor"]
    close_quietly(ws)

    missed_events = [add_event(stream_app, "system", f"while away {i}") for i in range(4)]
    missed_logs = [add_log(stream_app, f"log while away {i}") for i in range(3)]

    again = server.connect(f"/api/logs/ws?cursor={cursor}")
    later_event = add_event(stream_app, "system", "after reconnect")
    resumed = [receive(again) for _ in range(len(missed_events) + 1 + len(missed_logs))]
    event_ids = [f["data"]["id"] for f in resumed if f["type"] == "message_event"]
    log_ids = [f["data"]["id"] for f in resumed if f["type"] == "log"]
    assert event_ids == missed_events + [later_event]
    assert log_ids == missed_logs
    assert no_frame(again)


def test_reconnect_with_since_ids(server, stream_app):
    done = add_event(stream_app, "system", "seen")
    seen_log = add_log(stream_app, "seen log")
    missed = add_event(stream_app, "system", "missed")
    missed_log = add_log(stream_app, "missed log", "error", 40)
    ws = server.connect(f"/api/logs/ws?since_event={done}&since_log={seen_log}")
    frames = [receive(ws), receive(ws)]
    assert sorted((f["type"], f["data"]["id"]) for f in frames) == [
        ("log", missed_log), ("message_event", missed)]
    assert no_frame(ws)


def test_resume_applies_the_filters(server, stream_app):
    add_log(stream_app, "quiet", "info", 20)
    loud = add_log(stream_app, "loud", "error", 40)
    add_event(stream_app, "reception", "r")
    ws = server.connect("/api/logs/ws?since_event=0&since_log=0&level=error&type=log")
    frame = receive(ws)
    assert (frame["type"], frame["data"]["id"]) == ("log", loud)
    assert no_frame(ws)


def test_queue_socket_resumes_queue_events(server, stream_app):
    ws = server.connect("/api/queue/ws")
    hello = receive(ws)
    close_quietly(ws)
    first = queued(stream_app)
    second = queued(stream_app)
    add_event(stream_app, "rejection", "not a queue change")
    again = server.connect(f"/api/queue/ws?cursor={hello['cursor']}")
    stats = receive(again)
    assert stats["type"] == "queue_stats" and stats["data"]["pending"] == 2
    events = [receive(again), receive(again)]
    assert [e["data"]["message_id"] for e in events] == [first, second]
    assert all(e["type"] == "queue_event" and e["data"]["action"] == "queued" for e in events)
    assert no_frame(again)


def test_late_commit_of_an_earlier_id_is_delivered_once(server, stream_app):
    """PostgreSQL can make id n+1 visible before id n: the stream still delivers n, once."""
    with stream_app.app_context():
        if db.engine.dialect.name != "postgresql":
            pytest.skip("SQLite has one writer: ids always commit in order")
        engine = db.engine
    ws = server.connect("/api/logs/ws?type=message_event")
    slow = engine.connect()
    try:
        slow_tx = slow.begin()
        slow.execute(sa.insert(DeliveryEvent).values(
            timestamp=utcnow(), event_type="system", message="slow", threats=[]))
        fast_id = add_event(stream_app, "system", "fast")
        frame = receive(ws)
        assert frame["data"]["id"] == fast_id
        cursor_after_fast = frame["cursor"]
        slow_tx.commit()
    finally:
        slow.close()
    late = receive(ws)
    assert late["data"]["message"] == "slow" and late["data"]["id"] < fast_id
    assert no_frame(ws)
    # A client that disconnected right after "fast" still gets "slow" on resume, and only it.
    again = server.connect(f"/api/logs/ws?type=message_event&cursor={cursor_after_fast}")
    assert receive(again)["data"]["message"] == "slow"
    assert no_frame(again)
    # And one resuming after "slow" gets nothing again.
    last = server.connect(f"/api/logs/ws?type=message_event&cursor={late['cursor']}")
    assert no_frame(last)


# --------------------------------------------------------------------------- many and bad clients


@pytest.mark.slow
def test_hundred_clients_all_receive_every_frame(server, stream_app):
    clients = [server.connect("/api/logs/ws?type=message_event") for _ in range(100)]
    assert wait_until(lambda: server.hub.subscriber_count == 100)
    ids = [add_event(stream_app, "system", f"broadcast {i}") for i in range(5)]
    for client in clients:
        got = [receive(client)["data"]["id"] for _ in ids]
        assert got == ids
    for client in clients:
        close_quietly(client)
    assert wait_until(lambda: server.hub.subscriber_count == 0)


def _server_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name != "MainThread"}


def test_vanished_clients_leave_no_thread_or_connection(server, stream_app):
    baseline = _server_threads()
    sockets = [raw_websocket(server.port, path) for path in ("/api/logs/ws", "/api/queue/ws",
                                                             "/api/logs/ws?level=error")]
    assert wait_until(lambda: server.hub.subscriber_count == 3)
    assert server.hub.running
    for sock in sockets:  # gone without a close frame: a reset, as when a laptop drops off
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    add_event(stream_app, "system", "nobody listens")
    assert wait_until(lambda: server.hub.subscriber_count == 0)
    assert wait_until(lambda: not server.hub.running)
    assert wait_until(lambda: _server_threads() <= baseline), _server_threads() - baseline
    with stream_app.app_context():
        assert db.engine.pool.checkedout() == 0


def test_silent_client_is_dropped_by_ping_timeout(make_app):
    app = make_app(stream_ping_interval=0.3, stream_poll_interval=0.2)
    empty_database(app)
    live = LiveServer(app).start()
    try:
        sock = raw_websocket(live.port, "/api/logs/ws")  # never reads, never answers a ping
        try:
            assert wait_until(lambda: live.hub.subscriber_count == 1)
            assert wait_until(lambda: live.hub.subscriber_count == 0)
        finally:
            sock.close()
    finally:
        live.stop()


def test_slow_client_overflow_closes_it_and_resume_recovers(make_app):
    app = make_app(stream_queue_size=5, stream_poll_interval=0.2)
    empty_database(app)
    live = LiveServer(app).start()
    try:
        ws = live.connect("/api/logs/ws?type=message_event")
        other = live.connect("/api/logs/ws?type=message_event&event_type=reception")
        assert wait_until(lambda: live.hub.subscriber_count == 2)
        with app.app_context():
            for i in range(30):  # one commit: one poll hands the hub 30 rows at once
                record_event(db.session, "system", message=f"burst {i}")
            db.session.commit()
            ids = list(db.session.scalars(sa.select(DeliveryEvent.id).order_by(DeliveryEvent.id)))
            db.session.remove()
        received = []
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                text = ws.receive(timeout=15)
                assert text is not None
                received.append(json.loads(text))
        assert closed.value.reason == 1013
        cursor = received[-1]["cursor"] if received else "0-0"
        seen = [f["data"]["id"] for f in received]
        again = live.connect(f"/api/logs/ws?type=message_event&cursor={cursor}")
        rest = [receive(again)["data"]["id"] for _ in range(len(ids) - len(seen))]
        assert seen + rest == ids
        assert no_frame(again)
        # The other client was not disturbed (it wanted none of these).
        assert other.connected
    finally:
        live.stop()


def _most_a_stuck_socket_absorbs() -> int:
    """Bytes the kernel may buffer for a peer that reads nothing: the largest send buffer TCP
    autotuning may grow to (tcp_wmem's maximum), plus the peer's small receive buffer."""
    try:
        with open("/proc/sys/net/ipv4/tcp_wmem") as sysctl:
            return int(sysctl.read().split()[2]) + 64 * 1024
    except (OSError, ValueError, IndexError):
        return 16 * 1024 * 1024


def test_client_that_stops_reading_delays_nobody_and_is_cut_off(make_app):
    # The healthy client is a thread of this (possibly very busy) process: the send timeout is
    # generous so that it never looks stuck; the stuck one is cut off however long that takes.
    app = make_app(stream_send_timeout=3.0, stream_poll_interval=0.2)
    empty_database(app)
    live = LiveServer(app).start()
    try:
        stuck = socket.socket()
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills at once
        stuck.settimeout(10)
        stuck.connect(("127.0.0.1", live.port))
        stuck.sendall(b"GET /api/logs/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                      b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                      b"Sec-WebSocket-Version: 13\r\n\r\n")
        try:
            healthy = live.connect("/api/logs/ws")
            assert wait_until(lambda: live.hub.subscriber_count == 2)
            bulky = "x" * 100_000
            # More than the kernel can buffer for the stuck client, whatever its send buffer
            # grows to (otherwise its writes never block and it is never cut off).
            count = _most_a_stuck_socket_absorbs() // len(bulky) + 5
            ids = [add_event(app, "system", f"{i} {bulky}") for i in range(count)]
            assert [receive(healthy)["data"]["id"] for _ in ids] == ids
            assert wait_until(lambda: live.hub.subscriber_count == 1)  # the stuck one is gone
            assert healthy.connected
        finally:
            stuck.close()
    finally:
        live.stop()


def test_shutdown_closes_streams_with_going_away(server):
    ws = server.connect("/api/queue/ws")
    receive(ws)
    shutdown_streams()
    try:
        with pytest.raises(ConnectionClosed) as closed:
            while ws.receive(timeout=15) is not None:
                pass
        assert closed.value.reason == 1001
        assert wait_until(lambda: server.hub.subscriber_count == 0)
        status, body = server.handshake("/api/queue/ws")
        assert status == 503 and body["code"] == "SERVICE_UNAVAILABLE"
    finally:
        server.hub.closing = False


# --------------------------------------------------------------------------- authentication


def test_streams_follow_the_auth_mode(make_app):
    app = make_app(auth_mode="all")
    empty_database(app)
    live = LiveServer(app).start()
    try:
        status, body = live.handshake("/api/queue/ws")
        assert status == 401 and body["code"] == "UNAUTHORIZED"
        ws = live.connect(f"/api/queue/ws?api_key={TEST_ADMIN_KEY}")
        assert receive(ws)["type"] == "queue_stats"
        ws2 = live.connect("/api/logs/ws", headers={"Authorization": f"Bearer {TEST_ADMIN_KEY}"})
        assert ws2.connected
    finally:
        live.stop()


def test_timestamps_are_contract_format(server, stream_app):
    ws = server.connect("/api/logs/ws")
    add_log(stream_app, "when")
    frame = receive(ws)
    stamp = frame["data"]["timestamp"]
    assert dt.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ")

"""Fault injection during delivery: kill -9 of the worker, the database going away.

Counts are taken at a real SMTP peer on loopback, per recipient: every queued message must
arrive, and no more often than docs/DELIVERY.md ("What a crash or an outage can send twice")
allows: after a kill -9, at most one transaction per delivery thread again; after a database
outage shorter than the lease, none.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import Counter

import pytest
import sqlalchemy as sa

from app.delivery.worker import Job, Worker, without_recipients_in_flight
from app.extensions import db
from app.models import DeliveryEvent, Message, Recipient
from app.queue.leases import ClaimedRecipient
from tests.delivery_helpers import (
    Behaviour,
    Peer,
    assert_each_delivered_once,
    bulk_queue,
    run_worker,
    stop_process,
    wait_for,
    worker_process,
)
from tests.fault_helpers import SqliteLock, TcpProxy

COUNT = 240
OUTAGE_SECONDS = 3.0


def _scalar(app, query):
    with app.app_context():
        value = db.session.scalar(query)
        db.session.remove()
        return value


def _queued(app) -> int:
    return _scalar(app, sa.select(sa.func.count()).select_from(Message))


def test_kill_9_mid_load_sends_again_at_most_one_transaction_per_thread(
        app, make_app, database_url):
    concurrency = 4
    threads = 4 * concurrency  # ELEMTA_WORKER_THREADS's default: the bound of a kill -9
    with Peer() as peer:
        bulk_queue(app, COUNT)
        process = worker_process(database_url, relay_host=peer.address,
                                 worker_concurrency=str(concurrency), worker_lease_seconds="2")
        try:
            wait_for(lambda: len(peer.received) >= COUNT // 3, seconds=60)
            process.send_signal(signal.SIGKILL)
            process.wait(10)
        finally:
            stop_process(process)
        assert 0 < _queued(app) < COUNT  # it died mid-load
        time.sleep(2.2)  # the dead worker's leases expire
        run_worker(make_app(relay_host=peer.address, worker_lease_seconds=2))

    received = Counter(peer.recipients_received())
    assert set(received) == {f"r{n}@example.net" for n in range(COUNT)}
    assert sum(received.values()) - COUNT <= threads
    assert _queued(app) == 0
    recorded = _scalar(app, sa.select(sa.func.count(sa.distinct(DeliveryEvent.recipient)))
                       .where(DeliveryEvent.event_type == "delivery"))
    assert recorded == COUNT


class _Outage:
    """Cuts the database once, at the n-th message the peer accepts, for a few seconds."""

    def __init__(self, database_url: str, at_message: int) -> None:
        self.database_url = database_url
        self.at_message = at_message
        self.seen = 0
        self.started = threading.Event()
        self.over = threading.Event()
        self.proxy: TcpProxy | None = None
        if database_url.startswith("postgresql"):
            url = sa.make_url(database_url)
            self.proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432).__enter__()

    def worker_settings(self) -> dict[str, object]:
        if self.proxy is not None:
            return {"database_url": self.proxy.url_for(self.database_url)}
        # A writer that finds the database locked gives up after 0.5 s instead of 30 s.
        return {"sqlalchemy_engine_options": {"connect_args": {"timeout": 0.5}}}

    def before_data_reply(self) -> None:
        self.seen += 1
        if self.seen != self.at_message:
            return
        if self.proxy is not None:
            self.proxy.cut()
            end = self.proxy.restore
        else:
            end = SqliteLock(self.database_url).take().release
        self.started.set()

        def finish() -> None:
            end()
            self.over.set()
        threading.Timer(OUTAGE_SECONDS, finish).start()

    def close(self) -> None:
        self.over.wait(OUTAGE_SECONDS + 30)
        if self.proxy is not None:
            self.proxy.cut()


@pytest.mark.parametrize("lease", [300, 2], ids=["outage-shorter-than-lease",
                                                 "outage-longer-than-lease"])
def test_a_database_outage_during_delivery_sends_nothing_twice(
        app, make_app, database_url, caplog, lease):
    # Longer than the lease: the held outcomes' leases expired during the outage; the worker
    # renews them before anything (its own claims included) can take them back.
    outage = _Outage(database_url, at_message=COUNT // 4)
    caplog.set_level(logging.WARNING, logger="elemta.delivery")
    try:
        with Peer(Behaviour(before_data_reply=outage.before_data_reply)) as peer:
            bulk_queue(app, COUNT)
            worker = Worker(make_app(relay_host=peer.address, worker_concurrency=4,
                                     worker_lease_seconds=lease, **outage.worker_settings()))
            thread = threading.Thread(target=worker.run)
            thread.start()
            try:
                wait_for(lambda: outage.over.is_set() and _queued(app) == 0, seconds=120)
            finally:
                worker.stop()
                thread.join(60)
    finally:
        outage.close()

    assert outage.started.is_set()
    assert_each_delivered_once(app, peer, COUNT)
    # The outage was met by the recorder (it held outcomes and wrote them afterwards)...
    messages = [r.getMessage() for r in caplog.records]
    assert any("delivery outcome(s) failed" in m and "waiting for the database" in m
               for m in messages), messages
    assert any(m.startswith("database back") for m in messages), messages
    # ...and nothing was left to a lease (every recipient recorded once, checked above).
    assert _scalar(app, sa.select(sa.func.count()).select_from(Recipient)) == 0
    assert worker.recorded_attempts == COUNT


def test_a_worker_never_starts_a_second_job_for_a_recipient_it_is_delivering():
    # Its lease expired while the first job was under way, and its own claim took it back.
    def job(message_id: str, *ids: int) -> Job:
        return Job(message_id, "relay", "example.net",
                   [ClaimedRecipient(i, message_id, f"r{i}@example.net", "example.net")
                    for i in ids], claimed_at=0.0)

    under_way = [job("m1", 1, 2), job("m2", 3)]
    claimed = [job("m1", 2, 4), job("m2", 3), job("m3", 5)]
    kept = without_recipients_in_flight(claimed, under_way)
    assert [(j.message_id, [r.id for r in j.recipients]) for j in kept] == [
        ("m1", [4]), ("m3", [5])]

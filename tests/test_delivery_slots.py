"""Deliveries at once (``ELEMTA_WORKER_CONCURRENCY``) apart from the delivery threads.

A job holds one of the concurrency's slots for its SMTP part only and gives it back when it
hands its outcome to the recorder (app/delivery/worker.py): with four times as many threads
as slots (``ELEMTA_WORKER_THREADS``'s default), some threads wait for their commit while others
are in SMTP, never more than the concurrency at once, and a thread still starts nothing new
before its last outcome is committed.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import pytest
import sqlalchemy as sa

from app.config import ConfigError
from app.delivery import recorder as recorder_module
from app.delivery.worker import Worker
from app.extensions import db
from app.models import Message, Recipient
from tests.delivery_helpers import Peer, assert_each_delivered_once, bulk_queue


class Census:
    """Which threads are in SMTP and which wait for their commit, at every change."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.smtp: set[int] = set()
        self.committing: set[int] = set()  # handed over, not committed yet
        self.max_smtp = 0
        self.max_busy = 0  # in SMTP or waiting for a commit
        self.overlap = 0  # transactions begun while another thread waited for its commit
        self.sent_uncommitted: Counter[int] = Counter()  # per thread, at each new transaction

    def enter_smtp(self) -> None:
        me = threading.get_ident()
        with self.lock:
            assert me not in self.committing, "a thread began a transaction before its commit"
            self.smtp.add(me)
            self.overlap += bool(self.committing)
            self.max_smtp = max(self.max_smtp, len(self.smtp))
            self.max_busy = max(self.max_busy, len(self.smtp | self.committing))

    def leave_smtp(self) -> None:
        with self.lock:
            self.smtp.discard(threading.get_ident())

    def hand_over(self) -> None:
        with self.lock:
            self.committing.add(threading.get_ident())
            self.max_busy = max(self.max_busy, len(self.smtp | self.committing))

    def committed(self, threads: set[int]) -> None:
        with self.lock:
            self.committing -= threads


def _watch(worker: Worker, census: Census, monkeypatch: pytest.MonkeyPatch,
           smtp_seconds: float, commit_seconds: float) -> None:
    deliver = worker.client.deliver

    def counted_deliver(*args: Any, **kwargs: Any) -> Any:
        census.enter_smtp()
        try:
            time.sleep(smtp_seconds)  # long enough for the transactions to overlap
            return deliver(*args, **kwargs)
        finally:
            census.leave_smtp()

    monkeypatch.setattr(worker.client, "deliver", counted_deliver)

    record = worker.recorder.record

    def counted_record(attempt: Any) -> bool:
        census.hand_over()
        return record(attempt)

    monkeypatch.setattr(worker.recorder, "record", counted_record)

    finish = worker.recorder._finish
    write = recorder_module.record_outcomes

    def slow_write(*args: Any, **kwargs: Any) -> Any:
        time.sleep(commit_seconds)  # a slow commit: the threads pile up waiting for it
        return write(*args, **kwargs)

    def counted_finish(outcomes: list[Any]) -> None:
        census.committed({o.thread for o in outcomes})
        finish(outcomes)

    monkeypatch.setattr(recorder_module, "record_outcomes", slow_write)
    monkeypatch.setattr(worker.recorder, "_finish", counted_finish)


def test_at_most_the_concurrency_is_in_smtp_while_more_threads_wait_for_commits(
        app, make_app, monkeypatch):
    bulk_queue(app, 60)
    census = Census()
    with Peer() as peer:
        worker = Worker(make_app(relay_host=peer.address, worker_concurrency=3))
        assert (worker.concurrency, worker.threads) == (3, 12)  # four times, by default
        _watch(worker, census, monkeypatch, smtp_seconds=0.02, commit_seconds=0.05)
        worker.run(once=True)
    # Never more SMTP transactions at once than the concurrency, which was reached...
    assert census.max_smtp == 3
    # ...while more threads than that were busy: in SMTP or waiting for their commit.
    assert census.max_busy > 3
    assert census.overlap > 0, "no transaction ran while another thread waited for its commit"
    assert_each_delivered_once(app, peer, 60)
    assert worker.recorded_attempts == 60


def test_threads_equal_to_the_concurrency_keep_one_slot_each(app, make_app, monkeypatch):
    # ELEMTA_WORKER_THREADS = the concurrency: the worker before the slots (a thread waiting
    # for its commit holds a place of the concurrency).
    bulk_queue(app, 24)
    census = Census()
    with Peer() as peer:
        worker = Worker(make_app(relay_host=peer.address, worker_concurrency=2,
                                 worker_threads=2))
        _watch(worker, census, monkeypatch, smtp_seconds=0.01, commit_seconds=0.02)
        worker.run(once=True)
    assert census.max_busy <= 2
    assert len(peer.recipients_received()) == 24


def test_a_job_waiting_for_a_slot_when_the_worker_stops_gives_its_claim_back(app, make_app):
    bulk_queue(app, 1)
    with Peer() as peer:
        worker = Worker(make_app(relay_host=peer.address, worker_concurrency=1))
        [job] = worker._claim(10)
        worker.stop()  # SIGTERM while the job waited for its slot
        worker._run_job(job)
    assert peer.recipients_received() == []
    assert worker.recorded_attempts == 0
    with app.app_context():
        recipient = db.session.scalars(sa.select(Recipient)).one()
        assert recipient.lease_owner is None and recipient.status == "pending"
        assert db.session.scalar(sa.select(sa.func.count()).select_from(Message)) == 1
        db.session.remove()


def test_worker_threads_setting(make_app):
    from app.config import worker_connections, worker_threads

    app = make_app(worker_concurrency=5)
    assert worker_threads(app.config) == 20
    assert worker_connections(app.config) == 23
    app = make_app(worker_concurrency=5, worker_threads=7)
    assert worker_threads(app.config) == 7
    with pytest.raises(ConfigError, match="ELEMTA_WORKER_THREADS: 4 must be at least "
                                          r"ELEMTA_WORKER_CONCURRENCY \(5\)"):
        make_app(worker_concurrency=5, worker_threads=4)


def test_the_database_pool_has_a_connection_for_every_delivery_thread(make_app, database_url):
    app = make_app(worker_concurrency=20)  # 80 threads + 3
    with app.app_context():
        pool = db.engine.pool
        if database_url.startswith("postgresql"):
            assert pool.size() == 83 and pool._max_overflow == 0  # type: ignore[attr-defined]
        else:
            assert pool.size() + pool._max_overflow >= 83  # type: ignore[attr-defined]
    app = make_app()  # the default: 32 threads + 3
    with app.app_context():
        pool = db.engine.pool
        if database_url.startswith("postgresql"):
            assert pool.size() == 35
        else:
            assert (pool.size(), pool._max_overflow) == (5, 30)  # type: ignore[attr-defined]

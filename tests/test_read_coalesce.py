"""app/readcoalesce.py and GET /api/queue/stats: the concurrent requests of one process share
one read, none takes a value read before it arrived, and a failed read fails its generation only.

A read is held in flight by a hook around ``counters.counts_folding`` (after the statement ran,
so the held value is the one read before the hook's event): no test depends on timing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy.exc as sa_exc
from flask import Flask

from app.extensions import db
from app.queue import counters
from app.queue.reading import STATS_READS
from app.readcoalesce import ReadCoalescer
from tests.helpers import queue_message

WAIT = 60  # seconds: only a bound for a broken build, never a timing assertion


class HeldReads:
    """Wraps ``counters.counts_folding``: counts the reads; read number ``hold`` (1-based) stops
    after its statement until ``release``; reads listed in ``fail`` raise a driver error that
    means 'database unavailable'."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, hold: int = 1,
                 fail: tuple[int, ...] = ()) -> None:
        self.calls = 0
        self.hold = hold
        self.fail = fail
        self.in_flight = threading.Event()
        self.release = threading.Event()
        self._lock = threading.Lock()
        read = counters.counts_folding

        def hooked(session: Any) -> dict[str, int]:
            with self._lock:
                self.calls += 1
                number = self.calls
            if number in self.fail:
                raise sa_exc.OperationalError(
                    "SELECT", None, ConnectionError("server closed the connection"))
            counts = read(session)
            if number == self.hold:
                self.in_flight.set()
                assert self.release.wait(WAIT)
            return counts

        monkeypatch.setattr(counters, "counts_folding", hooked)


def _get_in_thread(app: Flask, answers: list[Any]) -> threading.Thread:
    def get() -> None:
        response = app.test_client().get("/api/queue/stats")
        answers.append((response.status_code, response.get_json()))

    thread = threading.Thread(target=get, daemon=True)
    thread.start()
    return thread


def _until(condition: Callable[[], bool]) -> None:
    """Wait (a bounded poll, not a timing assertion) until ``condition()``."""
    done = threading.Event()
    for _ in range(WAIT * 100):
        if condition():
            return
        done.wait(0.01)
    raise AssertionError("condition never held")


def _stats_reads(app: Flask) -> ReadCoalescer[dict[str, int]]:
    return app.extensions[STATS_READS]


def _queue(app: Flask, *states: str) -> None:
    with app.app_context():
        for state in states:
            queue_message(db.session, state=state)
        db.session.commit()
        db.session.remove()


def test_a_request_sees_a_write_committed_while_an_earlier_read_is_in_flight(
        app: Flask, monkeypatch: pytest.MonkeyPatch) -> None:
    _queue(app, "pending")
    held = HeldReads(monkeypatch)
    reads = _stats_reads(app)
    first: list[Any] = []
    leader = _get_in_thread(app, first)
    assert held.in_flight.wait(WAIT)  # read 1 has read 1 pending, and holds its value
    _queue(app, "held")  # committed before the next request arrives
    second: list[Any] = []
    follower = _get_in_thread(app, second)
    _until(lambda: reads.callers == 2)  # it arrived while read 1 was in flight
    held.release.set()
    leader.join(WAIT)
    follower.join(WAIT)
    assert first == [(200, {"pending": 1, "deferred": 0, "held": 0, "failed": 0, "total": 1})]
    # Not read 1's value: a read that started after it arrived, which sees the write.
    assert second == [(200, {"pending": 1, "deferred": 0, "held": 1, "failed": 0, "total": 2})]
    assert held.calls == reads.reads == 2


def test_concurrent_requests_share_reads_and_all_get_the_counts(
        app: Flask, monkeypatch: pytest.MonkeyPatch) -> None:
    _queue(app, "pending", "deferred", "held", "failed", "held")
    held = HeldReads(monkeypatch)
    reads = _stats_reads(app)
    answers: list[Any] = []
    threads = [_get_in_thread(app, answers)]
    assert held.in_flight.wait(WAIT)
    threads += [_get_in_thread(app, answers) for _ in range(7)]
    _until(lambda: reads.callers == 8)  # seven waiting for the read after the held one
    held.release.set()
    for thread in threads:
        thread.join(WAIT)
    expected = {"pending": 1, "deferred": 1, "held": 2, "failed": 1, "total": 5}
    assert answers == [(200, expected)] * 8
    assert held.calls == reads.reads == 2  # eight requests, two reads
    # Each request had its own copy.
    assert len({id(body) for _status, body in answers}) == 8


def test_a_failed_read_fails_its_whole_generation_and_the_next_request_reads_afresh(
        app: Flask, monkeypatch: pytest.MonkeyPatch) -> None:
    _queue(app, "pending", "held")
    held = HeldReads(monkeypatch, fail=(2,))
    reads = _stats_reads(app)
    first: list[Any] = []
    threads = [_get_in_thread(app, first)]
    assert held.in_flight.wait(WAIT)
    failed: list[Any] = []
    threads += [_get_in_thread(app, failed) for _ in range(3)]
    _until(lambda: reads.callers == 4)
    held.release.set()
    for thread in threads:
        thread.join(WAIT)
    counts = {"pending": 1, "deferred": 0, "held": 1, "failed": 0, "total": 2}
    assert first == [(200, counts)]
    # Read 2 (one leader, two waiters) raised: each of its requests has the contract's 503.
    assert len(failed) == 3
    for status, body in failed:
        assert status == 503
        assert body["code"] == "SERVICE_UNAVAILABLE"
    assert held.calls == 2
    # Nothing of the failure is kept: the next request runs read 3.
    response = app.test_client().get("/api/queue/stats")
    assert (response.status_code, response.get_json()) == (200, counts)
    assert held.calls == reads.reads == 3


def test_every_caller_of_a_failed_generation_raises_and_none_waits_for_ever() -> None:
    """The coalescer alone: the leader raises its error, each waiter a copy caused by it."""
    reads = ReadCoalescer[int]("test")
    in_flight, release = threading.Event(), threading.Event()
    error = ValueError("read failed")
    raised: list[BaseException] = []
    values: list[int] = []

    def first_read() -> int:
        in_flight.set()
        assert release.wait(WAIT)
        return 1

    def failing_read() -> int:
        raise error

    def call(read: Callable[[], int]) -> None:
        try:
            values.append(reads.read(read))
        except ValueError as exc:
            raised.append(exc)

    threads = [threading.Thread(target=call, args=(first_read,))]
    threads[0].start()
    assert in_flight.wait(WAIT)
    for _ in range(3):  # the first of them leads the next read, with its failing_read
        threads.append(threading.Thread(target=call, args=(failing_read,)))
        threads[-1].start()
    _until(lambda: reads.callers == 4)
    release.set()
    for thread in threads:
        thread.join(WAIT)
        assert not thread.is_alive()
    assert values == [1]
    assert len(raised) == 3
    assert sum(exc is error for exc in raised) == 1  # the leader's own
    for exc in raised:
        assert str(exc) == "read failed"
        assert exc is error or exc.__cause__ is error
    assert reads.read(lambda: 7) == 7  # a fresh read
    assert reads.reads == 3

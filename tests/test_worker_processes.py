"""``flask worker --processes N``: a supervisor and N forked worker processes.

What one worker guarantees holds for the processes together (each recipient delivered once,
nothing lost when one is killed); SIGTERM stops them all; a killed one is replaced.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

import sqlalchemy as sa

from app.delivery.cli import worker_processes
from app.extensions import db
from app.models import DeliveryEvent, Message, Recipient, WorkerHeartbeat
from tests.delivery_helpers import (
    Behaviour,
    Peer,
    bulk_queue,
    stop_process,
    wait_for,
    worker_process,
)


def _scalar(app, query):
    with app.app_context():
        value = db.session.scalar(query)
        db.session.remove()
        return value


def _heartbeat_pids(app) -> set[int]:
    with app.app_context():
        pids = set(db.session.scalars(sa.select(WorkerHeartbeat.pid)))
        db.session.remove()
        return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_the_number_of_processes(make_app):
    assert worker_processes(make_app(), None) == 1  # the default: one process, as before
    assert worker_processes(make_app(worker_processes=3), None) == 3
    assert worker_processes(make_app(worker_processes=3), 2) == 2  # the option wins
    assert worker_processes(make_app(), 0) == (os.cpu_count() or 1)


def test_processes_drain_the_queue_once_each_recipient_once(app, database_url):
    with Peer(Behaviour()) as peer:
        bulk_queue(app, 60)
        process = worker_process(database_url, "--once", "--processes", "2",
                                 relay_host=peer.address, worker_concurrency="2")
        try:
            assert process.wait(120) == 0
        finally:
            stop_process(process)
    delivered = Counter(r for m in peer.received for r in m.rcpt_tos)
    assert len(delivered) == 60 and set(delivered.values()) == {1}
    assert _scalar(app, sa.select(sa.func.count()).select_from(Message)) == 0
    assert _scalar(app, sa.select(sa.func.count(sa.distinct(DeliveryEvent.recipient)))
                   .where(DeliveryEvent.event_type == "delivery")) == 60
    assert _heartbeat_pids(app) == set()  # each process removed its own at exit


def test_a_killed_process_is_replaced_and_sigterm_stops_them_all(app, database_url):
    with Peer(Behaviour(stall_at="data", stall_seconds=0.2)) as peer:
        bulk_queue(app, 40)
        process = worker_process(database_url, "--processes", "2", relay_host=peer.address,
                                 worker_concurrency="2", worker_lease_seconds="2")
        try:
            wait_for(lambda: len(_heartbeat_pids(app)) == 2, 60)
            first, second = sorted(_heartbeat_pids(app))
            os.kill(first, signal.SIGKILL)
            # Another process takes its place (its heartbeat beside the dead one's).
            wait_for(lambda: len(_heartbeat_pids(app) - {first, second}) == 1, 60)
            [replacement] = _heartbeat_pids(app) - {first, second}
            # Its leases expire and the others deliver everything.
            wait_for(lambda: _scalar(app, sa.select(sa.func.count())
                                     .select_from(Message)) == 0, 90)
            process.send_signal(signal.SIGTERM)
            assert process.wait(40) == 0
        finally:
            stop_process(process)
    assert not _alive(second) and not _alive(replacement)
    # The live ones removed their heartbeats; the killed one could not.
    assert _heartbeat_pids(app) == {first}
    assert _scalar(app, sa.select(sa.func.count()).select_from(Recipient)) == 0
    delivered = Counter(r for m in peer.received for r in m.rcpt_tos)
    assert set(delivered) == {f"r{n}@example.net" for n in range(40)}
    # At-least-once: only what the killed process had in flight may have gone out twice.
    assert sum(delivered.values()) - 40 <= 2

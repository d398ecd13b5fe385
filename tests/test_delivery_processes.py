"""Workers as processes and in parallel: SIGTERM, SIGKILL mid-batch, two workers at once."""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter

import pytest
import sqlalchemy as sa

from app.delivery.worker import Worker
from app.extensions import db
from app.models import DeliveryEvent, Message, Recipient, WorkerHeartbeat
from app.queue.service import accept_message
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
from tests.helpers import raw_message


def _queue_many(app, count: int, prefix: str = "m") -> list[str]:
    with app.app_context():
        ids = []
        for n in range(count):
            raw = raw_message(subject=f"{prefix}{n}").replace(
                b"<test@example.com>", f"<{prefix}{n}@example.com>".encode())
            ids.append(accept_message(db.session, sender="alice@example.com",
                                      recipients=[f"r{n}@example.net"], raw=raw,
                                      origin="api").id)
        db.session.remove()
    return ids


def _scalar(app, query):
    with app.app_context():
        value = db.session.scalar(query)
        db.session.remove()
        return value


def test_sigterm_finishes_the_transaction_under_way_and_gives_back_the_rest(
        app, make_app, database_url):
    with Peer(Behaviour(stall_at="data", stall_seconds=2)) as peer:
        ids = _queue_many(app, 6)
        process = worker_process(database_url, relay_host=peer.address, worker_concurrency="1",
                                 smtp_timeout="20")
        try:
            wait_for(lambda: peer.open_now > 0 and _scalar(app, sa.select(sa.func.count())
                     .select_from(Recipient).where(Recipient.lease_owner.is_not(None))) >= 2)
            process.send_signal(signal.SIGTERM)
            assert process.wait(40) == 0
        finally:
            stop_process(process)
    # The message being delivered at SIGTERM was finished and recorded...
    assert len(peer.received) == 1
    delivered = _scalar(app, sa.select(sa.func.count()).select_from(DeliveryEvent)
                        .where(DeliveryEvent.event_type == "delivery"))
    assert delivered == 1
    # ...the claimed but unstarted one was given back, the rest were never touched.
    assert _scalar(app, sa.select(sa.func.count()).select_from(Recipient)
                   .where(Recipient.lease_owner.is_not(None))) == 0
    assert _scalar(app, sa.select(sa.func.count()).select_from(Message)) == len(ids) - 1
    assert _scalar(app, sa.select(sa.func.count()).select_from(WorkerHeartbeat)) == 0


def test_a_worker_killed_mid_batch_loses_nothing(app, make_app, database_url):
    concurrency = 2
    behaviour = Behaviour(stall_at="data", stall_seconds=0.3)
    with Peer(behaviour) as peer:
        ids = _queue_many(app, 20)
        process = worker_process(database_url, relay_host=peer.address,
                                 worker_concurrency=str(concurrency), worker_lease_seconds="2")
        try:
            wait_for(lambda: len(peer.received) >= 3)
            process.send_signal(signal.SIGKILL)
            process.wait(10)
        finally:
            stop_process(process)
        leased = _scalar(app, sa.select(sa.func.count()).select_from(Recipient)
                         .where(Recipient.lease_owner.is_not(None)))
        assert leased > 0  # it died holding claims
        remaining = _scalar(app, sa.select(sa.func.count()).select_from(Message))
        assert 0 < remaining < len(ids)

        behaviour.stall_at = None
        time.sleep(2.2)  # the dead worker's leases expire
        run_worker(make_app(relay_host=peer.address, worker_lease_seconds=2))

    assert _scalar(app, sa.select(sa.func.count()).select_from(Message)) == 0
    delivered = Counter(r for m in peer.received for r in m.rcpt_tos)
    assert set(delivered) == {f"r{n}@example.net" for n in range(20)}
    # At-least-once: only the transactions in flight at the kill (one per delivery thread at
    # most, each outcome being committed before its thread starts another) may go out twice.
    assert sum(delivered.values()) - 20 <= concurrency
    events = _scalar(app, sa.select(sa.func.count(sa.distinct(DeliveryEvent.recipient)))
                     .where(DeliveryEvent.event_type == "delivery"))
    assert events == 20


@pytest.mark.slow
def test_two_workers_deliver_each_recipient_once(app, make_app, database_url):
    count = 1000 if database_url.startswith("postgresql") else 200
    both_claimed = threading.Event()

    def until_both_workers_hold_claims() -> None:
        # Which thread the OS runs first must not decide whether both get work: on a loaded
        # machine one worker could otherwise deliver everything before the other's first claim.
        # So no delivery completes until both hold leases (or 30 s, well under SMTP_TIMEOUT).
        deadline = time.monotonic() + 30
        while not both_claimed.is_set() and time.monotonic() < deadline:
            owners = sa.select(sa.func.count(sa.distinct(Recipient.lease_owner)))
            if _scalar(app, owners) >= 2:
                both_claimed.set()
            else:
                time.sleep(0.05)

    with Peer(Behaviour(before_data_reply=until_both_workers_hold_claims)) as peer:
        bulk_queue(app, count)
        workers = [Worker(make_app(relay_host=peer.address, worker_concurrency=4))
                   for _ in range(2)]
        errors: list[BaseException] = []

        def run(worker: Worker) -> None:
            try:
                worker.run(once=True)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(w,)) for w in workers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        # A --once worker stops when nothing is claimable; finish anything left by timing.
        run_worker(make_app(relay_host=peer.address))
    assert errors == []
    assert all(w.recorded_attempts > 0 for w in workers), [w.recorded_attempts for w in workers]
    assert_each_delivered_once(app, peer, count)
    assert _scalar(app, sa.select(sa.func.count()).select_from(Message)) == 0

"""The O(1) queue counts stay equal to a real count, whatever happens concurrently."""

from __future__ import annotations

import threading

import sqlalchemy as sa

from app.extensions import db
from app.models import Message, QueueCountDelta
from app.queue import counters, service
from tests.helpers import queue_message


def _actual(session) -> dict[str, int]:
    session.expire_all()
    counts = dict.fromkeys(("pending", "deferred", "held", "failed"), 0)
    for state, n in session.execute(sa.select(Message.queue_state, sa.func.count())
                                    .group_by(Message.queue_state)):
        counts[state] = n
    counts["total"] = sum(counts.values())
    return counts


def test_counts_follow_every_kind_of_change(session):
    ids = [queue_message(session, state=s) for s in ("pending", "deferred", "held", "failed") * 2]
    assert counters.queue_counts(session) == _actual(session)
    service.hold_message(session, ids[0], "t")
    service.release_message(session, ids[2], "t")
    service.delete_message(session, ids[1], "t")
    service.bulk_action(session, "flush", "failed", service.MessageFilters(), "t")
    assert counters.queue_counts(session) == _actual(session)
    assert counters.fold_deltas(session) > 0
    assert session.scalar(sa.select(sa.func.count()).select_from(QueueCountDelta)) == 0
    assert counters.queue_counts(session) == _actual(session)


def test_recount_repairs_damaged_counts(session):
    for state in ("pending", "deferred", "held"):
        queue_message(session, state=state)
    session.execute(sa.text("UPDATE queue_counts SET n = n + 7"))
    session.commit()
    assert counters.queue_counts(session) != _actual(session)
    counters.recount(session)
    assert counters.queue_counts(session) == _actual(session)


def test_counts_stay_exact_under_concurrent_writers_and_folds(app):
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer(n: int) -> None:
        try:
            with app.app_context():
                for i in range(15):
                    message_id = queue_message(db.session, recipients=(f"w{n}-{i}@example.net",))
                    if i % 3 == 0:
                        service.hold_message(db.session, message_id, "t")
                    if i % 5 == 0:
                        service.delete_message(db.session, message_id, "t")
                db.session.remove()
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    def folder() -> None:
        try:
            with app.app_context():
                while not stop.is_set():
                    counters.fold_deltas(db.session)
                db.session.remove()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    fold_thread = threading.Thread(target=folder)
    fold_thread.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    fold_thread.join()
    assert errors == []
    with app.app_context():
        assert counters.queue_counts(db.session) == _actual(db.session)
        assert _actual(db.session)["total"] == 4 * (15 - 3)
        db.session.remove()


def test_migrations_match_the_models(runner):
    result = runner.invoke(args=["db", "check"])
    assert result.exit_code == 0, result.output

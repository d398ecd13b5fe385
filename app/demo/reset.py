"""``flask demo reset``: remove what ``flask demo seed`` added, and nothing else.

Demo data is recognised by its message ids (``DEMO_ID_PREFIX``, every generator uses it) and,
for the queue, by ``origin = 'demo'``. Deleted: the demo messages still queued (with their
recipients and contents) and every event of a demo message id (the seeded history, the seeded
messages' events, and what the worker or an operator later recorded for them); the delivery
rollup of the hours concerned is recounted from the events that remain. Kept: mail that came in
over SMTP or the API (and its events), bounces, log records, API keys, DKIM keys.

A ``system`` event saying so is recorded first, in its own transaction (no message id and no
action: it changes no queued message, so the queue stream sends no ``queue_event`` for it).
Besides the audit, it keeps the highest event id in place: SQLite gives a new row the highest
id + 1, so deleting the newest events would hand their ids out again, and a stream client
resuming with a cursor (docs/STREAMS.md) would skip the new events that reuse them.
"""

from __future__ import annotations

import logging

import sqlalchemy.orm as so

from ..events import delete_events, record_event
from ..queue import counters, shape
from ..queue.bulk import delete_bulk
from .vocabulary import DEMO_ID_PREFIX

log = logging.getLogger("elemta.demo")


def reset_demo(session: so.Session, actor: str = "cli") -> dict[str, int]:
    """Delete the demo data; commits. Returns {"messages": n, "events": n}."""
    record_event(session, "system", message=f"Demo data reset by {actor}: the demo messages "
                 f"({DEMO_ID_PREFIX}...) and their events are deleted")
    session.commit()
    messages = delete_bulk(session, origin="demo", id_prefix=DEMO_ID_PREFIX)
    events = delete_events(session, DEMO_ID_PREFIX)
    counters.fold_deltas(session)
    shape.fold(session)
    session.commit()
    log.info("demo data reset by %s: %d message(s), %d event(s) deleted", actor, messages,
             events)
    return {"messages": messages, "events": events}

"""Queued demo messages in bulk on PostgreSQL: a million in minutes, generated in the server.

The Python path of ``messages.seed_messages`` builds every message with ``EmailMessage`` and
sends it over the wire (about 2 ms a message); a million would take most of an hour. Here the
queue's server-side generator (``queue.bulk.generate_postgresql``) fills chunks of ``CHUNK``
messages from this module's vocabulary. The triggers keep the queue counts; the rollup of the
touched hours is recounted at the end.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
import sqlalchemy.orm as so

from ..events import rebuild_rollup
from ..queue import counters, shape
from ..queue.bulk import generate_postgresql
from ..stats.classify import failure_class
from .vocabulary import (
    DEMO_ID_PREFIX,
    DOMAINS,
    PERM_ERRORS,
    STATE_WEIGHTS,
    SUBJECTS,
    TEMP_ERRORS,
    USERS,
    run_tag,
)

CHUNK = 50_000


def seed_messages_postgresql(session: so.Session, count: int, *, seed: int | None = None,
                             now: dt.datetime, spread_hours: int = 72,
                             progress: Callable[[int, int], None] | None = None) -> dict[str, int]:
    """Insert ``count`` queued messages set-based; commits per chunk. Returns counts per state."""
    if seed is not None:
        session.execute(sa.text("SELECT setseed(:s)"), {"s": ((seed * 7919) % 1000) / 1000})
    total = sum(STATE_WEIGHTS.values())
    cuts, running = {}, 0
    for state, weight in STATE_WEIGHTS.items():
        running += weight
        cuts[f"cut_{state}"] = running / total
    params: dict[str, Any] = {
        "tag": run_tag(None), "id_prefix": DEMO_ID_PREFIX, "now": now,
        "spread": spread_hours * 3600 - 30,
        "users": USERS, "n_users": len(USERS), "domains": DOMAINS, "n_domains": len(DOMAINS),
        "subjects": SUBJECTS, "n_subjects": len(SUBJECTS),
        "temp_codes": [e[0] for e in TEMP_ERRORS], "temp_enh": [e[1] for e in TEMP_ERRORS],
        "temp_text": [e[2] for e in TEMP_ERRORS], "n_temp": len(TEMP_ERRORS),
        "perm_codes": [e[0] for e in PERM_ERRORS], "perm_enh": [e[1] for e in PERM_ERRORS],
        "perm_text": [e[2] for e in PERM_ERRORS], "n_perm": len(PERM_ERRORS),
        "temp_class": [failure_class(*e) for e in TEMP_ERRORS],
        "perm_class": [failure_class(*e) for e in PERM_ERRORS],
        **{k: cuts[k] for k in ("cut_pending", "cut_deferred", "cut_held")},
    }
    before = counters.queue_counts(session)
    for first in range(1, count + 1, CHUNK):
        last = min(count, first + CHUNK - 1)
        generate_postgresql(session, params | {"first": first, "last": last})
        session.commit()
        shape.fold(session)  # a chunk's shape deltas at a time, not a million rows at the end
        if progress:
            progress(last, count)
    rebuild_rollup(session, now - dt.timedelta(hours=spread_hours + 1), now)
    session.commit()
    counters.fold_deltas(session)
    shape.fold(session)
    session.execute(sa.text("ANALYZE messages"))
    session.execute(sa.text("ANALYZE recipients"))
    session.execute(sa.text("ANALYZE delivery_events"))
    session.execute(sa.text("ANALYZE domain_rollup"))
    session.commit()
    after = counters.queue_counts(session)
    return {state: after[state] - before[state] for state in STATE_WEIGHTS}

"""A year of demo delivery history: events in a realistic mix, with a consistent rollup.

The events are a message history that no longer has queue entries: receptions, deliveries,
temporary and permanent failures, operator actions, spread evenly over ``days`` days up to now
(ids grow with time, as in a real append-only history). Ten million rows must take minutes, so
PostgreSQL generates them in the server (``INSERT ... SELECT ... FROM generate_series``, in
chunks of ``PG_CHUNK`` rows, one transaction each) and SQLite gets chunked executemany. The rollup
of the affected hours is then recomputed from the events by ``rebuild_rollup``: the same
set-based recount ``flask stats rebuild`` does, so events and rollup agree by construction.
"""

from __future__ import annotations

import datetime as dt
import math
import random
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
import sqlalchemy.orm as so

from ..events import rebuild_rollup
from ..models import DeliveryEvent
from ..stats.classify import failure_class
from ..timeutil import utcnow
from .vocabulary import DEMO_ID_PREFIX, DOMAINS, PERM_ERRORS, TEMP_ERRORS, USERS, run_tag

PG_CHUNK = 500_000
SQLITE_CHUNK = 5000
EVENTS_PER_MESSAGE = 3  # consecutive events share a message id
LATENCY_LOG_SPAN = math.log(86400)  # the longest demo latency: a day

# Cumulative shares of the event types: most events are deliveries and receptions.
TYPE_MIX = (("reception", 0.30), ("delivery", 0.85), ("tempfail", 0.92), ("rejection", 0.95),
            ("system", 1.0))
# Operator and lifecycle actions of ``system`` events, with the queue state they leave.
SYSTEM_ACTIONS = (("held", "held"), ("released", "pending"), ("retried", "pending"),
                  ("deleted", None), ("flushed", None), ("purged", None))
EFFECT = {"reception": ("queued", "pending"), "delivery": ("delivered", None),
          "tempfail": ("deferred", "deferred"), "rejection": ("failed", "failed")}

Progress = Callable[[int, int], None]


def seed_history(session: so.Session, count: int, *, days: int = 365, seed: int | None = None,
                 now: dt.datetime | None = None,
                 progress: Progress | None = None) -> dict[str, Any]:
    """Insert ``count`` events spread over the ``days`` before ``now``; commits per chunk."""
    now = now or utcnow()
    since = now - dt.timedelta(days=days)
    if count <= 0:
        return {"events": 0, "rollup_rows": 0}
    tag = run_tag(seed)
    if session.get_bind().dialect.name == "postgresql":
        _insert_postgresql(session, count, since, now, tag, seed, progress)
    else:
        _insert_python(session, count, since, now, tag, seed, progress)
    rows = rebuild_rollup(session, since, now)
    session.commit()
    if session.get_bind().dialect.name == "postgresql":
        session.execute(sa.text("ANALYZE delivery_events"))
        session.execute(sa.text("ANALYZE domain_rollup"))
        session.commit()
    return {"events": count, "rollup_rows": rows, "since": since, "until": now}


def _insert_python(session: so.Session, count: int, since: dt.datetime, now: dt.datetime,
                   tag: str, seed: int | None, progress: Progress | None) -> None:
    rng = random.Random(seed)
    step = (now - since).total_seconds() / count
    rows: list[dict[str, Any]] = []
    for g in range(1, count + 1):
        timestamp = since + dt.timedelta(seconds=(g - 1 + rng.random()) * step)
        rows.append(_event(rng, g, timestamp, tag))
        if len(rows) >= SQLITE_CHUNK or g == count:
            session.execute(sa.insert(DeliveryEvent), rows)
            session.commit()
            rows.clear()
            if progress:
                progress(g, count)


def _message_id(tag: str, g: int) -> str:
    return f"{DEMO_ID_PREFIX}h{tag}{(g - 1) // EVENTS_PER_MESSAGE:010x}"


def _sender(g: int) -> str:
    m = (g - 1) // EVENTS_PER_MESSAGE
    return f"{USERS[m % len(USERS)]}@{DOMAINS[(m * 7) % len(DOMAINS)]}"


def _recipient(g: int) -> tuple[str, str]:
    domain = DOMAINS[(g * 5 // 3) % len(DOMAINS)]
    return f"{USERS[(g * 13) % len(USERS)]}@{domain}", domain


def _event(rng: random.Random, g: int, timestamp: dt.datetime, tag: str) -> dict[str, Any]:
    """One history event; the Python twin of the SQL in ``_insert_postgresql``."""
    draw = rng.random()
    event_type = next(name for name, share in TYPE_MIX if draw < share)
    message_id = _message_id(tag, g)
    recipient, domain = _recipient(g)
    row: dict[str, Any] = dict(timestamp=timestamp, event_type=event_type, message_id=message_id,
                               sender=_sender(g), recipient=recipient, threats=[],
                               delivery_ip=None, delivery_host=None, smtp_code=None,
                               enhanced_code=None, spam_score=None)
    row.update(failure_class=None, domain=None, latency=None)
    if event_type == "reception":
        row.update(spam_score=round(rng.random() * 4, 1),
                   message=f"Message accepted (smtp, {rng.randint(800, 60000)} bytes)")
    elif event_type == "system":
        action, state = rng.choice(SYSTEM_ACTIONS)
        row.update(recipient=None, message=f"Message {message_id} {action} by admin",
                   action=action, queue_state=state)
        return row
    else:
        row.update(delivery_host=f"mx.{domain}", delivery_ip=f"192.0.2.{1 + g % 254}",
                   domain=domain)
        if event_type == "delivery":
            row.update(smtp_code=250, enhanced_code="2.0.0",
                       message=f"250 2.0.0 Ok: queued as {g:X}", latency=_latency(rng.random()))
        else:
            errors = TEMP_ERRORS if event_type == "tempfail" else PERM_ERRORS
            code, enhanced, text = rng.choice(errors)
            row.update(smtp_code=code, enhanced_code=enhanced, message=text.format(domain=domain),
                       failure_class=failure_class(code, enhanced, text))
    row["action"], row["queue_state"] = EFFECT[event_type]
    return row


def _latency(draw: float) -> float:
    """Seconds from reception to delivery: most mail goes in seconds, some waits for hours
    (a retry), a long tail up to a day. ``_PG_INSERT`` computes the same from its draw."""
    return round(math.exp(draw * draw * LATENCY_LOG_SPAN), 3)


# The SQL twin of ``_event``: random draws once per row in ``draws``, the rest derived from them
# and from the row number ``g``. Arrays are bound parameters (never inside a GROUP BY here).
_PG_INSERT = sa.text("""
INSERT INTO delivery_events (timestamp, event_type, message_id, sender, recipient, delivery_ip,
    delivery_host, smtp_code, enhanced_code, spam_score, threats, message, action, queue_state,
    failure_class, domain, latency)
SELECT ts, etype, mid, sender,
       CASE WHEN etype = 'system' THEN NULL ELSE rcpt_user || '@' || rcpt_domain END,
       CASE WHEN etype IN ('delivery', 'tempfail', 'rejection')
            THEN '192.0.2.' || (1 + g % 254) END,
       CASE WHEN etype IN ('delivery', 'tempfail', 'rejection') THEN 'mx.' || rcpt_domain END,
       CASE etype WHEN 'delivery' THEN 250
                  WHEN 'tempfail' THEN (CAST(:temp_codes AS int[]))[1 + pick % :n_temp]
                  WHEN 'rejection' THEN (CAST(:perm_codes AS int[]))[1 + pick % :n_perm] END,
       CASE etype WHEN 'delivery' THEN '2.0.0'
                  WHEN 'tempfail' THEN (CAST(:temp_enh AS text[]))[1 + pick % :n_temp]
                  WHEN 'rejection' THEN (CAST(:perm_enh AS text[]))[1 + pick % :n_perm] END,
       CASE WHEN etype = 'reception' THEN round(CAST(spam AS numeric), 1) END,
       CAST('[]' AS json),
       CASE etype
            WHEN 'reception' THEN 'Message accepted (smtp, ' || (800 + pick * 59) || ' bytes)'
            WHEN 'delivery' THEN '250 2.0.0 Ok: queued as ' || upper(to_hex(g))
            WHEN 'tempfail' THEN replace((CAST(:temp_text AS text[]))[1 + pick % :n_temp],
                                         '{domain}', rcpt_domain)
            WHEN 'rejection' THEN (CAST(:perm_text AS text[]))[1 + pick % :n_perm]
            ELSE 'Message ' || mid || ' ' || (CAST(:sys_actions AS text[]))[1 + pick % :n_sys]
                 || ' by admin' END,
       CASE etype WHEN 'reception' THEN 'queued' WHEN 'delivery' THEN 'delivered'
                  WHEN 'tempfail' THEN 'deferred' WHEN 'rejection' THEN 'failed'
                  ELSE (CAST(:sys_actions AS text[]))[1 + pick % :n_sys] END,
       CASE etype WHEN 'reception' THEN 'pending' WHEN 'delivery' THEN NULL
                  WHEN 'tempfail' THEN 'deferred' WHEN 'rejection' THEN 'failed'
                  ELSE (CAST(:sys_states AS text[]))[1 + pick % :n_sys] END,
       CASE etype WHEN 'tempfail' THEN (CAST(:temp_class AS text[]))[1 + pick % :n_temp]
                  WHEN 'rejection' THEN (CAST(:perm_class AS text[]))[1 + pick % :n_perm] END,
       CASE WHEN etype IN ('delivery', 'tempfail', 'rejection') THEN rcpt_domain END,
       CASE WHEN etype = 'delivery'
            THEN round(CAST(exp(spam / 4 * spam / 4 * :latency_span) AS numeric), 3) END
FROM (
    SELECT g, draws.pick, draws.spam,
           CAST(:since AS timestamptz)
               + make_interval(secs => ((g - 1) + draws.jitter) * :step) AS ts,
           CASE WHEN draws.kind < :cut_reception THEN 'reception'
                WHEN draws.kind < :cut_delivery THEN 'delivery'
                WHEN draws.kind < :cut_tempfail THEN 'tempfail'
                WHEN draws.kind < :cut_rejection THEN 'rejection'
                ELSE 'system' END AS etype,
           :id_prefix || 'h' || :tag || lpad(to_hex((g - 1) / :per_message), 10, '0') AS mid,
           (CAST(:users AS text[]))[1 + ((g - 1) / :per_message) % :n_users] || '@'
               || (CAST(:domains AS text[]))[1 + (((g - 1) / :per_message) * 7) % :n_domains]
               AS sender,
           (CAST(:users AS text[]))[1 + (g * 13) % :n_users] AS rcpt_user,
           (CAST(:domains AS text[]))[1 + (g * 5 / 3) % :n_domains] AS rcpt_domain
    FROM generate_series(CAST(:first AS bigint), CAST(:last AS bigint)) AS g
    -- "+ g * 0" ties the lateral subquery to its row: evaluated per row, not once for all.
    CROSS JOIN LATERAL (
        SELECT random() AS kind, random() AS jitter, random() * 4 AS spam,
               CAST(floor(random() * 1000) AS int) + CAST(g * 0 AS int) AS pick
    ) AS draws
) AS rows
""")


def _insert_postgresql(session: so.Session, count: int, since: dt.datetime, now: dt.datetime,
                       tag: str, seed: int | None, progress: Progress | None) -> None:
    if seed is not None:
        session.execute(sa.text("SELECT setseed(:s)"), {"s": (seed % 1000) / 1000})
    cuts = dict(TYPE_MIX)
    params: dict[str, Any] = {
        "since": since, "step": (now - since).total_seconds() / count, "tag": tag,
        "id_prefix": DEMO_ID_PREFIX,
        "per_message": EVENTS_PER_MESSAGE,
        "users": USERS, "n_users": len(USERS), "domains": DOMAINS, "n_domains": len(DOMAINS),
        "temp_codes": [e[0] for e in TEMP_ERRORS], "temp_enh": [e[1] for e in TEMP_ERRORS],
        "temp_text": [e[2] for e in TEMP_ERRORS], "n_temp": len(TEMP_ERRORS),
        "perm_codes": [e[0] for e in PERM_ERRORS], "perm_enh": [e[1] for e in PERM_ERRORS],
        "perm_text": [e[2] for e in PERM_ERRORS], "n_perm": len(PERM_ERRORS),
        "temp_class": [failure_class(*e) for e in TEMP_ERRORS],
        "perm_class": [failure_class(*e) for e in PERM_ERRORS],
        "latency_span": LATENCY_LOG_SPAN,
        "sys_actions": [a for a, _ in SYSTEM_ACTIONS], "sys_states": [s for _, s in SYSTEM_ACTIONS],
        "n_sys": len(SYSTEM_ACTIONS),
        "cut_reception": cuts["reception"], "cut_delivery": cuts["delivery"],
        "cut_tempfail": cuts["tempfail"], "cut_rejection": cuts["rejection"],
    }
    for first in range(1, count + 1, PG_CHUNK):
        last = min(count, first + PG_CHUNK - 1)
        session.execute(_PG_INSERT, params | {"first": first, "last": last})
        session.commit()
        if progress:
            progress(last, count)

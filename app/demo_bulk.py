"""Queued demo messages in bulk on PostgreSQL: a million in minutes, generated in the server.

The Python path of ``demo.seed_messages`` builds every message with ``EmailMessage`` and sends it
over the wire (about 2 ms a message); a million would take most of an hour. Here one statement
per chunk of ``CHUNK`` messages draws every random value once in a materialised CTE and fills
messages, recipients, contents and events from it (data-modifying CTEs; recipients are taken from
the messages' RETURNING, so their foreign key is satisfied). The shape is the Python path's:
every queue state by ``STATE_WEIGHTS``, one to three recipients, a ``reception`` event and, for
messages that were tried, the last outcome of each recipient, with action/queue_state filled.
The triggers keep the queue counts; the rollup of the touched hours is recounted at the end.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
import sqlalchemy.orm as so

from .demo import DOMAINS, PERM_ERRORS, STATE_WEIGHTS, SUBJECTS, TEMP_ERRORS, USERS
from .demo_history import _run_tag
from .events import rebuild_rollup
from .queue import counters

CHUNK = 50_000

_STATEMENT = sa.text("""
WITH draws AS MATERIALIZED (
    SELECT g,
           'msg-b' || :tag || lpad(to_hex(g), 10, '0') AS id,
           CASE WHEN s < :cut_pending THEN 'pending' WHEN s < :cut_deferred THEN 'deferred'
                WHEN s < :cut_held THEN 'held' ELSE 'failed' END AS state,
           CAST(:now AS timestamptz) - make_interval(secs => 30 + age * :spread) AS created,
           CAST(:now AS timestamptz) + make_interval(secs => 60 + later * 21540) AS retry_at,
           (CAST(:users AS text[]))[1 + u % :n_users] || '@'
               || (CAST(:domains AS text[]))[1 + d % :n_domains] AS sender,
           replace((CAST(:subjects AS text[]))[1 + u % :n_subjects], '{n}',
                   (1000 + g % 98999)::text) AS subject,
           1 + (CASE WHEN r2 < 0.25 THEN 1 ELSE 0 END) + (CASE WHEN r2 < 0.08 THEN 1 ELSE 0 END)
               AS n_rcpt,
           (CAST(:users AS text[]))[1 + (pick + 7) % :n_users] || '@'
               || (CAST(:domains AS text[]))[1 + (pick / 7 + 1) % :n_domains] AS first_rcpt,
           1 + pick % 6 AS tries, pick
    FROM (
        SELECT g, random() AS s, random() AS age, random() AS later, random() AS r2,
               floor(random() * 100000)::int AS u, floor(random() * 100000)::int AS d,
               floor(random() * 100000)::int AS pick
        FROM generate_series(CAST(:first AS bigint), CAST(:last AS bigint)) AS g
    ) AS raw
),
rcpts AS MATERIALIZED (
    SELECT draws.*, n,
           (CAST(:users AS text[]))[1 + (pick + n * 7) % :n_users] || '@'
               || (CAST(:domains AS text[]))[1 + (pick / 7 + n) % :n_domains] AS address,
           (CAST(:domains AS text[]))[1 + (pick / 7 + n) % :n_domains] AS domain,
           CASE WHEN state = 'failed' THEN 'failed'
                WHEN state = 'deferred' OR (state = 'held' AND pick % 2 = 0) THEN 'deferred'
                ELSE 'pending' END AS r_status,
           1 + (pick + n) % :n_temp AS temp_i, 1 + (pick + n) % :n_perm AS perm_i
    FROM draws CROSS JOIN LATERAL generate_series(1, draws.n_rcpt) AS n
),
messages_in AS (
    INSERT INTO messages (id, sender, subject, size, priority, queue_state, attempts, origin,
                          created_at, updated_at, next_attempt_at, last_error)
    SELECT id, sender, subject, 420 + length(subject) + pick % 2000, 0, state,
           CASE WHEN state = 'pending' OR (state = 'held' AND pick % 2 = 1) THEN 0 ELSE tries END,
           'demo', created, created,
           CASE WHEN state = 'failed' THEN NULL
                WHEN state = 'deferred' OR (state = 'held' AND pick % 2 = 0) THEN retry_at
                ELSE created END,
           CASE WHEN state = 'failed' THEN (CAST(:perm_text AS text[]))[1 + (pick + 1) % :n_perm]
                WHEN state = 'deferred' OR (state = 'held' AND pick % 2 = 0)
                THEN replace((CAST(:temp_text AS text[]))[1 + (pick + 1) % :n_temp], '{domain}',
                             split_part(first_rcpt, '@', 2)) END
    FROM draws
    RETURNING id
),
recipients_in AS (
    INSERT INTO recipients (message_id, address, domain, status, attempts, last_error,
                            last_attempt_at, next_attempt_at)
    SELECT r.id, r.address, r.domain, r.r_status,
           CASE WHEN r.r_status = 'pending' THEN 0 ELSE r.tries END,
           CASE r.r_status WHEN 'failed' THEN (CAST(:perm_text AS text[]))[r.perm_i]
                WHEN 'deferred' THEN replace((CAST(:temp_text AS text[]))[r.temp_i], '{domain}',
                                             r.domain) END,
           CASE WHEN r.r_status = 'pending' THEN NULL ELSE r.created END,
           CASE r.r_status WHEN 'failed' THEN NULL WHEN 'deferred' THEN r.retry_at
                ELSE r.created END
    FROM rcpts AS r JOIN messages_in AS m ON m.id = r.id
),
contents_in AS (
    INSERT INTO message_contents (message_id, raw)
    SELECT m.id, convert_to(
        'From: ' || d.sender || E'\\r\\nTo: ' || d.first_rcpt || E'\\r\\nSubject: ' || d.subject
        || E'\\r\\nDate: ' || to_char(d.created, 'Dy, DD Mon YYYY HH24:MI:SS +0000')
        || E'\\r\\nMessage-ID: <' || d.id || '@demo.example>'
        || E'\\r\\nContent-Type: text/plain; charset="utf-8"\\r\\nMIME-Version: 1.0\\r\\n\\r\\n'
        || E'Hello,\\r\\n\\r\\nThis is a demo message generated by `flask demo seed`.\\r\\n',
        'UTF8')
    FROM draws AS d JOIN messages_in AS m ON m.id = d.id
)
INSERT INTO delivery_events (timestamp, event_type, message_id, sender, recipient, delivery_ip,
                             delivery_host, smtp_code, enhanced_code, threats, message, action,
                             queue_state)
SELECT * FROM (
    SELECT created AS ts, 'reception', id, sender, first_rcpt, NULL::text, NULL::text,
           NULL::int, NULL::text, CAST('[]' AS json), 'Message accepted (demo)', 'queued', 'pending'
    FROM draws
    UNION ALL
    SELECT LEAST(created + make_interval(secs => 60 + pick % 900), CAST(:now AS timestamptz)),
           CASE r_status WHEN 'failed' THEN 'rejection' ELSE 'tempfail' END, id, sender, address,
           '192.0.2.' || (1 + pick % 254), 'mx.' || domain,
           CASE r_status WHEN 'failed' THEN (CAST(:perm_codes AS int[]))[perm_i]
                ELSE (CAST(:temp_codes AS int[]))[temp_i] END,
           CASE r_status WHEN 'failed' THEN (CAST(:perm_enh AS text[]))[perm_i]
                ELSE (CAST(:temp_enh AS text[]))[temp_i] END,
           CAST('[]' AS json),
           CASE r_status WHEN 'failed' THEN (CAST(:perm_text AS text[]))[perm_i]
                ELSE replace((CAST(:temp_text AS text[]))[temp_i], '{domain}', domain) END,
           CASE r_status WHEN 'failed' THEN 'failed' ELSE 'deferred' END,
           CASE r_status WHEN 'failed' THEN 'failed' ELSE 'deferred' END
    FROM rcpts WHERE r_status <> 'pending'
) AS events
ORDER BY 1
""")


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
        "tag": _run_tag(None), "now": now, "spread": spread_hours * 3600 - 30,
        "users": USERS, "n_users": len(USERS), "domains": DOMAINS, "n_domains": len(DOMAINS),
        "subjects": SUBJECTS, "n_subjects": len(SUBJECTS),
        "temp_codes": [e[0] for e in TEMP_ERRORS], "temp_enh": [e[1] for e in TEMP_ERRORS],
        "temp_text": [e[2] for e in TEMP_ERRORS], "n_temp": len(TEMP_ERRORS),
        "perm_codes": [e[0] for e in PERM_ERRORS], "perm_enh": [e[1] for e in PERM_ERRORS],
        "perm_text": [e[2] for e in PERM_ERRORS], "n_perm": len(PERM_ERRORS),
        **{k: cuts[k] for k in ("cut_pending", "cut_deferred", "cut_held")},
    }
    before = counters.queue_counts(session)
    for first in range(1, count + 1, CHUNK):
        last = min(count, first + CHUNK - 1)
        session.execute(_STATEMENT, params | {"first": first, "last": last})
        session.commit()
        if progress:
            progress(last, count)
    rebuild_rollup(session, now - dt.timedelta(hours=spread_hours + 1), now)
    session.commit()
    counters.fold_deltas(session)
    session.execute(sa.text("ANALYZE messages"))
    session.execute(sa.text("ANALYZE recipients"))
    session.execute(sa.text("ANALYZE delivery_events"))
    session.commit()
    after = counters.queue_counts(session)
    return {state: after[state] - before[state] for state in STATE_WEIGHTS}

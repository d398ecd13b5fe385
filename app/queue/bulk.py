"""The queue's bulk entry: messages inserted as they stand, for demo data and benchmarks.

``accept_message`` is how mail enters the queue: fresh, pending, now. Demo data and benchmark
fixtures need a queue as it looks after days of traffic (messages in every state, backdated,
with attempts and errors), thousands at a time. These functions are the one other way into the
``messages``, ``recipients`` and ``message_contents`` tables, set-based and without checks:
nothing a client sends ever reaches them (``flask demo seed`` and ``bench/`` call them).
The counting triggers see these rows like any others.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
import sqlalchemy.orm as so

from ..models import Message, MessageContent, Recipient
from . import shape
from .locking import lock_in_id_order, locks_rows


def accept_bulk(session: so.Session, messages: Sequence[Mapping[str, Any]],
                recipients: Sequence[Mapping[str, Any]],
                contents: Sequence[Mapping[str, Any]]) -> None:
    """Insert rows of ``messages``, ``recipients`` and ``message_contents`` (column -> value,
    states as ``QueueState``/``RecipientStatus`` words) with multi-row INSERTs; no events (the
    caller writes the history it wants), no commit."""
    if messages:
        session.execute(sa.insert(Message), list(messages))
    if recipients:
        session.execute(sa.insert(Recipient), list(recipients))
    if contents:
        session.execute(sa.insert(MessageContent), list(contents))
    if messages:
        shape.arriving(session, Message.id.in_([m["id"] for m in messages]))


def generate_postgresql(session: so.Session, params: Mapping[str, Any]) -> None:
    """Generate the messages ``first..last`` in the server, from the vocabulary in ``params``
    (see ``_GENERATE``'s parameters; ``app/demo/bulk.py`` fills them); no commit.

    One statement draws every random value once in a materialised CTE and fills messages,
    recipients, contents and events from it (data-modifying CTEs; recipients are taken from the
    messages' RETURNING, so their foreign key is satisfied). The shape is the demo's Python
    path's: every queue state by its share, one to three recipients, a ``reception`` event and,
    for messages that were tried, the last outcome of each recipient, with action and
    queue_state filled.
    """
    session.execute(_GENERATE, dict(params))
    # The ids of this call: fixed-width hex after the run's prefix, so a range is exactly them.
    stem = f"{params['id_prefix']}b{params['tag']}"
    shape.arriving(session, Message.id.between(f"{stem}{int(params['first']):010x}",
                                               f"{stem}{int(params['last']):010x}"))


_GENERATE = sa.text("""
WITH draws AS MATERIALIZED (
    SELECT g,
           :id_prefix || 'b' || :tag || lpad(to_hex(g), 10, '0') AS id,
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
           1 + pick % 6 AS tries, pick,
           -- The last attempt: its event's time and its recipients' last_attempt_at.
           LEAST(CAST(:now AS timestamptz) - make_interval(secs => 30 + age * :spread)
                     + make_interval(secs => 60 + pick % 900),
                 CAST(:now AS timestamptz)) AS last_try
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
           'demo', created,
           CASE WHEN state = 'pending' OR (state = 'held' AND pick % 2 = 1) THEN created
                ELSE last_try END,
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
           CASE WHEN r.r_status = 'pending' THEN NULL ELSE r.last_try END,
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
                             queue_state, failure_class, domain)
SELECT * FROM (
    SELECT created AS ts, 'reception', id, sender, first_rcpt, NULL::text, NULL::text,
           NULL::int, NULL::text, CAST('[]' AS json), 'Message accepted (demo)', 'queued',
           'pending', NULL::text, NULL::text
    FROM draws
    UNION ALL
    SELECT last_try,
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
           CASE r_status WHEN 'failed' THEN 'failed' ELSE 'deferred' END,
           CASE r_status WHEN 'failed' THEN (CAST(:perm_class AS text[]))[perm_i]
                ELSE (CAST(:temp_class AS text[]))[temp_i] END,
           domain
    FROM rcpts WHERE r_status <> 'pending'
) AS events
ORDER BY 1
""")


def delete_bulk(session: so.Session, *, origin: str, id_prefix: str, chunk: int = 10_000) -> int:
    """Delete the messages of ``origin`` whose id starts with ``id_prefix`` (recipients and
    contents go with them), ``chunk`` at a time, each chunk committed; no events (the caller
    deletes their history too). Returns how many messages were deleted.

    The other way out of the bulk entry: ``flask demo reset``. A delivery under way for one of
    them is recorded as for any deleted message (queue/outcomes.py).
    """
    total = 0
    while True:
        ids = list(session.scalars(
            sa.select(Message.id)
            .where(Message.origin == origin, Message.id.startswith(id_prefix, autoescape=True))
            .limit(chunk)))
        if not ids:
            return total
        if locks_rows(session):  # what the shape takes out is what the DELETE removes
            ids = lock_in_id_order(session, [Message.id.in_(ids)], for_delete=True)
        shape.leaving(session, Message.id.in_(ids))
        session.execute(sa.delete(Message).where(Message.id.in_(ids))
                        .execution_options(synchronize_session=False))
        session.commit()
        total += len(ids)

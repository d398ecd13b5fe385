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


_GENERATE = sa.text("""
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

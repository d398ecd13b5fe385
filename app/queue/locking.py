"""Row locks on messages in one global order, so that transactions queue up, never deadlock.

An ``UPDATE messages ... WHERE id IN (...)`` locks rows in whatever order its plan visits them:
an index scan goes by id, a bitmap heap scan by the table's physical order. Two transactions
touching overlapping sets of messages (two bulk actions, or a bulk action and the worker
recording outcomes) could then each hold a row the other waits for: PostgreSQL detects the
deadlock after ``deadlock_timeout`` (1 s) and aborts one of them (issue 18). Every writer that
locks several messages at once takes them here first, in id order; a lock it already holds
costs its later UPDATE or DELETE nothing.

SQLite needs none of this: a writer holds the whole database, and the first write takes it.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
import sqlalchemy.orm as so

from ..models import Message


def locks_rows(session: so.Session) -> bool:
    """Whether the database locks rows (PostgreSQL) rather than itself as a whole (SQLite)."""
    return session.get_bind().dialect.name == "postgresql"


def lock_in_id_order(session: so.Session, where: Sequence[sa.ColumnElement[bool]], *,
                     for_delete: bool = False) -> list[str]:
    """Lock the messages matching ``where`` in id order; returns their ids (PostgreSQL only).

    Rows that another transaction changes while we wait for them are checked against
    ``where`` again once it commits (READ COMMITTED), so what is returned still matches.
    ``FOR NO KEY UPDATE`` is the lock an UPDATE of a message takes; a DELETE needs
    ``FOR UPDATE``.
    """
    stmt = (sa.select(Message.id).where(*where).order_by(Message.id)
            .with_for_update(key_share=not for_delete))
    return list(session.scalars(stmt))

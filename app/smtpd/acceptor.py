"""Queueing accepted messages with group commit.

Messages whose DATA completes while the database is busy with earlier ones are queued
together, in one transaction: one multi-row INSERT per table and one commit (one fsync on
PostgreSQL) for the lot, through the queue's ``add_messages`` service. Each client still gets
its 250 only after the commit that made its message durable. If that transaction fails, its
messages are retried one by one, so one bad message never costs the others; a message that
fails alone is answered 451.

A batch is never held back to wait for more: it is whatever arrived while the previous one
was being written, so a lone message is committed at once.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import sqlalchemy as sa
import sqlalchemy.orm as so
from flask import Flask

from ..database import unit_of_work
from ..dkim.signing import ACTIVE_KEYS, remember_active_keys
from ..models import Rule
from ..queue.accepting import HOLD_DEFER_RULES
from ..queue.service import NewMessage, add_messages
from ..rawselect import RawSelect
from ..timeutil import utcnow
from .stamping import Trace
from .storage import Storage, prepare_message

log = logging.getLogger("elemta.smtpd")

MAX_BATCH = 64
MAX_BATCH_BYTES = 16 * 1024 * 1024  # a message alone may be larger; it then goes alone
# One batch at a time, on both databases. SQLite has a single writer anyway; on PostgreSQL a
# second concurrent batch overlapped the commits but halved the batches, and the listener is
# bound by its CPU (one process, the GIL): one writer took 15 % less listener CPU and 25 % less
# database CPU a message, and 11-18 % more messages a second (docs/PERFORMANCE.md, "Intake,
# one group commit at a time"). Under load a batch simply grows (up to MAX_BATCH).
WRITERS = 1


@dataclass(frozen=True)
class Job:
    sender: str
    recipients: tuple[str, ...]
    raw: bytes
    trace: Trace

    def prepare(self, session: so.Session) -> NewMessage:
        return prepare_message(session, sender=self.sender, recipients=self.recipients,
                               raw=self.raw, trace=self.trace)


def accept_batch(app: Flask, jobs: Sequence[Job]) -> list[str | Exception]:
    """Queue every job in one transaction; on failure, each in its own. Runs in a thread.

    Returns, per job, its queue id or the exception that kept it out of the queue.
    """
    if len(jobs) > 1:
        try:
            return list(_in_one_transaction(app, jobs))
        except Exception:
            log.warning("A batch of %d messages failed; queueing them one by one", len(jobs),
                        exc_info=True)
    results: list[str | Exception] = []
    for job in jobs:
        try:
            results.append(_in_one_transaction(app, [job])[0])
        except Exception as exc:
            results.append(exc)
    return results


def _in_one_transaction(app: Flask, jobs: Sequence[Job]) -> list[str]:
    """Stamp and sign every job's message, add them all with one multi-row INSERT per table,
    then commit once."""
    with unit_of_work(app) as session:
        rules = _read_keys_and_rules(session)
        return add_messages(session, [job.prepare(session) for job in jobs], rules=rules)


class _RuleRow(NamedTuple):
    """A row of ``HOLD_DEFER_RULES`` (the fields ``rulebook.first_match`` reads)."""

    id: int
    sender: str | None
    recipient: str | None
    domain: str | None
    action: str
    expires_at: dt.datetime


# The batch's two reads, the DKIM keys that sign and the hold/defer rules in force, as one
# statement on PostgreSQL: one round trip and one execution a batch instead of two each
# (docs/PERFORMANCE.md, "Intake, the new connection's costs"). A row is a key ("k": domain,
# selector, algorithm, private key) or a rule ("r": sender, recipient, domain, action), as
# text (a UNION needs one type a column), then a rule's id and expiry (NULL for a key); the
# keys first, the rules by id as HOLD_DEFER_RULES orders them.
_KEYS_AND_RULES: sa.CompoundSelect = sa.union_all(
    ACTIVE_KEYS.with_only_columns(
        sa.literal("k").label("kind"),
        *[sa.cast(column, sa.Text) for column in ACTIVE_KEYS.selected_columns],
        sa.cast(sa.null(), Rule.__table__.c.id.type).label("rule_id"),
        sa.cast(sa.null(), Rule.__table__.c.expires_at.type).label("expires_at")),
    HOLD_DEFER_RULES.with_only_columns(
        sa.literal("r").label("kind"),
        sa.cast(Rule.__table__.c.sender, sa.Text), sa.cast(Rule.__table__.c.recipient, sa.Text),
        sa.cast(Rule.__table__.c.domain, sa.Text), sa.cast(Rule.__table__.c.action, sa.Text),
        Rule.__table__.c.id,
        Rule.__table__.c.expires_at).order_by(None),
).order_by(sa.literal_column("1"), sa.literal_column("6"))
_KEYS_AND_RULES_READ = RawSelect(_KEYS_AND_RULES)


def _read_keys_and_rules(session: so.Session) -> list[_RuleRow] | None:
    """On PostgreSQL: read the DKIM keys (kept for the signing, ``remember_active_keys``)
    and the rules in force (returned, for ``add_messages``) in one statement. Elsewhere None:
    each is read where it is needed, as before."""
    connection = session.connection()
    if connection.dialect.name != "postgresql":
        return None
    keys: list[tuple[str, str, str, str]] = []
    rules: list[_RuleRow] = []
    for row in _KEYS_AND_RULES_READ.rows(connection, {"now": utcnow()}):
        if row[0] == "k":
            keys.append((row[1], row[2], row[3], row[4]))
        else:
            rules.append(_RuleRow(row[5], row[1], row[2], row[3], row[4], row[6]))
    remember_active_keys(session, keys)
    return rules


class Acceptor:
    """Collects jobs from the sessions and writes them in batches on the storage threads."""

    def __init__(self, app: Flask, storage: Storage) -> None:
        self.app = app
        self.storage = storage
        self._queue: asyncio.Queue[tuple[Job, asyncio.Future[str]]] = asyncio.Queue()
        self._writers: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._writers = [asyncio.create_task(self._write_batches(), name=f"smtpd-writer-{n}")
                         for n in range(WRITERS)]

    async def stop(self) -> None:
        for task in self._writers:
            task.cancel()
        await asyncio.gather(*self._writers, return_exceptions=True)
        while not self._queue.empty():  # nobody waits for these any more
            _job, future = self._queue.get_nowait()
            if not future.done():
                future.set_exception(RuntimeError("listener stopped"))

    async def submit(self, job: Job) -> str:
        """The queue id once the message is committed; raises when it could not be queued."""
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        await self._queue.put((job, future))
        return await future

    async def _write_batches(self) -> None:
        carried: list[tuple[Job, asyncio.Future[str]]] = []
        while True:
            batch = carried or [await self._queue.get()]
            carried = []
            size = len(batch[0][0].raw)
            while len(batch) < MAX_BATCH and not self._queue.empty():
                item = self._queue.get_nowait()
                size += len(item[0].raw)
                if size > MAX_BATCH_BYTES:  # big messages: keep transactions (and INSERTs) sane
                    carried = [item]
                    break
                batch.append(item)
            try:
                results: list[Any] = await self.storage.run_plain(
                    accept_batch, self.app, [job for job, _ in batch])
            except Exception as exc:  # e.g. the thread pool is shutting down
                results = [exc] * len(batch)
            for (_job, future), result in zip(batch, results, strict=True):
                if future.done():  # the session went away meanwhile
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)

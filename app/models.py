"""The data model: SQLAlchemy 2.0 typed models, one metadata naming convention.

Time columns are ``UTCDateTime`` (aware UTC everywhere). Big append-only tables use
``BigID``: BIGINT on PostgreSQL, INTEGER (the rowid alias) on SQLite.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
import sqlalchemy.orm as so

from .extensions import db
from .queue.states import QueueState, RecipientStatus
from .sqltypes import UTCDateTime

BigID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

# Queue states of a message (SPEC 2.1) and states of one recipient.
QUEUE_STATES: tuple[str, ...] = tuple(state.value for state in QueueState)
RECIPIENT_STATES: tuple[str, ...] = tuple(status.value for status in RecipientStatus)

# Delivery event types (SPEC 4.2); the ones that are delivery outcomes map to a stats outcome.
EVENT_TYPES = ("reception", "delivery", "tempfail", "rejection", "system")
OUTCOME_OF_EVENT = {"delivery": "delivered", "tempfail": "deferred", "rejection": "failed"}
OUTCOMES = ("delivered", "failed", "deferred")


class Message(db.Model):
    """A queued message: envelope, summary fields and its queue state."""

    __tablename__ = "messages"

    id: so.Mapped[str] = so.mapped_column(sa.String(64), primary_key=True)
    sender: so.Mapped[str] = so.mapped_column(sa.String(320))  # "" is the null sender <>
    subject: so.Mapped[str] = so.mapped_column(sa.String(998), default="")
    size: so.Mapped[int] = so.mapped_column(sa.Integer)
    priority: so.Mapped[int] = so.mapped_column(sa.SmallInteger, default=0)
    queue_state: so.Mapped[str] = so.mapped_column(sa.String(16))
    attempts: so.Mapped[int] = so.mapped_column(sa.Integer, default=0)
    origin: so.Mapped[str] = so.mapped_column(sa.String(16))  # smtp | api | bounce | demo
    created_at: so.Mapped[dt.datetime] = so.mapped_column(UTCDateTime)
    updated_at: so.Mapped[dt.datetime] = so.mapped_column(UTCDateTime)
    next_attempt_at: so.Mapped[dt.datetime | None] = so.mapped_column(UTCDateTime)
    last_error: so.Mapped[str | None] = so.mapped_column(sa.Text)

    recipients: so.Mapped[list[Recipient]] = so.relationship(
        back_populates="message",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="Recipient.id",
    )
    content: so.Mapped[MessageContent] = so.relationship(
        cascade="all, delete-orphan", passive_deletes=True
    )

    __table_args__ = (
        # Keyset paging per queue and over all queues (SPEC 2.2, oldest first).
        sa.Index("ix_messages_queue_state_created", "queue_state", "created_at", "id"),
        sa.Index("ix_messages_created", "created_at", "id"),
        # Claims of deferred mail: only the due part of the range is read (queue/leases.py).
        sa.Index("ix_messages_queue_state_due", "queue_state", "next_attempt_at", "id"),
        sa.CheckConstraint(
            "queue_state IN ('pending', 'deferred', 'held', 'failed')", name="queue_state"
        ),
    )


class Recipient(db.Model):
    """One envelope recipient of a message; delivery state is kept per recipient."""

    __tablename__ = "recipients"

    id: so.Mapped[int] = so.mapped_column(BigID, primary_key=True, autoincrement=True)
    message_id: so.Mapped[str] = so.mapped_column(
        sa.ForeignKey("messages.id", ondelete="CASCADE")
    )
    address: so.Mapped[str] = so.mapped_column(sa.String(320))
    domain: so.Mapped[str] = so.mapped_column(sa.String(255))  # lower case
    status: so.Mapped[str] = so.mapped_column(sa.String(16))
    attempts: so.Mapped[int] = so.mapped_column(sa.Integer, default=0)
    last_error: so.Mapped[str | None] = so.mapped_column(sa.Text)
    last_attempt_at: so.Mapped[dt.datetime | None] = so.mapped_column(UTCDateTime)
    next_attempt_at: so.Mapped[dt.datetime | None] = so.mapped_column(UTCDateTime)
    # A worker's claim: who holds it and until when (SPEC 10).
    lease_owner: so.Mapped[str | None] = so.mapped_column(sa.String(128))
    lease_expires_at: so.Mapped[dt.datetime | None] = so.mapped_column(UTCDateTime)

    message: so.Mapped[Message] = so.relationship(back_populates="recipients")

    __table_args__ = (
        sa.Index("ix_recipients_message_id", "message_id"),
        sa.Index("ix_recipients_domain", "domain", "message_id"),
        # The worker's claim query: due recipients by status and time.
        sa.Index("ix_recipients_due", "status", "next_attempt_at"),
        sa.CheckConstraint(
            "status IN ('pending', 'deferred', 'delivered', 'failed')", name="status"
        ),
    )


class MessageContent(db.Model):
    """The raw RFC 5322 message, kept apart so listings never load it."""

    __tablename__ = "message_contents"

    message_id: so.Mapped[str] = so.mapped_column(
        sa.ForeignKey("messages.id", ondelete="CASCADE"), primary_key=True
    )
    raw: so.Mapped[bytes] = so.mapped_column(sa.LargeBinary)


class DeliveryEvent(db.Model):
    """Append-only message history: receptions, outcomes, operator actions (SPEC 4.2).

    No foreign key to ``messages``: the history outlives the queue entry.
    """

    __tablename__ = "delivery_events"

    id: so.Mapped[int] = so.mapped_column(BigID, primary_key=True, autoincrement=True)
    timestamp: so.Mapped[dt.datetime] = so.mapped_column(UTCDateTime)
    event_type: so.Mapped[str] = so.mapped_column(sa.String(16))
    message_id: so.Mapped[str | None] = so.mapped_column(sa.String(64))
    sender: so.Mapped[str | None] = so.mapped_column(sa.String(320))
    recipient: so.Mapped[str | None] = so.mapped_column(sa.String(320))
    delivery_ip: so.Mapped[str | None] = so.mapped_column(sa.String(64))
    delivery_host: so.Mapped[str | None] = so.mapped_column(sa.String(255))
    smtp_code: so.Mapped[int | None] = so.mapped_column(sa.SmallInteger)
    enhanced_code: so.Mapped[str | None] = so.mapped_column(sa.String(16))
    spam_score: so.Mapped[float | None] = so.mapped_column(sa.Float)
    threats: so.Mapped[list[Any]] = so.mapped_column(sa.JSON, default=list)
    message: so.Mapped[str | None] = so.mapped_column(sa.Text)
    # What happened to the queue entry (queued, deferred, delivered, failed, deleted, held,
    # released, retried, flushed, purged) and the message's queue state after it (None when it
    # left the queue): the structured form the live queue stream sends.
    action: so.Mapped[str | None] = so.mapped_column(sa.String(16))
    queue_state: so.Mapped[str | None] = so.mapped_column(sa.String(16))

    __table_args__ = (
        # Newest-first listings are ORDER BY id DESC, filtered by one of these.
        sa.Index("ix_delivery_events_type_id", "event_type", "id"),
        sa.Index("ix_delivery_events_message_id", "message_id", "id"),
        sa.Index("ix_delivery_events_recipient", "recipient", "id"),
        sa.Index("ix_delivery_events_timestamp", "timestamp"),
        sa.CheckConstraint(
            "event_type IN ('reception', 'delivery', 'tempfail', 'rejection', 'system')",
            name="event_type",
        ),
    )


class DeliveryRollup(db.Model):
    """Outcome counts per clock hour, kept in step with the events (SPEC 3)."""

    __tablename__ = "delivery_rollup"

    hour: so.Mapped[dt.datetime] = so.mapped_column(UTCDateTime, primary_key=True)
    outcome: so.Mapped[str] = so.mapped_column(sa.String(16), primary_key=True)
    count: so.Mapped[int] = so.mapped_column(sa.BigInteger, default=0)


class QueueCount(db.Model):
    """Folded message counts per queue state.

    Database triggers append +1/-1 rows to ``queue_count_deltas`` on every change of
    ``messages.queue_state``; ``queue.counters`` folds them in here. Reading the stats is then
    a sum over a handful of rows whatever the size of the queue, and writers never contend
    on a hot counter row.
    """

    __tablename__ = "queue_counts"

    state: so.Mapped[str] = so.mapped_column(sa.String(16), primary_key=True)
    n: so.Mapped[int] = so.mapped_column(sa.BigInteger, default=0)


class QueueCountDelta(db.Model):
    """Not yet folded changes of the queue counts (written by triggers only)."""

    __tablename__ = "queue_count_deltas"

    id: so.Mapped[int] = so.mapped_column(BigID, primary_key=True, autoincrement=True)
    state: so.Mapped[str] = so.mapped_column(sa.String(16))
    delta: so.Mapped[int] = so.mapped_column(sa.BigInteger)


class SystemLog(db.Model):
    """A log record of any Elemta process (SPEC 4.1)."""

    __tablename__ = "system_logs"

    id: so.Mapped[int] = so.mapped_column(BigID, primary_key=True, autoincrement=True)
    timestamp: so.Mapped[dt.datetime] = so.mapped_column(UTCDateTime)
    levelno: so.Mapped[int] = so.mapped_column(sa.SmallInteger)
    level: so.Mapped[str] = so.mapped_column(sa.String(8))
    logger: so.Mapped[str] = so.mapped_column(sa.String(255))
    message: so.Mapped[str] = so.mapped_column(sa.Text)
    process: so.Mapped[str] = so.mapped_column(sa.String(64))

    __table_args__ = (
        sa.Index("ix_system_logs_levelno_id", "levelno", "id"),
        sa.Index("ix_system_logs_timestamp", "timestamp"),
    )


class ApiKey(db.Model):
    """An API key: only its SHA-256 and a display prefix are stored (SPEC 8)."""

    __tablename__ = "api_keys"

    id: so.Mapped[int] = so.mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    name: so.Mapped[str] = so.mapped_column(sa.String(100), unique=True)
    prefix: so.Mapped[str] = so.mapped_column(sa.String(16))
    key_hash: so.Mapped[str] = so.mapped_column(sa.String(64), unique=True)
    role: so.Mapped[str] = so.mapped_column(sa.String(8))
    created_at: so.Mapped[dt.datetime] = so.mapped_column(UTCDateTime)
    expires_at: so.Mapped[dt.datetime | None] = so.mapped_column(UTCDateTime)
    revoked: so.Mapped[bool] = so.mapped_column(sa.Boolean, default=False)
    last_used_at: so.Mapped[dt.datetime | None] = so.mapped_column(UTCDateTime)

    __table_args__ = (sa.CheckConstraint("role IN ('read', 'send', 'admin')", name="role"),)


class WorkerHeartbeat(db.Model):
    """Liveness of each delivery worker process, read by /api/health."""

    __tablename__ = "worker_heartbeats"

    worker_id: so.Mapped[str] = so.mapped_column(sa.String(128), primary_key=True)
    hostname: so.Mapped[str] = so.mapped_column(sa.String(255))
    pid: so.Mapped[int] = so.mapped_column(sa.Integer)
    started_at: so.Mapped[dt.datetime] = so.mapped_column(UTCDateTime)
    last_heartbeat: so.Mapped[dt.datetime] = so.mapped_column(UTCDateTime)


class DkimKey(db.Model):
    """A DKIM signing key of one (domain, selector) (docs/DKIM.md).

    ``state``: ``active`` keys sign, ``standby`` keys are published and wait for the switch,
    ``retired`` keys never sign again. The private half is deferred: listings never load it.
    """

    __tablename__ = "dkim_keys"

    id: so.Mapped[int] = so.mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    domain: so.Mapped[str] = so.mapped_column(sa.String(253))  # lower case, A-labels
    selector: so.Mapped[str] = so.mapped_column(sa.String(63))
    algorithm: so.Mapped[str] = so.mapped_column(sa.String(8))  # rsa | ed25519
    state: so.Mapped[str] = so.mapped_column(sa.String(8))
    # RSA: PKCS#1 PEM; Ed25519: the base64 32-byte seed (dkimpy's formats).
    private_key: so.Mapped[str] = so.mapped_column(sa.Text, deferred=True)
    public_key: so.Mapped[str] = so.mapped_column(sa.Text)  # the p= value of the DNS record
    created_at: so.Mapped[dt.datetime] = so.mapped_column(UTCDateTime)
    activated_at: so.Mapped[dt.datetime | None] = so.mapped_column(UTCDateTime)
    retired_at: so.Mapped[dt.datetime | None] = so.mapped_column(UTCDateTime)

    __table_args__ = (
        sa.UniqueConstraint("domain", "selector", name="uq_dkim_keys_domain_selector"),
        sa.Index("ix_dkim_keys_domain_state", "domain", "state"),
        # One active key per (domain, algorithm), even under concurrent creation.
        sa.Index("uq_dkim_keys_active", "domain", "algorithm", unique=True,
                 sqlite_where=sa.text("state = 'active'"),
                 postgresql_where=sa.text("state = 'active'")),
        sa.CheckConstraint("algorithm IN ('rsa', 'ed25519')", name="algorithm"),
        sa.CheckConstraint("state IN ('active', 'standby', 'retired')", name="state"),
    )

"""The data model: SQLAlchemy 2.0 typed models, one metadata naming convention.

Time columns are ``UTCDateTime`` (aware UTC everywhere). Big append-only tables use
``BigID``: BIGINT on PostgreSQL, INTEGER (the rowid alias) on SQLite.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
import sqlalchemy.orm as so

from .extensions import Base
from .queue.states import QueueState, RecipientStatus
from .sqltypes import UTCDateTime

BigID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

# Queue states of a message (API.md §2.1) and states of one recipient.
QUEUE_STATES: tuple[str, ...] = tuple(state.value for state in QueueState)
RECIPIENT_STATES: tuple[str, ...] = tuple(status.value for status in RecipientStatus)

# Delivery event types (API.md §4.2); the ones that are delivery outcomes map to a stats outcome.
EVENT_TYPES = ("reception", "delivery", "tempfail", "rejection", "system")
OUTCOME_OF_EVENT = {"delivery": "delivered", "tempfail": "deferred", "rejection": "failed"}
OUTCOMES = ("delivered", "failed", "deferred")
# The failure events (deferred and failed outcomes), as SQL text: the predicate of the partial
# index of a domain's errors, which the query must repeat literally.
ERROR_EVENTS_SQL = "event_type IN ('tempfail', 'rejection')"


class Message(Base):
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

    # Not a column: the message's events, newest first, set by queue.reading.message_detail for
    # the detail view. __allow_unmapped__ lets a plain annotation (no Mapped[]) declare it.
    __allow_unmapped__ = True
    timeline: list[DeliveryEvent]

    __table_args__ = (
        # Keyset paging per queue and over all queues (API.md §2.2, oldest first).
        sa.Index("ix_messages_queue_state_created", "queue_state", "created_at", "id"),
        sa.Index("ix_messages_created", "created_at", "id"),
        # Claims of deferred mail: only the due part of the range is read (queue/leases.py).
        sa.Index("ix_messages_queue_state_due", "queue_state", "next_attempt_at", "id"),
        sa.CheckConstraint(
            "queue_state IN ('pending', 'deferred', 'held', 'failed')", name="queue_state"
        ),
    )


class Recipient(Base):
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
    # A worker's claim: who holds it and until when (API.md §10).
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


class MessageContent(Base):
    """The raw RFC 5322 message, kept apart so listings never load it."""

    __tablename__ = "message_contents"

    message_id: so.Mapped[str] = so.mapped_column(
        sa.ForeignKey("messages.id", ondelete="CASCADE"), primary_key=True
    )
    raw: so.Mapped[bytes] = so.mapped_column(sa.LargeBinary)


class DeliveryEvent(Base):
    """Append-only message history: receptions, outcomes, operator actions (API.md §4.2).

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
    # Of tempfail and rejection events: why, in one word (stats/classify.py, docs/STATS.md).
    failure_class: so.Mapped[str | None] = so.mapped_column(sa.String(16))
    # Of delivery outcomes (events.is_outcome): the recipient's domain, lower case, and for a
    # delivery the seconds from reception (None when unknown). They feed domain_rollup.
    domain: so.Mapped[str | None] = so.mapped_column(sa.String(255))
    latency: so.Mapped[float | None] = so.mapped_column(sa.Float)

    __table_args__ = (
        # Newest-first listings are ORDER BY id DESC, filtered by one of these.
        sa.Index("ix_delivery_events_type_id", "event_type", "id"),
        sa.Index("ix_delivery_events_message_id", "message_id", "id"),
        sa.Index("ix_delivery_events_recipient", "recipient", "id"),
        sa.Index("ix_delivery_events_timestamp", "timestamp"),
        # Partial: only the failures are indexed (about a tenth of the events). The queries
        # repeat the predicate word for word (literals, never bound parameters), so that
        # PostgreSQL and SQLite can prove the index applies.
        sa.Index("ix_delivery_events_failure_class", "failure_class", "id",
                 postgresql_where=sa.text("failure_class IS NOT NULL"),
                 sqlite_where=sa.text("failure_class IS NOT NULL")),
        sa.Index("ix_delivery_events_domain_errors", "domain", "id",
                 postgresql_where=sa.text(ERROR_EVENTS_SQL),
                 sqlite_where=sa.text(ERROR_EVENTS_SQL)),
        sa.CheckConstraint(
            "event_type IN ('reception', 'delivery', 'tempfail', 'rejection', 'system')",
            name="event_type",
        ),
    )


class DeliveryRollup(Base):
    """Outcome counts per clock hour, kept in step with the events (API.md §3)."""

    __tablename__ = "delivery_rollup"

    hour: so.Mapped[dt.datetime] = so.mapped_column(UTCDateTime, primary_key=True)
    outcome: so.Mapped[str] = so.mapped_column(sa.String(16), primary_key=True)
    count: so.Mapped[int] = so.mapped_column(sa.BigInteger, default=0)


class DomainRollup(Base):
    """Outcome counts per recipient domain, per hour, day, ISO week and month (docs/STATS.md).

    One row per (grain, start, domain, outcome, failure class, latency bucket): failures carry
    their class (``""`` for deliveries), deliveries their latency bucket (``-1`` for failures
    and unknown latencies, stats/latency.py). Bumped with the hourly rollup, in the same
    transaction as the event; each time scale reads the rows of its own grain, so a window
    reads its buckets' rows only (24 hours, 30 days, 12 weeks, 12 months).
    """

    __tablename__ = "domain_rollup"

    grain: so.Mapped[str] = so.mapped_column(sa.String(8), primary_key=True)
    start: so.Mapped[dt.datetime] = so.mapped_column(UTCDateTime, primary_key=True)
    domain: so.Mapped[str] = so.mapped_column(sa.String(255), primary_key=True)
    outcome: so.Mapped[str] = so.mapped_column(sa.String(16), primary_key=True)
    failure_class: so.Mapped[str] = so.mapped_column(sa.String(16), primary_key=True)
    latency_bucket: so.Mapped[int] = so.mapped_column(sa.SmallInteger, primary_key=True)
    count: so.Mapped[int] = so.mapped_column(sa.BigInteger, default=0)

    __table_args__ = (
        # One domain's buckets (GET /api/stats/delivery?domain=D).
        sa.Index("ix_domain_rollup_domain", "domain", "grain", "start"),
        sa.CheckConstraint("grain IN ('hour', 'day', 'week', 'month')", name="grain"),
    )


class QueueCount(Base):
    """Folded message counts per queue state.

    Database triggers append +1/-1 rows to ``queue_count_deltas`` on every change of
    ``messages.queue_state``; ``queue.counters`` folds them in here. Reading the stats is then
    a sum over a handful of rows whatever the size of the queue, and writers never contend
    on a hot counter row.
    """

    __tablename__ = "queue_counts"

    state: so.Mapped[str] = so.mapped_column(sa.String(16), primary_key=True)
    n: so.Mapped[int] = so.mapped_column(sa.BigInteger, default=0)


class QueueCountDelta(Base):
    """Not yet folded changes of the queue counts (written by triggers only)."""

    __tablename__ = "queue_count_deltas"

    id: so.Mapped[int] = so.mapped_column(BigID, primary_key=True, autoincrement=True)
    state: so.Mapped[str] = so.mapped_column(sa.String(16))
    delta: so.Mapped[int] = so.mapped_column(sa.BigInteger)


# What the queue shape counts (docs/QUEUE_SHAPE.md): recipients not yet delivered, by their
# domain; messages, by their sender's domain.
SHAPE_KINDS = ("domain", "sender_domain")


class QueueShapeCount(Base):
    """Folded queue-shape counts: queued mail per (kind, queue state, domain, arrival minute).

    ``minute`` is the arrival (``messages.created_at``) in whole minutes since the epoch, or 0
    for "arrived long enough ago to be in the oldest age bucket for good". The queue writes
    ``queue_shape_deltas`` in the transactions that change the counted rows; ``queue.shape``
    folds them in here.
    """

    __tablename__ = "queue_shape_counts"

    kind: so.Mapped[str] = so.mapped_column(sa.String(16), primary_key=True)
    state: so.Mapped[str] = so.mapped_column(sa.String(16), primary_key=True)
    domain: so.Mapped[str] = so.mapped_column(sa.String(320), primary_key=True)
    minute: so.Mapped[int] = so.mapped_column(sa.BigInteger, primary_key=True)
    n: so.Mapped[int] = so.mapped_column(sa.BigInteger)


class QueueShapeDelta(Base):
    """Not yet folded changes of the queue-shape counts (written by ``queue.shape`` only)."""

    __tablename__ = "queue_shape_deltas"

    id: so.Mapped[int] = so.mapped_column(BigID, primary_key=True, autoincrement=True)
    kind: so.Mapped[str] = so.mapped_column(sa.String(16))
    state: so.Mapped[str] = so.mapped_column(sa.String(16))
    domain: so.Mapped[str] = so.mapped_column(sa.String(320))
    minute: so.Mapped[int] = so.mapped_column(sa.BigInteger)
    delta: so.Mapped[int] = so.mapped_column(sa.BigInteger)


class SystemLog(Base):
    """A log record of any Elemta process (API.md §4.1)."""

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


class ApiKey(Base):
    """An API key: only its SHA-256 and a display prefix are stored (API.md §8)."""

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


class WorkerHeartbeat(Base):
    """Liveness of each delivery worker process, read by /api/health."""

    __tablename__ = "worker_heartbeats"

    worker_id: so.Mapped[str] = so.mapped_column(sa.String(128), primary_key=True)
    hostname: so.Mapped[str] = so.mapped_column(sa.String(255))
    pid: so.Mapped[int] = so.mapped_column(sa.Integer)
    started_at: so.Mapped[dt.datetime] = so.mapped_column(UTCDateTime)
    last_heartbeat: so.Mapped[dt.datetime] = so.mapped_column(UTCDateTime)


class DkimKey(Base):
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


# Webhook event types (docs/WEBHOOKS.md): what a receiver subscribes to.
WEBHOOK_EVENT_TYPES = ("queued", "delivered", "deferred", "failed", "bounced", "held",
                       "released", "deleted", "suppressed")
WEBHOOK_DELIVERY_STATES = ("pending", "delivered", "failed")


class Webhook(Base):
    """A receiver of signed event notifications (docs/WEBHOOKS.md).

    ``event_floor`` is the dispatcher's cursor in ``delivery_events``: every event id at or below
    it has been looked at (and queued here when it matched). The secret signs the requests; it
    must be kept in clear to sign, so it is shown at creation and never again by the API.
    """

    __tablename__ = "webhooks"

    id: so.Mapped[int] = so.mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    url: so.Mapped[str] = so.mapped_column(sa.String(2048))
    event_types: so.Mapped[list[str]] = so.mapped_column(sa.JSON)
    description: so.Mapped[str] = so.mapped_column(sa.String(200), default="")
    secret: so.Mapped[str] = so.mapped_column(sa.String(128), deferred=True)
    active: so.Mapped[bool] = so.mapped_column(sa.Boolean, default=True)
    event_floor: so.Mapped[int] = so.mapped_column(sa.BigInteger, default=0)
    created_at: so.Mapped[dt.datetime] = so.mapped_column(UTCDateTime)
    updated_at: so.Mapped[dt.datetime] = so.mapped_column(UTCDateTime)


class WebhookDelivery(Base):
    """One event to send to one webhook, until it is delivered or given up (docs/WEBHOOKS.md).

    ``payload`` is the exact body: every attempt and redelivery sends the same bytes.
    """

    __tablename__ = "webhook_deliveries"

    id: so.Mapped[int] = so.mapped_column(BigID, primary_key=True, autoincrement=True)
    webhook_id: so.Mapped[int] = so.mapped_column(
        sa.ForeignKey("webhooks.id", ondelete="CASCADE"))
    event_id: so.Mapped[int] = so.mapped_column(sa.BigInteger)  # delivery_events.id, no FK
    event_type: so.Mapped[str] = so.mapped_column(sa.String(16))
    message_id: so.Mapped[str | None] = so.mapped_column(sa.String(64))
    payload: so.Mapped[str] = so.mapped_column(sa.Text, deferred=True)
    status: so.Mapped[str] = so.mapped_column(sa.String(16))
    attempts: so.Mapped[int] = so.mapped_column(sa.Integer, default=0)
    created_at: so.Mapped[dt.datetime] = so.mapped_column(UTCDateTime)
    # Retries stop this long after the first try (or after a redelivery was asked for).
    retry_until: so.Mapped[dt.datetime] = so.mapped_column(UTCDateTime)
    next_attempt_at: so.Mapped[dt.datetime | None] = so.mapped_column(UTCDateTime)
    delivered_at: so.Mapped[dt.datetime | None] = so.mapped_column(UTCDateTime)
    last_status_code: so.Mapped[int | None] = so.mapped_column(sa.SmallInteger)
    last_error: so.Mapped[str | None] = so.mapped_column(sa.Text)

    attempt_log: so.Mapped[list[WebhookAttempt]] = so.relationship(
        cascade="all, delete-orphan", passive_deletes=True, order_by="WebhookAttempt.id")

    __table_args__ = (
        # One delivery per (webhook, event): a rescan after a crash never queues it twice.
        sa.UniqueConstraint("webhook_id", "event_id", name="uq_webhook_deliveries_event"),
        # The dispatcher's due scan, and the per-message order check.
        sa.Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
        sa.Index("ix_webhook_deliveries_message", "webhook_id", "message_id", "status", "id"),
        sa.CheckConstraint("status IN ('pending', 'delivered', 'failed')", name="status"),
    )


class WebhookAttempt(Base):
    """One HTTP request of a delivery and what the receiver answered (kept for the history)."""

    __tablename__ = "webhook_attempts"

    id: so.Mapped[int] = so.mapped_column(BigID, primary_key=True, autoincrement=True)
    delivery_id: so.Mapped[int] = so.mapped_column(
        sa.ForeignKey("webhook_deliveries.id", ondelete="CASCADE"))
    attempted_at: so.Mapped[dt.datetime] = so.mapped_column(UTCDateTime)
    status_code: so.Mapped[int | None] = so.mapped_column(sa.SmallInteger)
    error: so.Mapped[str | None] = so.mapped_column(sa.Text)
    duration_ms: so.Mapped[int] = so.mapped_column(sa.Integer)
    response_excerpt: so.Mapped[str | None] = so.mapped_column(sa.String(512))

    __table_args__ = (sa.Index("ix_webhook_attempts_delivery", "delivery_id", "id"),)


# --------------------------------------------------------------------------- delivery control
# Destination policies, their shared limits, suppressions and rules (docs/DELIVERY.md,
# "Delivery control"; app/control/ owns these tables).

POLICY_KINDS = ("default", "domain", "mx")
RULE_ACTIONS = ("hold", "defer", "bounce")


class DeliveryPolicy(Base):
    """Limits for mail to a recipient domain, to an MX host pattern, or to every destination."""

    __tablename__ = "delivery_policies"

    id: so.Mapped[int] = so.mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    kind: so.Mapped[str] = so.mapped_column(sa.String(8))  # default | domain | mx
    pattern: so.Mapped[str] = so.mapped_column(sa.String(253))  # lower case; "*" for default
    max_connections: so.Mapped[int | None] = so.mapped_column(sa.Integer)
    messages_per_connection: so.Mapped[int | None] = so.mapped_column(sa.Integer)
    messages_per_minute: so.Mapped[int | None] = so.mapped_column(sa.Integer)
    messages_per_hour: so.Mapped[int | None] = so.mapped_column(sa.Integer)
    require_tls: so.Mapped[bool] = so.mapped_column(sa.Boolean, default=False)
    created_at: so.Mapped[dt.datetime] = so.mapped_column(UTCDateTime)
    updated_at: so.Mapped[dt.datetime] = so.mapped_column(UTCDateTime)

    __table_args__ = (
        sa.UniqueConstraint("kind", "pattern", name="uq_delivery_policies_kind_pattern"),
        sa.CheckConstraint("kind IN ('default', 'domain', 'mx')", name="kind"),
    )


class ConnectionSlot(Base):
    """One of a destination's connection slots, leased by a worker while a connection is open.

    A crashed worker's slots free themselves when their lease expires."""

    __tablename__ = "connection_slots"

    key: so.Mapped[str] = so.mapped_column(sa.String(300), primary_key=True)
    slot: so.Mapped[int] = so.mapped_column(sa.Integer, primary_key=True)
    owner: so.Mapped[str] = so.mapped_column(sa.String(128))
    expires_at: so.Mapped[dt.datetime] = so.mapped_column(UTCDateTime)

    __table_args__ = (sa.Index("ix_connection_slots_owner", "owner"),)


class RateCounter(Base):
    """Messages sent to a destination in one fixed window (a minute or an hour)."""

    __tablename__ = "rate_counters"

    key: so.Mapped[str] = so.mapped_column(sa.String(300), primary_key=True)
    window: so.Mapped[str] = so.mapped_column(sa.String(8), primary_key=True)  # minute | hour
    window_start: so.Mapped[dt.datetime] = so.mapped_column(UTCDateTime, primary_key=True)
    count: so.Mapped[int] = so.mapped_column(sa.Integer)

    __table_args__ = (sa.Index("ix_rate_counters_window_start", "window_start"),)


class DestinationBackoff(Base):
    """Adaptive backoff of a destination that answered with throttling replies."""

    __tablename__ = "destination_backoff"

    key: so.Mapped[str] = so.mapped_column(sa.String(300), primary_key=True)
    level: so.Mapped[int] = so.mapped_column(sa.Integer)
    pause_until: so.Mapped[dt.datetime] = so.mapped_column(UTCDateTime)
    last_throttled_at: so.Mapped[dt.datetime] = so.mapped_column(UTCDateTime)
    last_reply: so.Mapped[str] = so.mapped_column(sa.Text)
    throttles: so.Mapped[int] = so.mapped_column(sa.Integer)


class Suppression(Base):
    """An address no mail is sent to (it does not exist, or the operator said so)."""

    __tablename__ = "suppressions"

    id: so.Mapped[int] = so.mapped_column(BigID, primary_key=True, autoincrement=True)
    address: so.Mapped[str] = so.mapped_column(sa.String(320), unique=True)  # lower case
    reason: so.Mapped[str] = so.mapped_column(sa.Text)
    source: so.Mapped[str] = so.mapped_column(sa.String(16))  # bounce | operator | import
    enhanced_code: so.Mapped[str | None] = so.mapped_column(sa.String(16))
    message_id: so.Mapped[str | None] = so.mapped_column(sa.String(64))
    created_by: so.Mapped[str] = so.mapped_column(sa.String(100))
    created_at: so.Mapped[dt.datetime] = so.mapped_column(UTCDateTime)
    expires_at: so.Mapped[dt.datetime | None] = so.mapped_column(UTCDateTime)

    __table_args__ = (
        sa.Index("ix_suppressions_created", "created_at", "id"),
        sa.CheckConstraint("source IN ('bounce', 'operator', 'import')", name="source"),
    )


class Rule(Base):
    """A queue filter and an action, applied to queued and new mail until it expires."""

    __tablename__ = "rules"

    id: so.Mapped[int] = so.mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    sender: so.Mapped[str | None] = so.mapped_column(sa.String(320))
    recipient: so.Mapped[str | None] = so.mapped_column(sa.String(320))
    domain: so.Mapped[str | None] = so.mapped_column(sa.String(253))
    action: so.Mapped[str] = so.mapped_column(sa.String(8))
    comment: so.Mapped[str] = so.mapped_column(sa.String(500), default="")
    created_by: so.Mapped[str] = so.mapped_column(sa.String(100))
    created_at: so.Mapped[dt.datetime] = so.mapped_column(UTCDateTime)
    expires_at: so.Mapped[dt.datetime] = so.mapped_column(UTCDateTime)
    queued_matches: so.Mapped[int] = so.mapped_column(sa.Integer, default=0)
    hits: so.Mapped[int] = so.mapped_column(sa.Integer, default=0)

    __table_args__ = (
        sa.Index("ix_rules_expires", "expires_at"),
        sa.CheckConstraint("action IN ('hold', 'defer', 'bounce')", name="action"),
    )

"""Why is a message still queued? Everything that decides its next step, per recipient.

A read, no change: the message and its recipients (``queue.reading``), its attempts (the
events of its timeline), the retry schedule left (the worker's own ``retry_delay``, without
its jitter) and the queue lifetime, the worker's lease, and delivery control's say (the rules
in force, the destination policy and its backoff, suppressions: ``app/control``). The
``summary`` says it in plain words (docs/QUEUE_SHAPE.md, "Why is it still here?").

The destination policy is matched by recipient domain (and the relay, when one is set): MX
host patterns need the MX names, which only the worker resolves, so they are not shown here.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
import sqlalchemy.orm as so

from ..config import parse_host_port
from ..control import limits, rulebook, suppression
from ..control.backoff import BackoffState
from ..control.policies import PolicyBook, describe, load_rows
from ..models import DeliveryEvent, DeliveryPolicy, Message, Recipient, Rule
from ..queue.reading import get_message, message_timeline
from ..queue.states import QueueState, RecipientStatus
from ..timeutil import isoformat_z, utcnow
from .outcomes import OutcomePolicy, retry_delay

ATTEMPT_EVENTS = ("delivery", "tempfail", "rejection")
MAX_PLANNED = 24  # attempts of the schedule shown at most (the last step repeats)


@dataclass(frozen=True)
class DiagnosisSettings:
    """The settings that decide a recipient's future (``ELEMTA_*``, API.md §10)."""

    retry_schedule: Sequence[int]
    max_queue_lifetime: int
    failed_retention: int
    default_connections: int
    relay: str  # ELEMTA_RELAY_HOST, "" for MX routing

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> DiagnosisSettings:
        return cls(retry_schedule=list(config["RETRY_SCHEDULE"]),
                   max_queue_lifetime=int(config["MAX_QUEUE_LIFETIME"]),
                   failed_retention=int(config["FAILED_RETENTION"]),
                   default_connections=int(config["MAX_CONNECTIONS_PER_DOMAIN"]),
                   relay=str(config["RELAY_HOST"] or ""))


@dataclass
class RecipientDiagnosis:
    address: str
    domain: str
    status: str
    attempts: list[DeliveryEvent]
    last_error: str | None
    last_attempt_at: dt.datetime | None
    next_attempt_at: dt.datetime | None
    next_attempt_in: int | None  # seconds; negative when overdue
    planned_attempts: list[dt.datetime]
    expires_at: dt.datetime
    lease: dict[str, Any] | None
    policy: dict[str, Any] | None
    backoff: dict[str, Any] | None
    rules: list[Rule]
    suppressed: dict[str, Any] | None
    summary: str = ""


@dataclass
class Diagnosis:
    message: Message
    as_of: dt.datetime
    expires_at: dt.datetime
    purge_at: dt.datetime | None
    held: dict[str, Any] | None
    recipients: list[RecipientDiagnosis] = field(default_factory=list)
    headline: str = ""  # the message's part of the summary
    summary: str = ""


def diagnose(session: so.Session, message_id: str, settings: DiagnosisSettings,
             now: dt.datetime | None = None) -> Diagnosis:
    """The diagnosis of one queued message; 404 ``MESSAGE_NOT_FOUND`` when it is not queued
    (any more: a delivered message leaves the queue, its events stay in the logs)."""
    now = now or utcnow()
    message = get_message(session, message_id)
    timeline = message_timeline(session, message.id)  # newest first
    expires_at = message.created_at + dt.timedelta(seconds=settings.max_queue_lifetime)
    purge_at = (message.updated_at + dt.timedelta(seconds=settings.failed_retention)
                if message.queue_state == QueueState.FAILED else None)
    held = _held(message, timeline)
    book = PolicyBook(load_rows(session), settings.default_connections)
    policies = {p.id: p for p in session.scalars(sa.select(DeliveryPolicy))}
    backoff = {b.key: b for b in limits.load_backoff(session)}
    in_force = rulebook.in_force(session, now)
    suppressed = suppression.active(session, [r.address for r in message.recipients], now)
    diagnosis = Diagnosis(message=message, as_of=now.replace(microsecond=0),
                          expires_at=expires_at, purge_at=purge_at, held=held)
    for recipient in message.recipients:
        attempts = [e for e in reversed(timeline) if e.event_type in ATTEMPT_EVENTS
                    and (e.recipient or "").lower() == recipient.address.lower()]
        limits_now = book.limits_for(_destination(settings, recipient.domain), recipient.domain)
        policy = policies.get(limits_now.policy_id) if limits_now.policy_id else None
        state = backoff.get(limits_now.key)
        entry = suppressed.get(suppression.normalise(recipient.address))
        item = RecipientDiagnosis(
            address=recipient.address, domain=recipient.domain, status=recipient.status,
            attempts=attempts, last_error=recipient.last_error,
            last_attempt_at=recipient.last_attempt_at,
            next_attempt_at=recipient.next_attempt_at,
            next_attempt_in=(int((recipient.next_attempt_at - now).total_seconds())
                             if recipient.next_attempt_at
                             and recipient.status in (RecipientStatus.PENDING,
                                                      RecipientStatus.DEFERRED) else None),
            planned_attempts=planned_attempts(recipient, settings, expires_at),
            expires_at=expires_at,
            lease=_lease(recipient, now),
            policy=({"id": policy.id, "kind": policy.kind, "pattern": policy.pattern,
                     "limit_key": limits_now.key, "description": describe(policy)}
                    if policy is not None else None),
            backoff=_backoff(state, now),
            rules=[rule for rule in in_force
                   if rulebook.matches(rule, message.sender, [recipient.address])],
            suppressed=({"reason": entry.reason, "source": entry.source,
                         "created_at": entry.created_at, "expires_at": entry.expires_at}
                        if entry is not None else None),
        )
        item.summary = _recipient_summary(message, item, now)
        diagnosis.recipients.append(item)
    diagnosis.headline = _headline(diagnosis, now)
    diagnosis.summary = " ".join([diagnosis.headline] + [r.summary for r in diagnosis.recipients])
    return diagnosis


def planned_attempts(recipient: Recipient, settings: DiagnosisSettings,
                     expires_at: dt.datetime) -> list[dt.datetime]:
    """When the attempts left would happen if each one failed temporarily: the next one, then
    the schedule's steps (without the +-10% jitter), the last one at the queue lifetime's end
    (``delivery.outcomes.judge``). Empty for a recipient with nothing left to try."""
    if recipient.status not in (RecipientStatus.PENDING, RecipientStatus.DEFERRED) \
            or recipient.next_attempt_at is None:
        return []
    policy = OutcomePolicy(retry_schedule=settings.retry_schedule,
                           max_queue_lifetime=settings.max_queue_lifetime, send_bounces=False,
                           reporting_mta="", jitter=0.0)
    moment = recipient.next_attempt_at
    planned = [moment]
    tried = recipient.attempts + 1
    while moment < expires_at and len(planned) < MAX_PLANNED:
        moment = min(moment + dt.timedelta(seconds=retry_delay(policy, tried)), expires_at)
        planned.append(moment)
        tried += 1
    return planned


def _destination(settings: DiagnosisSettings, domain: str) -> str:
    """The worker's destination key (``delivery.routing.Router.destination_of``)."""
    if settings.relay.strip():
        host, port = parse_host_port(settings.relay, 25)
        return f"relay:{host}:{port}"
    return domain.lower()


def _held(message: Message, timeline: Sequence[DeliveryEvent]) -> dict[str, Any] | None:
    if message.queue_state != QueueState.HELD:
        return None
    event = next((e for e in timeline if e.action == "held"), None)
    return {"since": event.timestamp if event else None,
            "reason": event.message if event else None}


def _lease(recipient: Recipient, now: dt.datetime) -> dict[str, Any] | None:
    if not recipient.lease_owner or recipient.lease_expires_at is None:
        return None
    return {"worker": recipient.lease_owner, "expires_at": recipient.lease_expires_at,
            "active": recipient.lease_expires_at > now}


def _backoff(state: Any, now: dt.datetime) -> dict[str, Any] | None:
    if state is None:
        return None
    current = BackoffState(state.key, state.level, state.pause_until, state.last_throttled_at,
                           state.last_reply, state.throttles)
    level = current.level_at(now)
    if level == 0:
        return None
    return {"level": level, "paused_until": state.pause_until if current.paused_at(now) else None,
            "last_reply": state.last_reply, "throttles": state.throttles}


# --------------------------------------------------------------------------- plain words


def in_words(seconds: float) -> str:
    """A duration, roughly: ``45 s``, ``12 min``, ``3 h 5 min``, ``4 days``."""
    seconds = abs(int(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes = seconds // 60
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    return f"{hours // 24} days"


def _when(moment: dt.datetime, now: dt.datetime) -> str:
    delta = (moment - now).total_seconds()
    relative = f"in {in_words(delta)}" if delta >= 0 else f"{in_words(delta)} ago"
    return f"{relative} at {isoformat_z(moment)}"


def _reply(event: DeliveryEvent) -> str:
    text = " ".join((event.message or "").split())
    if len(text) > 120:
        text = text[:117] + "..."
    return text or (str(event.smtp_code) if event.smtp_code else "no reply")


def _recipient_summary(message: Message, item: RecipientDiagnosis, now: dt.datetime) -> str:
    parts: list[str] = []
    failures = [e for e in item.attempts if e.event_type in ("tempfail", "rejection")]
    last = item.attempts[-1] if item.attempts else None
    host = f" by {last.delivery_host}" if last is not None and last.delivery_host else ""
    if item.status == RecipientStatus.DELIVERED:
        when = f" at {isoformat_z(last.timestamp)}" if last is not None else ""
        return f"{item.address}: delivered{host}{when}."
    if item.status == RecipientStatus.FAILED:
        reason = _reply(last) if last is not None else (item.last_error or "no reason recorded")
        parts.append(f"{item.address}: failed for good{host} ({reason}) after "
                     f"{len(item.attempts)} attempt(s)")
    elif failures:
        parts.append(f"{item.address}: deferred {len(failures)} time(s){host} "
                     f"({_reply(failures[-1])})")
    else:
        parts.append(f"{item.address}: not tried yet")
    if item.lease and item.lease["active"]:
        parts.append(f"being delivered by worker {item.lease['worker']} (lease until "
                     f"{isoformat_z(item.lease['expires_at'])})")
    elif message.queue_state == QueueState.HELD and item.status != RecipientStatus.FAILED:
        parts.append("held: no attempt until it is released")
    elif item.next_attempt_at is not None and item.status != RecipientStatus.FAILED:
        if item.next_attempt_at <= now:
            parts.append(f"due now (since {isoformat_z(item.next_attempt_at)}), waiting for a "
                         "worker")
        else:
            parts.append(f"next attempt {_when(item.next_attempt_at, now)}")
    if item.backoff is not None:
        paused = (f", paused until {isoformat_z(item.backoff['paused_until'])}"
                  if item.backoff["paused_until"] else "")
        parts.append(f"destination backed off (level {item.backoff['level']}{paused}) after "
                     f"\"{item.backoff['last_reply'][:80]}\"")
    if item.policy is not None:
        parts.append(f"destination policy {item.policy['description']}")
    for rule in item.rules:
        parts.append(f"rule {rule.id} ({rule.action}) applies until "
                     f"{isoformat_z(rule.expires_at)}")
    if item.suppressed is not None:
        parts.append(f"address suppressed ({item.suppressed['source']}: "
                     f"{item.suppressed['reason'][:80]})")
    if item.status != RecipientStatus.FAILED:
        verb = "expires" if item.expires_at > now else "expired"
        parts.append(f"{verb} {_when(item.expires_at, now)}")
    return "; ".join(parts) + "."


def _headline(diagnosis: Diagnosis, now: dt.datetime) -> str:
    message = diagnosis.message
    head = f"Message {message.id} is {message.queue_state}, queued {_when(message.created_at, now)}"
    if diagnosis.held is not None:
        head += f"; {diagnosis.held['reason'] or 'held by an operator'}"
    if diagnosis.purge_at is not None:
        head += f"; it will be purged {_when(diagnosis.purge_at, now)} (failed mail retention)"
    return head + "."

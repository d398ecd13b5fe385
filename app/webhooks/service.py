"""Webhooks: the receivers (create, change, delete, list) and their delivery history.

Every function that changes something commits; the API views and ``flask webhook`` call the
same ones. URLs are set by administrators only (docs/WEBHOOKS.md, "Security"): the checks here
refuse what can never be a webhook (other schemes, credentials in the URL, fragments), not
private addresses, since a receiver on the LAN is the common case.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import sqlalchemy as sa
import sqlalchemy.orm as so

from ..cursors import decode_cursor_payload, encode_cursor_payload
from ..errors import NotFound, ValidationFailed
from ..logs.feed import newest_ids
from ..models import WEBHOOK_EVENT_TYPES, Webhook, WebhookDelivery
from ..timeutil import utcnow
from .signing import SECRET_PREFIX, new_secret

URL_SCHEMES = ("http", "https")
MAX_URL_LENGTH = 2048
MAX_DESCRIPTION_LENGTH = 200
MIN_SECRET_LENGTH = 16
MAX_SECRET_LENGTH = 128
MAX_ID = 2**31 - 1
MAX_DELIVERY_ID = 2**63 - 1
CURSOR_VERSION = 1
DELIVERY_STATES = ("pending", "delivered", "failed")


def check_url(url: str) -> str:
    """An absolute http(s) URL with a host; no user:password (use the signature), no #."""
    problem = None
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError when the port is not a number or out of range
    except ValueError:
        parts, port, problem = None, None, "Not a valid URL."
    if parts is not None:
        if parts.scheme.lower() not in URL_SCHEMES:
            problem = "Must be an http:// or https:// URL."
        elif not parts.hostname:
            problem = "Must name a host."
        elif parts.username is not None or parts.password is not None:
            problem = "Must not carry credentials; receivers check the signature instead."
        elif parts.fragment or url.endswith("#"):
            problem = "Must not have a #fragment."
        elif len(url) > MAX_URL_LENGTH:
            problem = f"Longer than {MAX_URL_LENGTH} characters."
        elif any(ch.isspace() or ord(ch) < 32 for ch in url):
            problem = "Must not contain spaces or control characters."
        elif port == 0:
            problem = "Port 0 is not a port."
    if problem:
        raise ValidationFailed("Invalid webhook URL", {"url": [problem]})
    return url


def check_event_types(types: Iterable[str]) -> list[str]:
    wanted = list(dict.fromkeys(types))
    unknown = [t for t in wanted if t not in WEBHOOK_EVENT_TYPES]
    if unknown or not wanted:
        raise ValidationFailed("Invalid event types", {"event_types": [
            f"Must be a non-empty list of: {', '.join(WEBHOOK_EVENT_TYPES)}."]})
    # Kept in the documented order: listings read the same whatever order they were given in.
    return [t for t in WEBHOOK_EVENT_TYPES if t in wanted]


def check_secret(secret: str) -> str:
    if not MIN_SECRET_LENGTH <= len(secret) <= MAX_SECRET_LENGTH or not secret.isprintable() \
            or any(ch.isspace() for ch in secret):
        raise ValidationFailed("Invalid secret", {"secret": [(
            f"{MIN_SECRET_LENGTH} to {MAX_SECRET_LENGTH} printable characters, no spaces "
            f"(or leave it out: one is generated, {SECRET_PREFIX}...).")]})
    return secret


def check_description(description: str) -> str:
    if len(description) > MAX_DESCRIPTION_LENGTH:
        raise ValidationFailed("Invalid description", {"description": [
            f"At most {MAX_DESCRIPTION_LENGTH} characters."]})
    return description


def list_webhooks(session: so.Session) -> list[Webhook]:
    return list(session.scalars(sa.select(Webhook).order_by(Webhook.id)))


def get_webhook(session: so.Session, webhook_id: int) -> Webhook:
    webhook = session.get(Webhook, webhook_id) if 0 < webhook_id <= MAX_ID else None
    if webhook is None:
        raise NotFound(f"Webhook {webhook_id} not found")
    return webhook


@dataclass
class Created:
    webhook: Webhook
    secret: str | None  # shown once: at creation and when rotated


def create_webhook(session: so.Session, url: str, event_types: Iterable[str], *,
                   description: str = "", secret: str | None = None,
                   active: bool = True) -> Created:
    """A new receiver of the events that happen from now on (never of older ones). Commits."""
    url = check_url(url)
    types = check_event_types(event_types)
    description = check_description(description)
    secret = check_secret(secret) if secret is not None else new_secret()
    now = utcnow()
    webhook = Webhook(url=url, event_types=types, description=description, secret=secret,
                      active=active, event_floor=newest_ids(session)[0], created_at=now,
                      updated_at=now)
    session.add(webhook)
    session.commit()
    return Created(webhook, secret)


def update_webhook(session: so.Session, webhook_id: int, *, url: str | None = None,
                   event_types: Iterable[str] | None = None, description: str | None = None,
                   active: bool | None = None, secret: str | None = None,
                   rotate_secret: bool = False) -> Created:
    """Change what is given; ``rotate_secret`` (or a new ``secret``) replaces the secret and
    returns it once. Reactivated webhooks start from the events of now on. Commits."""
    if rotate_secret and secret is not None:
        raise ValidationFailed("Give a secret or ask for a new one, not both",
                               {"rotate_secret": ["Not with secret."]})
    changes: dict[str, Any] = {}
    if url is not None:
        changes["url"] = check_url(url)
    if event_types is not None:
        changes["event_types"] = check_event_types(event_types)
    if description is not None:
        changes["description"] = check_description(description)
    new = check_secret(secret) if secret is not None else new_secret() if rotate_secret else None
    webhook = get_webhook(session, webhook_id)
    if active is not None and active != webhook.active:
        changes["active"] = active
        if active:
            # A paused webhook does not catch up on what happened meanwhile (a flood of stale
            # events); what was already queued for it is still sent.
            changes["event_floor"] = newest_ids(session)[0]
    if new is not None:
        changes["secret"] = new
    for name, value in changes.items():
        setattr(webhook, name, value)
    webhook.updated_at = utcnow()
    session.commit()
    return Created(webhook, new)


def delete_webhook(session: so.Session, webhook_id: int) -> None:
    """The webhook, its queued deliveries and their history. Commits."""
    webhook = get_webhook(session, webhook_id)
    session.delete(webhook)
    session.commit()


# --------------------------------------------------------------------------- deliveries


@dataclass
class DeliveryPage:
    items: list[WebhookDelivery]
    next_cursor: str | None


def encode_cursor(delivery_id: int) -> str:
    return encode_cursor_payload([CURSOR_VERSION, delivery_id])


def decode_cursor(cursor: str) -> int:
    """The delivery id a page continues below; 400 unless ``encode_cursor`` made it."""
    try:
        value = decode_cursor_payload(cursor)
        # Exactly [CURSOR_VERSION, id]; type() because True == 1 in Python.
        if not (isinstance(value, list) and len(value) == 2 and value[0] == CURSOR_VERSION
                and type(value[1]) is int and 0 < value[1] <= MAX_DELIVERY_ID):
            raise ValueError("not a delivery cursor")
        return value[1]
    except ValueError:
        raise ValidationFailed("Invalid cursor",
                               {"cursor": ["Not a cursor from this API."]}) from None


def list_deliveries(session: so.Session, webhook_id: int, *, status: str | None = None,
                    message_id: str | None = None, limit: int = 100,
                    cursor: str | None = None) -> DeliveryPage:
    """One page of a webhook's deliveries with their attempts, newest first (keyset on id)."""
    get_webhook(session, webhook_id)
    conditions: list[Any] = [WebhookDelivery.webhook_id == webhook_id]
    if status:
        if status not in DELIVERY_STATES:
            raise ValidationFailed("Invalid status", {"status": [
                f"Must be one of: {', '.join(DELIVERY_STATES)}."]})
        conditions.append(WebhookDelivery.status == status)
    if message_id:
        conditions.append(WebhookDelivery.message_id == message_id)
    if cursor:
        conditions.append(WebhookDelivery.id < decode_cursor(cursor))
    rows = list(session.scalars(
        sa.select(WebhookDelivery).where(*conditions)
        .options(so.selectinload(WebhookDelivery.attempt_log), so.undefer(WebhookDelivery.payload))
        .order_by(WebhookDelivery.id.desc()).limit(limit + 1)))
    next_cursor = encode_cursor(rows[limit - 1].id) if len(rows) > limit else None
    return DeliveryPage(rows[:limit], next_cursor)


def get_delivery(session: so.Session, webhook_id: int, delivery_id: int) -> WebhookDelivery:
    get_webhook(session, webhook_id)
    delivery = session.get(WebhookDelivery, delivery_id, options=[
        so.selectinload(WebhookDelivery.attempt_log), so.undefer(WebhookDelivery.payload)]) \
        if 0 < delivery_id <= MAX_DELIVERY_ID else None
    if delivery is None or delivery.webhook_id != webhook_id:
        raise NotFound(f"Delivery {delivery_id} of webhook {webhook_id} not found")
    return delivery


def redeliver(session: so.Session, webhook_id: int, delivery_id: int,
              retry_window: int, now: dt.datetime | None = None) -> WebhookDelivery:
    """Send a delivery again (same body, same event id): it is due now, with a new day of
    retries; its earlier attempts stay in the history. Commits."""
    delivery = get_delivery(session, webhook_id, delivery_id)
    now = now or utcnow()
    delivery.status = "pending"
    delivery.next_attempt_at = now
    delivery.retry_until = now + dt.timedelta(seconds=retry_window)
    session.commit()
    return delivery


@dataclass(frozen=True)
class Backlog:
    """What waits for the dispatcher: pending deliveries per webhook, and the active webhooks."""

    pending_by_webhook: dict[int, int]
    active_webhooks: int

    @property
    def pending(self) -> int:
        return sum(self.pending_by_webhook.values())


def dispatcher_backlog(session: so.Session) -> Backlog:
    """Read at each health check and scrape: a range of ``ix_webhook_deliveries_due`` (the
    pending rows only, never the history) and the webhooks table. No commit."""
    pending = {webhook_id: count for webhook_id, count in session.execute(
        sa.select(WebhookDelivery.webhook_id, sa.func.count())
        .where(WebhookDelivery.status == "pending")
        .group_by(WebhookDelivery.webhook_id))}
    active = session.scalar(sa.select(sa.func.count()).select_from(Webhook)
                            .where(Webhook.active.is_(True))) or 0
    return Backlog(pending, active)

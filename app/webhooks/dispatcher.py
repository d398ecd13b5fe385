"""``flask webhook dispatch``: the process that sends webhook events (docs/WEBHOOKS.md).

It never touches the delivery path: the worker, the listener and the API write their message
events as they always did, and this process tails ``delivery_events`` by id with a cursor per
webhook (``webhooks.event_floor``), so a slow or dead receiver costs mail delivery nothing.

Each pass:

1. **Feed.** Read the events after the lowest cursor, oldest first, and queue a
   ``webhook_deliveries`` row for each event a webhook subscribes to. Ids are taken in order
   without skipping: on PostgreSQL an id can become visible after a higher one (transactions
   commit out of order), so the cursor stops below a hole until the row arrives or
   ``WEBHOOK_HOLE_TIMEOUT`` seconds show it was a rolled-back insert. Queuing in event order is
   what keeps the events of one message in order.
2. **Send.** Take due deliveries, oldest first, but only the oldest pending one of each
   (webhook, message): a delivery that failed holds back the later events of its message only,
   everything else goes on. POST them from a small thread pool with a bounded timeout (no
   database session is held meanwhile), at most ``PER_WEBHOOK_SHARE`` of the pool per webhook
   so one dead receiver cannot take every thread.
3. **Record** every attempt; failures are retried with exponential backoff
   (``WEBHOOK_RETRY_BASE`` doubling up to ``WEBHOOK_RETRY_MAX_DELAY``) until
   ``WEBHOOK_RETRY_WINDOW`` (a day) after the delivery was queued, then given up (``failed``),
   which frees the message's later events.

Finished deliveries (and their attempts) older than ``WEBHOOK_RETENTION`` seconds (30 days)
are deleted every few minutes; pending ones never are.

Run one dispatcher per database (a second one is refused work by the cursor check, not made
useful).
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import datetime as dt
import logging
import math
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, cast

import sqlalchemy as sa
import sqlalchemy.orm as so
from flask import Flask

from ..database import unit_of_work
from ..delivery import maintenance
from ..logs.feed import event_rows
from ..metrics import observe_webhook_attempt
from ..models import Webhook, WebhookAttempt, WebhookDelivery
from ..timeutil import utcnow
from ..version import __version__
from . import feed
from .signing import SIGNATURE_HEADER, signature_header

log = logging.getLogger("elemta.webhooks")

DEFAULTS = {
    "WEBHOOK_TIMEOUT": 10.0,
    "WEBHOOK_CONCURRENCY": 4,
    "WEBHOOK_RETRY_BASE": 30.0,
    "WEBHOOK_RETRY_MAX_DELAY": 3600.0,
    "WEBHOOK_RETRY_WINDOW": 86400,
    "WEBHOOK_POLL_INTERVAL": 1.0,
    "WEBHOOK_HOLE_TIMEOUT": 30.0,
    "WEBHOOK_RETENTION": 2592000,  # 30 days
}
FEED_BATCH = 1000
PRUNE_BATCH = 5000
PRUNE_INTERVAL = 300.0  # seconds between two prunes of the delivery history
PER_WEBHOOK_SHARE = 0.75
HEARTBEAT_EVERY = 5.0  # as the delivery worker's; /api/health calls it stale after 60 s
EXCERPT_CHARS = 512
USER_AGENT = f"Elemta-Webhook/{__version__}"


def setting(config: Any, name: str) -> Any:
    value = config.get(name)
    return DEFAULTS[name] if value is None else value


def retry_delay(attempts: int, base: float, cap: float) -> float:
    """Seconds before the next try after ``attempts`` failed ones: base, 2 base, 4 base..."""
    return min(cap, base * 2 ** min(attempts - 1, 62))


@dataclasses.dataclass(frozen=True)
class Outgoing:
    """One request to make: plain values, no ORM object crosses into the sending threads."""

    delivery_id: int
    webhook_id: int
    url: str
    secret: str
    event_id: int
    event_type: str
    attempt: int
    body: bytes


@dataclasses.dataclass(frozen=True)
class Answer:
    status_code: int | None
    error: str | None
    duration_ms: int
    excerpt: str | None

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A 3xx is an answer, not a new address: webhook URLs are what the admin set."""

    def redirect_request(self, *_args: Any, **_kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirects())


def post(item: Outgoing, timeout: float) -> Answer:
    """POST one signed event; never raises."""
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "Elemta-Event-Id": feed.event_id_text(item.event_id),
        "Elemta-Event-Type": item.event_type,
        "Elemta-Delivery-Id": str(item.delivery_id),
        "Elemta-Attempt": str(item.attempt),
        SIGNATURE_HEADER: signature_header(item.secret, int(time.time()), item.body),
    }
    request = urllib.request.Request(item.url, data=item.body, headers=headers, method="POST")
    started = time.monotonic()
    status: int | None = None
    error: str | None = None
    excerpt: str | None = None
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            status = response.status
            excerpt = response.read(EXCERPT_CHARS).decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        status = exc.code
        error = f"HTTP {exc.code} {exc.reason}"
        try:
            excerpt = exc.read(EXCERPT_CHARS).decode("utf-8", "replace")
        except Exception:  # noqa: BLE001 - the body of an error answer is a courtesy
            excerpt = None
        finally:
            exc.close()
    except Exception as exc:  # noqa: BLE001 - refused, timeout, TLS, DNS: a failed attempt
        reason = getattr(exc, "reason", None) or exc
        error = f"{type(reason).__name__}: {reason}"[:500]
    duration = int((time.monotonic() - started) * 1000)
    return Answer(status, error, duration, excerpt[:EXCERPT_CHARS] if excerpt else None)


class Dispatcher:
    """Feeds, sends and records; ``run`` loops until ``stop``, ``run_pass`` does one round."""

    def __init__(self, app: Flask, clock: Callable[[], dt.datetime] = utcnow) -> None:
        self.app = app
        self.clock = clock
        cfg = app.config
        self.timeout = float(setting(cfg, "WEBHOOK_TIMEOUT"))
        self.concurrency = int(setting(cfg, "WEBHOOK_CONCURRENCY"))
        self.retry_base = float(setting(cfg, "WEBHOOK_RETRY_BASE"))
        self.retry_cap = float(setting(cfg, "WEBHOOK_RETRY_MAX_DELAY"))
        self.retry_window = int(setting(cfg, "WEBHOOK_RETRY_WINDOW"))
        self.poll_interval = float(setting(cfg, "WEBHOOK_POLL_INTERVAL"))
        self.hole_timeout = float(setting(cfg, "WEBHOOK_HOLE_TIMEOUT"))
        self.retention = int(setting(cfg, "WEBHOOK_RETENTION"))
        self._next_prune = 0.0
        self.per_webhook = max(1, math.ceil(self.concurrency * PER_WEBHOOK_SHARE))
        # First sighting of each hole in the event ids (keyed by its first missing id).
        self.holes: dict[int, dt.datetime] = {}
        self._stop = threading.Event()
        self.heartbeat_id = maintenance.dispatcher_heartbeat_id()
        self._started_at = utcnow()
        self._next_beat = 0.0

    def stop(self) -> None:
        self._stop.set()

    # ------------------------------------------------------------------ feed

    def feed(self) -> int:
        """Queue the deliveries of every event seen since the cursors; returns how many."""
        total = 0
        while not self._stop.is_set():
            queued, more = self._feed_batch(self.clock())
            total += queued
            if not more:
                return total
        return total

    def _feed_batch(self, now: dt.datetime) -> tuple[int, bool]:
        with unit_of_work(self.app) as session:
            hooks = session.execute(
                sa.select(Webhook.id, Webhook.event_types, Webhook.event_floor)
                .where(Webhook.active.is_(True))).all()
            if not hooks:
                return 0, False
            lowest = min(h.event_floor for h in hooks)
            rows = [r._mapping for r in event_rows(session, lowest, FEED_BATCH)]
            top = self._contiguous_top(lowest, [r["id"] for r in rows], now)
            queued = 0
            for hook in hooks:
                if hook.event_floor >= top:
                    continue
                wanted = set(hook.event_types)
                values = []
                for row in rows:
                    if not hook.event_floor < row["id"] <= top:
                        continue
                    kind = feed.webhook_type(row)
                    if kind is not None and kind in wanted:
                        values.append(self._delivery_row(hook.id, row, kind, now))
                moved = cast(sa.CursorResult[Any], session.execute(
                    sa.update(Webhook)
                    .where(Webhook.id == hook.id, Webhook.event_floor == hook.event_floor)
                    .values(event_floor=top))).rowcount
                if moved != 1:  # another dispatcher, or a reactivation, moved it meanwhile
                    session.rollback()
                    return 0, False
                if values:
                    session.execute(sa.insert(WebhookDelivery), values)
                    queued += len(values)
            self.holes = {k: v for k, v in self.holes.items() if k > top}
            more = len(rows) == FEED_BATCH and top == rows[-1]["id"]
            return queued, more

    def _contiguous_top(self, floor: int, ids: list[int], now: dt.datetime) -> int:
        """The highest id up to which every id is accounted for (present, or a hole given
        up on after ``hole_timeout``)."""
        top = floor
        for row_id in ids:
            if row_id != top + 1:
                first_seen = self.holes.setdefault(top + 1, now)
                if (now - first_seen).total_seconds() < self.hole_timeout:
                    break
                log.info("event ids %d-%d never arrived (rolled back); webhooks go on",
                         top + 1, row_id - 1)
            top = row_id
        return top

    def _delivery_row(self, webhook_id: int, row: Any, kind: str,
                      now: dt.datetime) -> dict[str, Any]:
        return {
            "webhook_id": webhook_id, "event_id": row["id"], "event_type": kind,
            "message_id": row["message_id"], "payload": feed.payload(row, kind),
            "status": "pending", "attempts": 0, "created_at": now,
            "retry_until": now + dt.timedelta(seconds=self.retry_window),
            "next_attempt_at": now,
        }

    # ------------------------------------------------------------------ send

    def claim(self, now: dt.datetime, room: int, busy: set[int]) -> list[Outgoing]:
        """Up to ``room`` due deliveries: per (webhook, message) only the oldest pending one,
        none already in flight, at most ``per_webhook`` in flight per webhook."""
        if room <= 0:
            return []
        earlier = so.aliased(WebhookDelivery)
        blocked = sa.exists().where(
            earlier.webhook_id == WebhookDelivery.webhook_id,
            earlier.message_id == WebhookDelivery.message_id,
            earlier.status == "pending",
            earlier.id < WebhookDelivery.id,
        )
        with unit_of_work(self.app) as session:
            in_flight: dict[int, int] = {}
            for webhook_id in session.scalars(
                    sa.select(WebhookDelivery.webhook_id)
                    .where(WebhookDelivery.id.in_(busy))) if busy else []:
                in_flight[webhook_id] = in_flight.get(webhook_id, 0) + 1
            query = (
                sa.select(WebhookDelivery.id, WebhookDelivery.webhook_id,
                          WebhookDelivery.event_id, WebhookDelivery.event_type,
                          WebhookDelivery.attempts, WebhookDelivery.payload,
                          Webhook.url, Webhook.secret)
                .join(Webhook, Webhook.id == WebhookDelivery.webhook_id)
                .where(WebhookDelivery.status == "pending",
                       WebhookDelivery.next_attempt_at <= now,
                       Webhook.active.is_(True), ~blocked)
                .order_by(WebhookDelivery.id).limit(room * 4 + len(busy))
            )
            chosen: list[Outgoing] = []
            for row in session.execute(query):
                if row.id in busy or in_flight.get(row.webhook_id, 0) >= self.per_webhook:
                    continue
                in_flight[row.webhook_id] = in_flight.get(row.webhook_id, 0) + 1
                chosen.append(Outgoing(row.id, row.webhook_id, row.url, row.secret,
                                       row.event_id, row.event_type, row.attempts + 1,
                                       row.payload.encode("utf-8")))
                if len(chosen) == room:
                    break
            return chosen

    def record(self, results: list[tuple[Outgoing, Answer]], now: dt.datetime) -> None:
        """Every attempt, and what it means for its delivery, in one transaction."""
        if not results:
            return
        with unit_of_work(self.app) as session:
            for item, answer in results:
                delivery = session.get(WebhookDelivery, item.delivery_id)
                if delivery is None:  # the webhook was deleted while we sent
                    continue
                self._apply(session, delivery, answer, now)
                observe_webhook_attempt(
                    succeeded=answer.ok, gave_up=delivery.status == "failed")

    def _apply(self, session: so.Session, delivery: WebhookDelivery, answer: Answer,
               now: dt.datetime) -> None:
        session.add(WebhookAttempt(
            delivery_id=delivery.id, attempted_at=now, status_code=answer.status_code,
            error=answer.error, duration_ms=answer.duration_ms,
            response_excerpt=answer.excerpt))
        delivery.attempts += 1
        delivery.last_status_code = answer.status_code
        delivery.last_error = answer.error
        if answer.ok:
            delivery.status = "delivered"
            delivery.delivered_at = now
            delivery.next_attempt_at = None
            return
        retry_at = now + dt.timedelta(
            seconds=retry_delay(delivery.attempts, self.retry_base, self.retry_cap))
        if retry_at > delivery.retry_until:
            delivery.status = "failed"
            delivery.next_attempt_at = None
            log.warning("webhook %d: gave up on event %d (%s) after %d attempt(s): %s",
                        delivery.webhook_id, delivery.event_id, delivery.event_type,
                        delivery.attempts, answer.error)
        else:
            delivery.next_attempt_at = retry_at

    # ------------------------------------------------------------------ history

    def prune(self, now: dt.datetime) -> int:
        """Delete finished deliveries older than the retention, in short chunks (their
        attempts go with them: ON DELETE CASCADE). Returns how many."""
        if not self.retention:
            return 0
        cutoff = now - dt.timedelta(seconds=self.retention)
        total = 0
        while not self._stop.is_set():
            with unit_of_work(self.app) as session:
                ids = list(session.scalars(
                    sa.select(WebhookDelivery.id)
                    .where(WebhookDelivery.status != "pending",
                           WebhookDelivery.created_at < cutoff)
                    .order_by(WebhookDelivery.id).limit(PRUNE_BATCH)))
                if ids:
                    session.execute(sa.delete(WebhookDelivery)
                                    .where(WebhookDelivery.id.in_(ids))
                                    .execution_options(synchronize_session=False))
            total += len(ids)
            if len(ids) < PRUNE_BATCH:
                break
        if total:
            log.info("webhook history: %d finished deliveries older than %d s deleted",
                     total, self.retention)
        return total

    def _maybe_beat(self) -> None:
        """Refresh this process's heartbeat (``/api/health``'s ``webhook_dispatcher``)."""
        if time.monotonic() >= self._next_beat:
            with unit_of_work(self.app) as session:
                maintenance.beat(session, self.heartbeat_id, self._started_at)
            self._next_beat = time.monotonic() + HEARTBEAT_EVERY

    def _remove_heartbeat(self) -> None:
        """A dispatcher that stops cleanly says so at once instead of going stale."""
        try:
            with unit_of_work(self.app) as session:
                maintenance.remove_heartbeat(session, self.heartbeat_id)
        except Exception:  # noqa: BLE001 - the row then goes stale, which health reports
            log.warning("webhook dispatcher could not remove its heartbeat")

    def _maybe_prune(self) -> None:
        if time.monotonic() >= self._next_prune:
            self._next_prune = time.monotonic() + PRUNE_INTERVAL
            self.prune(self.clock())

    # ------------------------------------------------------------------ loops

    def run_pass(self) -> tuple[int, int]:
        """Feed, then send every delivery due now (in waves that keep the order per message)
        and wait for the answers. Returns (queued, attempts made). Tests and ``--once``."""
        queued = self.feed()
        attempts = 0
        with cf.ThreadPoolExecutor(self.concurrency, thread_name_prefix="webhook") as pool:
            while not self._stop.is_set():
                items = self.claim(self.clock(), self.concurrency, set())
                if not items:
                    break
                answers = list(pool.map(lambda i: post(i, self.timeout), items))
                self.record(list(zip(items, answers, strict=True)), self.clock())
                attempts += len(items)
        return queued, attempts

    def run(self) -> int:
        """Until ``stop``: keep the pool busy with due deliveries, record answers as they come.
        On stop, the requests under way finish (at most the timeout) and are recorded."""
        log.info("webhook dispatcher started (%d thread(s), timeout %.0fs)",
                 self.concurrency, self.timeout)
        running: dict[cf.Future[Answer], Outgoing] = {}
        with cf.ThreadPoolExecutor(self.concurrency, thread_name_prefix="webhook") as pool:
            while True:
                done = [f for f in running if f.done()]
                try:
                    # Unrecorded answers (the database is down) are sent again: at least once.
                    self.record([(running.pop(f), f.result()) for f in done], self.clock())
                except Exception:
                    log.exception("webhook dispatcher could not record answers; they will "
                                  "be sent again")
                if self._stop.is_set():
                    if not running:
                        break
                    cf.wait(list(running), timeout=self.timeout + 1)
                    continue
                try:
                    self._maybe_beat()
                    self._maybe_prune()
                    self.feed()
                    busy = {item.delivery_id for item in running.values()}
                    for item in self.claim(self.clock(), self.concurrency - len(running), busy):
                        running[pool.submit(post, item, self.timeout)] = item
                except Exception:  # a database outage: keep the process, try again shortly
                    log.exception("webhook dispatcher pass failed; retrying")
                    self._stop.wait(self.poll_interval)
                    continue
                if running:
                    cf.wait(list(running), timeout=self.poll_interval,
                            return_when=cf.FIRST_COMPLETED)
                else:
                    self._stop.wait(self.poll_interval)
        self._remove_heartbeat()
        log.info("webhook dispatcher stopped")
        return 0

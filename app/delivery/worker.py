"""The delivery loop: claim due work, deliver it on a thread pool, keep house.

A *job* is one message's claimed recipients that share a destination (one SMTP transaction).
The main thread claims (keeping about twice the pool size in flight), submits jobs, beats the
heartbeat, folds the queue counters and purges expired failed mail. ``stop()`` (SIGTERM) ends
claiming; jobs not yet started give their claims back at once; jobs under way get up to
``SHUTDOWN_GRACE`` seconds to finish.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import secrets
import socket
import threading
import time
from collections import defaultdict
from dataclasses import dataclass

import sqlalchemy as sa
from flask import Flask

from ..extensions import db
from ..mail.service import local_hostname
from ..models import Message, MessageContent
from ..queue import counters
from ..timeutil import utcnow
from . import maintenance
from .claim import ClaimedRecipient, claim_due, release_claims
from .outcomes import OutcomePolicy, record_outcome
from .routing import Resolver, Router, RoutingError
from .smtp_client import ConnectionPool, RecipientResult, SmtpClient

log = logging.getLogger("elemta.delivery")

HEARTBEAT_EVERY = 5.0  # the contract asks for at least every 15 s
FOLD_EVERY = 5.0
PURGE_EVERY = 300.0
IDLE_POLL = 1.0
SHUTDOWN_GRACE = 30.0
LEASE_MARGIN = 0.8  # a job that waited past 80% of its lease gives the claim back instead


@dataclass
class Job:
    message_id: str
    destination: str
    domain: str
    recipients: list[ClaimedRecipient]
    claimed_at: float


def new_worker_id() -> str:
    return f"{socket.gethostname()[:80]}:{os.getpid()}:{secrets.token_hex(4)}"


class Worker:
    def __init__(self, app: Flask, *, resolver: Resolver | None = None,
                 worker_id: str | None = None) -> None:
        cfg = app.config
        self.app = app
        self.worker_id = worker_id or new_worker_id()
        self.concurrency = max(1, int(cfg["WORKER_CONCURRENCY"]))
        self.lease_seconds = max(1, int(cfg["WORKER_LEASE_SECONDS"]))
        self.failed_retention = int(cfg["FAILED_RETENTION"])
        hostname = local_hostname(cfg["SMTP_HOSTNAME"])
        self.router = Router(cfg, resolver)
        self.pool = ConnectionPool(int(cfg["MAX_CONNECTIONS_PER_DOMAIN"]))
        self.client = SmtpClient(self.pool, local_hostname=hostname,
                                 timeout=float(cfg["SMTP_TIMEOUT"]))
        self.policy = OutcomePolicy(retry_schedule=list(cfg["RETRY_SCHEDULE"]),
                                    max_queue_lifetime=int(cfg["MAX_QUEUE_LIFETIME"]),
                                    send_bounces=bool(cfg["SEND_BOUNCES"]),
                                    reporting_mta=hostname)
        self._stop = threading.Event()

    def stop(self) -> None:
        """Ask the loop to end (signal handlers call this)."""
        self._stop.set()

    # ----------------------------------------------------------------- the loop

    def run(self, once: bool = False) -> int:
        """Deliver until ``stop()`` (or, with ``once``, until nothing is due); returns 0."""
        started = utcnow()
        log.info("delivery worker %s starting (concurrency %d, %s)", self.worker_id,
                 self.concurrency,
                 f"relay {self.router.relay[0]}:{self.router.relay[1]}" if self.router.relay
                 else "MX routing")
        executor = cf.ThreadPoolExecutor(self.concurrency, thread_name_prefix="elemta-delivery")
        inflight: dict[cf.Future[None], Job] = {}
        next_beat = next_fold = 0.0
        next_purge = time.monotonic() + 10
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_beat:
                    self._housekeeping(maintenance.beat, self.worker_id, started)
                    next_beat = now + HEARTBEAT_EVERY
                if now >= next_fold:
                    self._housekeeping(counters.maybe_fold)
                    next_fold = now + FOLD_EVERY
                if now >= next_purge:
                    self._housekeeping(maintenance.purge_failed, self.failed_retention)
                    next_purge = now + PURGE_EVERY

                room = 2 * self.concurrency - len(inflight)
                jobs = self._claim(room) if room > 0 else []
                for job in jobs:
                    inflight[executor.submit(self._run_job, job)] = job
                if not inflight:
                    if once and not jobs:
                        break
                    self.pool.close_idle()
                    self._stop.wait(IDLE_POLL)
                    continue
                done, _ = cf.wait(list(inflight), timeout=IDLE_POLL,
                                  return_when=cf.FIRST_COMPLETED)
                for future in done:
                    inflight.pop(future)
        finally:
            self._shutdown(executor, inflight)
        log.info("delivery worker %s stopped", self.worker_id)
        return 0

    def _shutdown(self, executor: cf.ThreadPoolExecutor, inflight: dict[cf.Future[None], Job]) -> None:
        unstarted = [job for future, job in inflight.items() if future.cancel()]
        executor.shutdown(wait=False, cancel_futures=True)
        if unstarted:
            ids = [r.id for job in unstarted for r in job.recipients]
            self._housekeeping(release_claims, self.worker_id, ids)
            log.info("gave back %d unstarted claim(s)", len(ids))
        running = [f for f in inflight if not f.cancelled()]
        _, late = cf.wait(running, timeout=SHUTDOWN_GRACE)
        if late:
            log.warning("%d delivery(ies) still running after %.0f s; their leases will "
                        "expire and another worker will take them over", len(late),
                        SHUTDOWN_GRACE)
        self.pool.close_idle(0)
        self._housekeeping(maintenance.remove_heartbeat, self.worker_id)

    def _housekeeping(self, func, *args) -> None:  # type: ignore[no-untyped-def]
        """Run a maintenance step in its own app context; a failure is logged, not fatal."""
        with self.app.app_context():
            try:
                func(db.session, *args)
            except Exception:
                db.session.rollback()
                log.exception("%s failed", getattr(func, "__name__", func))
            finally:
                db.session.remove()

    # ----------------------------------------------------------------- claiming

    def _claim(self, max_messages: int) -> list[Job]:
        with self.app.app_context():
            try:
                claimed = claim_due(db.session, self.worker_id, max_messages=max_messages,
                                    lease_seconds=self.lease_seconds)
            except Exception:
                db.session.rollback()
                log.exception("claiming due recipients failed")
                return []
            finally:
                db.session.remove()
        now = time.monotonic()
        groups: dict[tuple[str, str], list[ClaimedRecipient]] = defaultdict(list)
        for recipient in claimed:
            groups[(recipient.message_id, self.router.destination_of(recipient.domain))].append(
                recipient)
        return [Job(message_id, destination, recipients[0].domain, recipients, now)
                for (message_id, destination), recipients in groups.items()]

    # ----------------------------------------------------------------- one job

    def _run_job(self, job: Job) -> None:
        with self.app.app_context():
            session = db.session
            try:
                if time.monotonic() - job.claimed_at > self.lease_seconds * LEASE_MARGIN:
                    release_claims(session, self.worker_id, [r.id for r in job.recipients])
                    return
                row = session.execute(
                    sa.select(Message.sender, MessageContent.raw)
                    .join(MessageContent, MessageContent.message_id == Message.id)
                    .where(Message.id == job.message_id)
                ).first()
                session.commit()
                if row is None:  # deleted since the claim; its recipients went with it
                    return
                results = self._attempt(job, row.sender, row.raw)
                record_outcome(session, self.worker_id, job.message_id, results, self.policy,
                               sender=row.sender)
            except Exception:
                session.rollback()
                # The lease stays: the recipients are retried when it expires, not in a hot loop.
                log.exception("delivery of %s to %s failed unexpectedly", job.message_id,
                              job.destination)
            finally:
                db.session.remove()

    def _attempt(self, job: Job, sender: str, raw: bytes) -> list[RecipientResult]:
        pairs = [(r.id, r.address) for r in job.recipients]
        try:
            route = self.router.route(job.domain)
        except RoutingError as exc:
            kind = "rejection" if exc.permanent else "tempfail"
            return [RecipientResult(rid, address, kind, exc.message, None, exc.enhanced_code)
                    for rid, address in pairs]
        return self.client.deliver(route, sender, pairs, raw)

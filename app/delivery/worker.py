"""The delivery loop: claim due work, deliver it on a thread pool, keep house.

A *job* is one message's claimed recipients that share a destination (one SMTP transaction).
Delivery threads run jobs and pass their results to one recorder thread, which records them in
batches (one transaction for many outcomes). The main thread claims in batches (the next one
while a batch's worth is still queued), submits jobs, beats the
heartbeat, folds the queue counters and purges expired failed mail. ``stop()`` (SIGTERM) ends
claiming; jobs not yet started give their claims back at once; jobs under way get up to
``SHUTDOWN_GRACE`` seconds to finish.

A job that fails unexpectedly (a bug, not an SMTP or DNS outcome) is recorded as a temporary
failure of its recipients, so the retry schedule, the queue lifetime and bounces apply to it
as to any other failure.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import queue
import secrets
import socket
import threading
import time
from collections import defaultdict
from dataclasses import dataclass

import sqlalchemy.exc
from flask import Flask

from ..database import unit_of_work
from ..mail.service import local_hostname
from ..queue import counters
from ..queue.leases import ClaimedRecipient, lease_due, release_leases
from ..queue.outcomes import Attempt
from ..queue.retention import purge_expired_failed
from ..timeutil import utcnow
from . import content, maintenance
from .outcomes import OutcomePolicy, record_outcomes
from .routing import Resolver, Router, RoutingError
from .smtp_client import ConnectionPool, RecipientResult, SmtpClient

log = logging.getLogger("elemta.delivery")

HEARTBEAT_EVERY = 5.0  # the contract asks for at least every 15 s
FOLD_EVERY = 5.0
PURGE_EVERY = 300.0
IDLE_POLL = 1.0
CLAIM_BATCH_MIN = 32  # messages per claim
PREFETCH_MAX_BYTES = 256 * 1024  # larger messages are read by the job itself
RECORD_BATCH = 64  # outcomes per recording transaction
SHUTDOWN_GRACE = 30.0
LEASE_MARGIN = 0.8  # a job that waited past 80% of its lease gives the claim back instead


@dataclass
class Job:
    message_id: str
    destination: str
    domain: str
    recipients: list[ClaimedRecipient]
    claimed_at: float
    sender: str = ""
    raw: bytes | None = None  # prefetched with the claim when small; else loaded by the job


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
                                 timeout=float(cfg["SMTP_TIMEOUT"]),
                                 ca_file=cfg["RELAY_TLS_CA_FILE"])
        self.policy = OutcomePolicy(retry_schedule=list(cfg["RETRY_SCHEDULE"]),
                                    max_queue_lifetime=int(cfg["MAX_QUEUE_LIFETIME"]),
                                    send_bounces=bool(cfg["SEND_BOUNCES"]),
                                    reporting_mta=hostname)
        self.batch_size = max(CLAIM_BATCH_MIN, 4 * self.concurrency)
        self.recorded_attempts = 0
        self._stop = threading.Event()
        self._recorder: queue.Queue[Attempt | None] = queue.Queue()

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
        recorder = threading.Thread(target=self._record_loop, name="elemta-recorder")
        recorder.start()
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
                    self._housekeeping(purge_expired_failed, self.failed_retention)
                    next_purge = now + PURGE_EVERY

                # Claim in batches (one claim statement per batch, not per message), and claim
                # the next batch while a batch's worth is still queued: the threads never wait
                # for a claim.
                # (Read before claiming: outcomes recorded meanwhile may have queued a bounce.)
                recording = self._recorder.unfinished_tasks
                jobs = self._claim(self.batch_size) if len(inflight) < self.batch_size else []
                for job in jobs:
                    inflight[executor.submit(self._run_job, job)] = job
                if not inflight:
                    if recording:
                        # Outcomes still being recorded may free work (a bounce, say).
                        self._stop.wait(0.02)
                        continue
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
            self._shutdown(executor, inflight, recorder)
        log.info("delivery worker %s stopped after %d delivery attempt(s)", self.worker_id,
                 self.recorded_attempts)
        return 0

    def _shutdown(self, executor: cf.ThreadPoolExecutor, inflight: dict[cf.Future[None], Job],
                  recorder: threading.Thread) -> None:
        unstarted = [job for future, job in inflight.items() if future.cancel()]
        executor.shutdown(wait=False, cancel_futures=True)
        if unstarted:
            ids = [r.id for job in unstarted for r in job.recipients]
            self._housekeeping(release_leases, self.worker_id, ids)
            log.info("gave back %d unstarted claim(s)", len(ids))
        running = [f for f in inflight if not f.cancelled()]
        _, late = cf.wait(running, timeout=SHUTDOWN_GRACE)
        if late:
            log.warning("%d delivery(ies) still running after %.0f s; their leases will "
                        "expire and another worker will take them over", len(late),
                        SHUTDOWN_GRACE)
        self._recorder.put(None)  # record what is left, then end
        recorder.join(SHUTDOWN_GRACE)
        self.pool.close_idle(0)
        self._housekeeping(maintenance.remove_heartbeat, self.worker_id)

    def _housekeeping(self, func, *args) -> None:  # type: ignore[no-untyped-def]
        """Run a maintenance step in its own unit of work; a failure is logged, not fatal."""
        try:
            with unit_of_work(self.app) as session:
                func(session, *args)
        except Exception:
            log.exception("%s failed", getattr(func, "__name__", func))

    # ----------------------------------------------------------------- claiming

    def _claim(self, max_messages: int) -> list[Job]:
        try:
            with unit_of_work(self.app) as session:
                claimed = lease_due(session, self.worker_id, max_messages=max_messages,
                                    lease_seconds=self.lease_seconds)
        except Exception:
            log.exception("claiming due recipients failed")
            return []
        if not claimed:
            return []
        try:
            with unit_of_work(self.app) as session:
                contents = content.prefetch(session, {c.message_id for c in claimed},
                                            PREFETCH_MAX_BYTES)
        except Exception:
            log.exception("reading claimed messages failed")
            contents = {}
        now = time.monotonic()
        groups: dict[tuple[str, str], list[ClaimedRecipient]] = defaultdict(list)
        for recipient in claimed:
            groups[(recipient.message_id, self.router.destination_of(recipient.domain))].append(
                recipient)
        jobs = []
        for (message_id, destination), recipients in groups.items():
            sender, raw = contents.get(message_id, ("", None))
            jobs.append(Job(message_id, destination, recipients[0].domain, recipients, now,
                            sender, raw))
        return jobs

    # ----------------------------------------------------------------- one job

    def _run_job(self, job: Job) -> None:
        """Deliver one job over SMTP and hand its results to the recorder."""
        try:
            if time.monotonic() - job.claimed_at > self.lease_seconds * LEASE_MARGIN:
                self._housekeeping(release_leases, self.worker_id, [r.id for r in job.recipients])
                return
            if job.raw is None and not self._load_content(job):
                return  # deleted since the claim; its recipients went with it
            results = self._attempt(job, job.sender, job.raw or b"")
        except Exception as exc:
            # Keeping the lease would bring the job back every lease period, failing the same
            # way for ever with no retry schedule, no expiry and no bounce: record it instead.
            log.exception("delivery of %s to %s failed unexpectedly; recorded as a temporary "
                          "failure", job.message_id, job.destination)
            results = internal_error_results(job, exc)
        job.raw = None
        self._recorder.put(Attempt(job.message_id, job.sender, results))

    def _load_content(self, job: Job) -> bool:
        with unit_of_work(self.app) as session:
            row = content.load(session, job.message_id)
        if row is None:
            return False
        job.sender, job.raw = row
        return True

    # ----------------------------------------------------------------- recording

    def _record_loop(self) -> None:
        """The recorder thread: outcomes in batches, one transaction each, until told to end."""
        while True:
            first = self._recorder.get()
            if first is None:
                self._recorder.task_done()
                return
            batch = [first]
            end = False
            while len(batch) < RECORD_BATCH:
                try:
                    item = self._recorder.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    end = True
                    self._recorder.task_done()
                    break
                batch.append(item)
            self._record(batch)
            for _ in batch:
                self._recorder.task_done()
            if end:
                return

    def _record(self, batch: list[Attempt]) -> None:
        try:
            with unit_of_work(self.app) as session:
                record_outcomes(session, self.worker_id, batch, self.policy)
            self.recorded_attempts += len(batch)  # only this thread writes it
        except Exception:
            # The leases stay: the recipients come back when they expire.
            log.exception("recording %d delivery outcomes failed", len(batch))

    def _attempt(self, job: Job, sender: str, raw: bytes) -> list[RecipientResult]:
        pairs = [(r.id, r.address) for r in job.recipients]
        try:
            route = self.router.route(job.domain)
        except RoutingError as exc:
            kind = "rejection" if exc.permanent else "tempfail"
            return [RecipientResult(rid, address, kind, exc.message, None, exc.enhanced_code)
                    for rid, address in pairs]
        return self.client.deliver(route, sender, pairs, raw)


def internal_error_results(job: Job, exc: Exception) -> list[RecipientResult]:
    """Temporary failures of every recipient of ``job`` for an unexpected exception.

    The text names the exception for the operator (the traceback is in the worker's log);
    database errors are named by type only, since their text carries SQL and parameters.
    """
    detail = "" if isinstance(exc, sqlalchemy.exc.SQLAlchemyError) else str(exc).strip()
    text = f"internal error: {type(exc).__name__}" + (f": {detail}" if detail else "")
    text = f"{text[:500]} (see the worker log)"
    return [RecipientResult(r.id, r.address, "tempfail", text) for r in job.recipients]

"""The delivery loop: claim due work, deliver it on a thread pool, keep house.

A *job* is one message's claimed recipients that share a destination (one SMTP transaction).
Delivery threads run jobs and hand their results to the recorder (``recorder.py``), which
commits the outcomes of every thread that finished meanwhile in one transaction; a thread starts
its next job only once its outcome is committed, so a crash can send again at most one
transaction per thread. A job's SMTP part (routing, admission, connection, transaction) holds
one of ``WORKER_CONCURRENCY`` slots, given back when the outcome is handed to the recorder:
there are four times as many threads as slots by default (``WORKER_THREADS``), so while some
wait for their commit, others are in SMTP, and a commit carries more outcomes. The main
thread claims in batches (the next one while a batch's worth is still queued; nothing while the
recorder waits for the database), submits jobs, beats the heartbeat, folds the queue counters
and purges expired failed mail. ``stop()`` (SIGTERM) ends claiming; jobs not yet started give
their claims back at once (a job waiting for a slot included); jobs under way get up to
``SHUTDOWN_GRACE`` seconds to finish.

A job that fails unexpectedly (a bug, not an SMTP or DNS outcome) is recorded as a temporary
failure of its recipients, so the retry schedule, the queue lifetime and bounces apply to it
as to any other failure.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import secrets
import socket
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import sqlalchemy.exc
from flask import Flask

from ..config import local_hostname, worker_threads
from ..control.gate import Clock, DeliveryControl, Postpone
from ..database import (
    describe_error,
    is_transient_conflict,
    is_unreachable,
    unit_of_work,
)
from ..queue import counters, shape
from ..queue.leases import ClaimedRecipient, lease_due, postpone_leases, release_leases
from ..queue.outcomes import Attempt
from ..queue.retention import purge_expired_failed
from ..timeutil import utcnow
from . import content, maintenance
from .outcomes import OutcomePolicy
from .recorder import Recorder
from .routing import Resolver, Router, RoutingError
from .smtp_client import ConnectionPool, NoConnectionSlot, RecipientResult, SmtpClient

log = logging.getLogger("elemta.delivery")

HEARTBEAT_EVERY = 5.0  # the contract asks for at least every 15 s
FOLD_EVERY = 5.0
PURGE_EVERY = 300.0
IDLE_POLL = 1.0
CLAIM_BATCH_MIN = 32  # messages per claim
PREFETCH_MAX_BYTES = 256 * 1024  # larger messages are read by the job itself
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
                 worker_id: str | None = None, clock: Clock = utcnow) -> None:
        cfg = app.config
        self.app = app
        self.worker_id = worker_id or new_worker_id()
        # SMTP transactions at once (SPEC.md §10), and the threads that run them: the threads
        # beyond the concurrency are those waiting for their last outcome's commit.
        self.concurrency = max(1, int(cfg["WORKER_CONCURRENCY"]))
        self.threads = max(self.concurrency, worker_threads(cfg))
        self._smtp_slots = threading.BoundedSemaphore(self.concurrency)
        self.lease_seconds = max(1, int(cfg["WORKER_LEASE_SECONDS"]))
        self.failed_retention = int(cfg["FAILED_RETENTION"])
        hostname = local_hostname(cfg["SMTP_HOSTNAME"])
        self.router = Router(cfg, resolver)
        # Destination policies, shared limits and backoff (control/gate.py); ``clock`` lets
        # tests move time on without waiting.
        self.clock = clock
        self.control = DeliveryControl(app, self.worker_id,
                                       int(cfg["MAX_CONNECTIONS_PER_DOMAIN"]), clock)
        self.pool = ConnectionPool(int(cfg["MAX_CONNECTIONS_PER_DOMAIN"]), slots=self.control)
        self.client = SmtpClient(self.pool, local_hostname=hostname,
                                 timeout=float(cfg["SMTP_TIMEOUT"]),
                                 ca_file=cfg["RELAY_TLS_CA_FILE"])
        self.policy = OutcomePolicy(retry_schedule=list(cfg["RETRY_SCHEDULE"]),
                                    max_queue_lifetime=int(cfg["MAX_QUEUE_LIFETIME"]),
                                    send_bounces=bool(cfg["SEND_BOUNCES"]),
                                    reporting_mta=hostname)
        self.batch_size = max(CLAIM_BATCH_MIN, 2 * self.threads)
        self.recorder = Recorder(app, self.worker_id, self.policy, self.lease_seconds)
        self._stop = threading.Event()

    @property
    def recorded_attempts(self) -> int:
        """Attempts whose outcome this worker has committed."""
        return self.recorder.recorded_attempts

    def stop(self) -> None:
        """Ask the loop to end (signal handlers call this)."""
        self._stop.set()

    # ----------------------------------------------------------------- the loop

    def run(self, once: bool = False) -> int:
        """Deliver until ``stop()`` (or, with ``once``, until nothing is due); returns 0."""
        started = utcnow()
        log.info("delivery worker %s starting (concurrency %d, %d threads, %s)",
                 self.worker_id, self.concurrency, self.threads,
                 f"relay {self.router.relay[0]}:{self.router.relay[1]}" if self.router.relay
                 else "MX routing")
        executor = cf.ThreadPoolExecutor(self.threads, thread_name_prefix="elemta-delivery")
        self.recorder.start()
        inflight: dict[cf.Future[None], Job] = {}
        reclaimed: dict[cf.Future[None], list[int]] = {}
        # Finished jobs are handed over by their threads (a done callback) rather than found by
        # ``cf.wait`` over every job in flight: that installs and removes a waiter on each of the
        # 32-64 futures at every wake-up, once per group commit (3 % of the worker's GIL time).
        finished: deque[cf.Future[None]] = deque()
        woken = threading.Event()
        batch_size = self.batch_size

        def hand_over(future: cf.Future[None]) -> None:
            finished.append(future)
            # The main thread is woken when it has something to do: room for the next claim
            # (the last job finishing included), or a claim taken again to give back. Waking
            # it for every finished job (about once a group commit) only had it check that
            # nothing was to be done, taking the GIL from the recorder and the delivery
            # threads each time (docs/PERFORMANCE.md, "Delivery, the worker's CPU outside the
            # recorder"). It still wakes at least every IDLE_POLL for its housekeeping.
            if len(inflight) - len(finished) < batch_size or future in reclaimed:
                woken.set()

        next_beat = next_fold = 0.0
        next_purge = time.monotonic() + 10
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if not self.recorder.is_healthy():
                    # The recorder is waiting for the database and says so in the log; the
                    # housekeeping would only add a traceback per step and second.
                    self._stop.wait(IDLE_POLL)
                    continue
                if now >= next_beat:
                    self._housekeeping(maintenance.beat, self.worker_id, started)
                    next_beat = now + HEARTBEAT_EVERY
                if now >= next_fold:
                    self._housekeeping(counters.maybe_fold)
                    self._housekeeping(shape.maybe_fold)
                    self._safely(self.control.housekeeping)
                    next_fold = now + FOLD_EVERY
                if now >= next_purge:
                    self._housekeeping(purge_expired_failed, self.failed_retention)
                    next_purge = now + PURGE_EVERY

                # Claim in batches (one claim statement per batch, not per message), and claim
                # the next batch while a batch's worth is still queued: the threads never wait
                # for a claim.
                # (Read before claiming: outcomes recorded meanwhile may have queued a bounce.)
                recording = self.recorder.busy
                # While outcomes wait for the database nothing new is claimed: the claim could
                # take back (after a long outage, their leases expired) recipients whose
                # delivery is only waiting to be recorded.
                claiming = len(inflight) < self.batch_size and self.recorder.is_healthy()
                jobs = self._claim(self.batch_size) if claiming else []
                if jobs and inflight:
                    jobs = self._skip_in_flight(jobs, inflight, reclaimed)
                    if any(future.done() for future in reclaimed):
                        woken.set()  # its holder finished before it was noted: give it back
                for job in jobs:
                    future = executor.submit(self._run_job, job)
                    inflight[future] = job
                    future.add_done_callback(hand_over)
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
                woken.wait(IDLE_POLL)
                woken.clear()  # before draining: a job finishing meanwhile sets it again
                while finished:
                    future = finished.popleft()
                    inflight.pop(future)
                    # Claimed again while this job held them: the job is over (recorded or
                    # given back), so the new claim is given back too, and they are due again.
                    if future in reclaimed:
                        self._housekeeping(release_leases, self.worker_id, reclaimed.pop(future))
        finally:
            self._shutdown(executor, inflight)
        log.info("delivery worker %s stopped after %d delivery attempt(s) recorded in %d "
                 "transaction(s)", self.worker_id, self.recorded_attempts,
                 self.recorder.transactions)
        return 0

    @staticmethod
    def _skip_in_flight(jobs: list[Job], inflight: dict[cf.Future[None], Job],
                        reclaimed: dict[cf.Future[None], list[int]]) -> list[Job]:
        """``without_recipients_in_flight``, noting which job holds each recipient skipped."""
        holder = {r.id: future for future, job in inflight.items() for r in job.recipients}
        for job in jobs:
            for r in job.recipients:
                if r.id in holder:
                    reclaimed.setdefault(holder[r.id], []).append(r.id)
        return without_recipients_in_flight(jobs, inflight.values())

    def _shutdown(self, executor: cf.ThreadPoolExecutor,
                  inflight: dict[cf.Future[None], Job]) -> None:
        # Outcomes the database still cannot take when the grace ends are given up (their
        # leases expire, as after a crash): the process must be able to end.
        self.recorder.give_up_after(time.monotonic() + SHUTDOWN_GRACE)
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
        self.recorder.close(SHUTDOWN_GRACE)  # record what is left, then end
        self.pool.close_idle(0)
        self.control.close()
        self._housekeeping(maintenance.remove_heartbeat, self.worker_id)

    def _housekeeping(self, func: Callable[..., object], *args: Any) -> None:
        """Run a maintenance step in its own unit of work; a failure is logged, not fatal."""
        try:
            with unit_of_work(self.app) as session:
                func(session, *args)
        except Exception:
            log.exception("%s failed", getattr(func, "__name__", func))

    def _safely(self, func: Callable[[], object]) -> None:
        try:
            func()
        except Exception:
            log.exception("%s failed", getattr(func, "__name__", func))

    # ----------------------------------------------------------------- claiming

    def _claim(self, max_messages: int) -> list[Job]:
        claimed: list[ClaimedRecipient] = []
        contents: dict[str, tuple[str, bytes | None]] = {}
        # One session for the claim and the content read (one pool checkout and return, not
        # two): with the prebuilt statements, half the claim's CPU (4.5 -> 2.3 ms for 32).
        try:
            with unit_of_work(self.app) as session:
                claimed = lease_due(session, self.worker_id, max_messages=max_messages,
                                    lease_seconds=self.lease_seconds, now=self.clock())
                if claimed:
                    contents = content.prefetch(session, {c.message_id for c in claimed},
                                                PREFETCH_MAX_BYTES)
        except Exception as exc:
            if claimed:
                # The claim is committed: its jobs read their content themselves.
                log.exception("reading claimed messages failed")
                contents = {}
            elif is_unreachable(exc) or is_transient_conflict(exc):
                # The database is away or busy, not a bug: no traceback every second.
                log.warning("claiming due recipients failed: %s", describe_error(exc))
                return []
            else:
                log.exception("claiming due recipients failed")
                return []
        if not claimed:
            return []
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
        """Deliver one job over SMTP; return once its results are recorded.

        The SMTP part holds one of the ``concurrency`` slots; the slot is given back before
        the outcome is handed to the recorder, so another thread's transaction can run while
        this one waits for the commit. The thread itself starts nothing else until then."""
        # Begun before the slot is taken: the recorder's gathering then waits for the threads
        # its last commit released even while they wait for a slot, and one commit carries
        # them all (13-14 outcomes a commit at 16 threads against 8-11 when begun under the
        # slot; docs/PERFORMANCE.md, "Delivery, slots for the SMTP part").
        self.recorder.begin()
        results: list[RecipientResult] | None = None
        try:
            with self._smtp_slots:
                results = self._deliver(job)
        finally:
            if results is None:
                self.recorder.abandon()
        job.raw = None
        if results is not None:
            self.recorder.record(Attempt(job.message_id, job.sender, results))

    def _deliver(self, job: Job) -> list[RecipientResult] | None:
        """The job's SMTP part, under a slot: its results, or None when it has no outcome to
        record (its claim given back or postponed, its message gone)."""
        try:
            # A job that waited for a slot after SIGTERM has not started: its claim goes back,
            # as those of the jobs still queued do.
            if self._stop.is_set() or \
                    time.monotonic() - job.claimed_at > self.lease_seconds * LEASE_MARGIN:
                self._housekeeping(release_leases, self.worker_id, [r.id for r in job.recipients])
                return None
            if job.raw is None and not self._load_content(job):
                return None  # deleted since the claim; its recipients went with it
            return self._attempt(job, job.sender, job.raw or b"")
        except Postpone as wait:
            # Not an attempt: the destination's limits say "later" (docs/DELIVERY.md).
            log.debug("postponed %s: %s", job.message_id, wait.reason)
            self._housekeeping(postpone_leases, self.worker_id,
                               [r.id for r in job.recipients], wait.until)
            return None
        except Exception as exc:
            # Keeping the lease would bring the job back every lease period, failing the same
            # way for ever with no retry schedule, no expiry and no bounce: record it instead.
            log.exception("delivery of %s to %s failed unexpectedly; recorded as a temporary "
                          "failure", job.message_id, job.destination)
            return internal_error_results(job, exc)

    def _load_content(self, job: Job) -> bool:
        with unit_of_work(self.app) as session:
            row = content.load(session, job.message_id)
        if row is None:
            return False
        job.sender, job.raw = row
        return True

    def _attempt(self, job: Job, sender: str, raw: bytes) -> list[RecipientResult]:
        pairs = [(r.id, r.address) for r in job.recipients]
        try:
            route = self.router.route(job.domain)
        except RoutingError as exc:
            kind = "rejection" if exc.permanent else "tempfail"
            return [RecipientResult(rid, address, kind, exc.message, None, exc.enhanced_code)
                    for rid, address in pairs]
        hosts = [hop.hostname for hop in route.hops] \
            if self.control.needs_hosts(job.domain) else []
        limits = self.control.limits_for(route.destination, job.domain, hosts)
        admission = self.control.admit(limits)  # or Postpone
        try:
            results = self.client.deliver(route, sender, pairs, raw, limits)
        except NoConnectionSlot:
            raise self.control.slot_busy(admission) from None
        # The results stand whatever becomes of the backoff's save: an error here (the
        # database away) made the recipients the server accepted temporary failures, and
        # their retry sent them again.
        self._safely(lambda: self.control.observe(limits, results))
        return results


def without_recipients_in_flight(jobs: list[Job], inflight: Iterable[Job]) -> list[Job]:
    """``jobs`` without the recipients this worker is delivering already.

    A job still under way when its lease expires (it waited in the queue, then met a slow
    server or a slow commit) can be claimed again by this very worker, whose claim renews the
    lease in its own name: a second job would send it again. The job under way records it.
    """
    busy = {r.id for job in inflight for r in job.recipients}
    kept = []
    for job in jobs:
        if any(r.id in busy for r in job.recipients):
            job.recipients = [r for r in job.recipients if r.id not in busy]
            if not job.recipients:
                continue
        kept.append(job)
    return kept


def internal_error_results(job: Job, exc: Exception) -> list[RecipientResult]:
    """Temporary failures of every recipient of ``job`` for an unexpected exception.

    The text names the exception for the operator (the traceback is in the worker's log);
    database errors are named by type only, since their text carries SQL and parameters.
    """
    detail = "" if isinstance(exc, sqlalchemy.exc.SQLAlchemyError) else str(exc).strip()
    text = f"internal error: {type(exc).__name__}" + (f": {detail}" if detail else "")
    text = f"{text[:500]} (see the worker log)"
    return [RecipientResult(r.id, r.address, "tempfail", text) for r in job.recipients]

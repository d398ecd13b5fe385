"""The recorder: delivery outcomes made durable before their thread sends again.

A delivery thread that finished an SMTP transaction hands its outcome to the recorder and
waits until it is committed (``Recorder.record``); only then does it start another transaction.
The recorder thread commits whatever has queued meanwhile in one transaction (group commit:
the threads that finished while a commit ran share the next one, and a group waits briefly for
the threads the last commit woke, so that all the threads go round together) and wakes their
threads. One recorder serves all the delivery threads: on PostgreSQL a group's writes go in one
pipeline (``delivery.outcomes.record_outcomes``), a few round trips whatever its size. So a
worker killed at any moment has at most one unrecorded transaction per delivery thread: what a
crash can send twice is bounded by the thread count (docs/DELIVERY.md, "What a crash or an
outage can send twice").

When the write fails because the database cannot be reached (or stays locked, or keeps
conflicting), the outcomes and their leases are kept: the recorder waits for the database
with a capped exponential backoff, renews the held recipients' leases as soon as it answers,
then writes the outcomes. A write cannot hang silently instead: its statements wait for a
lock at most ``lock_wait`` (a share of the lease), and a dead connection errors out within
the engine's TCP keepalives and ``tcp_user_timeout`` (app/config.py); either is a failure.
Meanwhile the delivery threads stay blocked on their outcome, and the worker claims nothing
(``healthy`` is clear), so no new SMTP transaction starts. It logs once per state change
(failing, a different error, back), naming the error's class and SQLSTATE.

An outcome the database refuses for another reason (a bug, a value it cannot store) is tried
``REFUSED_TRIES`` times, then given up with its traceback: its leases stay and expire, as a
crash would leave them, so one bad outcome cannot stop all delivery.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from flask import Flask

from ..database import (
    bound_lock_waits,
    describe_error,
    error_code,
    is_transient_conflict,
    is_unreachable,
    unit_of_work,
)
from ..queue.leases import renew_leases
from ..queue.outcomes import Attempt
from .outcomes import NotRecorded, OutcomePolicy, record_outcomes

log = logging.getLogger("elemta.delivery")

BACKOFF_FIRST = 0.25  # seconds before the first retry of a failed write
BACKOFF_MAX = 4.0  # the longest wait between two tries: the delay after the database is back
REFUSED_TRIES = 3
# How long a group waits at most for the outcomes of the threads the last commit released
# (``Recorder._gather``), so that one commit serves all the threads: committing as soon as one
# outcome arrived made groups of 3-4 and halved the benchmark's throughput (bench delivery,
# 2,000 messages on SQLite: 110 msg/s with no wait, 227 with 10 ms, 279 with 30 ms). It costs
# a thread at most this long per transaction when a thread released with it is slow (a remote
# server taking seconds); a job begun before the last commit is not waited for.
GATHER_MAX = 0.03
# The longest a recorder's statement waits for a lock (PostgreSQL ``lock_timeout``): a share of
# the lease, capped. A write stuck behind a lock past it fails as a transient conflict and takes
# the outage path (leases renewed, outcomes held, tried again); without a bound it waited
# silently, and past the lease another worker could claim and send again what was delivered.
# A dead connection is bounded by the engine's TCP keepalives and tcp_user_timeout
# (app/config.py). docs/DELIVERY.md, "A write that hangs".
LOCK_WAIT_SHARE = 0.1
LOCK_WAIT_MAX = 30.0


def lock_wait_for(lease_seconds: float) -> float:
    """The recorder's bound on a lock wait for a lease of ``lease_seconds``."""
    return min(LOCK_WAIT_MAX, lease_seconds * LOCK_WAIT_SHARE)


class Outcome:
    """An attempt waiting to be recorded, and the lock its delivery thread waits on.

    ``done`` is a plain lock used as a one-shot: taken when the outcome is made, released
    once by the recorder when the outcome is committed or given up; the delivery thread waits
    by taking it. A ``threading.Event`` is a Condition with a lock of its own, and its wait
    and set cost several Python calls and a second lock each; a lock's acquire and release
    are one C call each (docs/PERFORMANCE.md, "Delivery, the recorder's fixed cost a commit").
    """

    __slots__ = ("attempt", "done", "thread", "recorded")

    def __init__(self, attempt: Attempt) -> None:
        self.attempt = attempt
        self.done = threading.Lock()
        self.done.acquire()
        self.thread = threading.get_ident()  # the delivery thread's
        self.recorded = False

    def wait(self) -> None:
        self.done.acquire()

    def release(self) -> None:
        self.done.release()

    def recipient_ids(self) -> list[int]:
        return [r.recipient_id for r in self.attempt.results]


class Recorder:
    """Group commit of delivery outcomes, with waiting for the database (module docstring)."""

    def __init__(self, app: Flask, worker_id: str, policy: OutcomePolicy,
                 lease_seconds: int) -> None:
        self.app = app
        self.worker_id = worker_id
        self.policy = policy
        self.lease_seconds = lease_seconds
        self.lock_wait = lock_wait_for(lease_seconds)  # seconds, each write's statements
        self.recorded_attempts = 0  # only the recorder thread writes it
        self.transactions = 0  # commits that recorded them (for the log and the bench)
        # Delivery threads with a job begun whose outcome is not handed over yet, and those
        # the last commit woke (``_gather``).
        self._running: set[int] = set()
        self._released: frozenset[int] = frozenset()
        self._running_lock = threading.Lock()
        self.healthy = threading.Event()  # clear while outcomes wait for the database
        self.healthy.set()
        # The hand-over: a SimpleQueue (in C: a put or get is one call, where queue.Queue
        # takes a Condition's lock and notifies in Python), and the count of outcomes handed
        # over and not yet committed or given up (``busy``), kept under ``_running_lock``,
        # which ``record`` takes anyway.
        self._queue: queue.SimpleQueue[Outcome | None] = queue.SimpleQueue()
        self._unsettled = 0
        self._held: list[Outcome] = []
        self._give_up_at: float | None = None
        self._ending = False
        self._closed = False  # the recorder thread ended: nothing records what comes now
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="elemta-recorder")

    # --------------------------------------------------------- the delivery threads' side

    def begin(self) -> None:
        """A delivery thread starts a job: its outcome (``record``) or ``abandon`` follows."""
        with self._running_lock:
            self._running.add(threading.get_ident())

    def abandon(self) -> None:
        """The job begun ends without an outcome (its claim given back, its message gone)."""
        with self._running_lock:
            self._running.discard(threading.get_ident())

    def record(self, attempt: Attempt) -> bool:
        """Hand an attempt over and wait until it is committed; False if it was given up."""
        outcome = Outcome(attempt)
        with self._running_lock:
            self._running.discard(outcome.thread)
            if self._closed:
                # A job still running when the shutdown grace ended: the recorder is gone,
                # its leases expire (as after a crash; docs/DELIVERY.md).
                return False
            self._unsettled += 1
            self._queue.put(outcome)  # under the lock: the end of ``_run`` finds it
        outcome.wait()
        return outcome.recorded

    def is_healthy(self) -> bool:
        return self.healthy.is_set()

    @property
    def busy(self) -> bool:
        """Outcomes are queued or being written (recording may still free work: a bounce)."""
        return self._unsettled > 0

    # --------------------------------------------------------- the worker's side

    def start(self) -> None:
        self._thread.start()

    def give_up_after(self, deadline: float) -> None:
        """Stopping: outcomes still unwritable at ``deadline`` (monotonic) are given up, their
        leases left to expire (as after a crash), so the process can end."""
        self._give_up_at = deadline
        self._wake.set()

    def close(self, timeout: float) -> None:
        """Record what is queued, then end the thread (after ``give_up_after``)."""
        self._queue.put(None)
        self._thread.join(timeout)

    # --------------------------------------------------------- the recorder thread

    def _run(self) -> None:
        # One app context for the thread's life (``_record``: a session a group within it).
        with self.app.app_context():
            while not (self._ending and not self._held):
                if not self._held and not self._ending:
                    self._take(self._queue.get())
                    self._gather()
                self._take_queued()
                self._write_held()
        # Jobs still running after the shutdown grace (``Worker._shutdown``) hand their
        # outcomes over later: they would wait for ever for a commit nothing makes, and the
        # process, which joins the delivery threads at exit, would never end. Given up.
        with self._running_lock:
            self._closed = True
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                self._settled(1)
                item.release()

    def _gather(self) -> None:
        """Wait (at most ``GATHER_MAX``) for the outcomes of the threads the last commit
        released: they went straight on to their next transaction, and their outcomes come
        back together, so one commit serves them all (about twice as many outcomes per commit
        as committing whatever has come). A job still under way from before (a slow remote
        server) is not waited for: its outcome joins a later group."""
        deadline = time.monotonic() + GATHER_MAX
        while not self._ending:
            with self._running_lock:
                awaited = self._released & self._running  # on a job, not handed over yet
            if not awaited:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            try:
                self._take(self._queue.get(timeout=remaining))
            except queue.Empty:
                return

    def _take(self, item: Outcome | None) -> None:
        if item is None:
            self._ending = True  # every outcome handed over before it is held now
        else:
            self._held.append(item)

    def _take_queued(self) -> None:
        """Hold everything queued meanwhile: it goes in the same transaction."""
        while True:
            try:
                self._take(self._queue.get_nowait())
            except queue.Empty:
                return

    def _write_held(self) -> None:
        """Write the held outcomes; on failure keep them, wait and try again (docstring)."""
        pause = BACKOFF_FIRST
        failing: tuple[str, object] | None = None  # the error being waited out, as logged
        refused = 0
        outage_started = 0.0
        while self._held:
            error = self._try_write(renew=failing is not None)
            for outcome in self._held:
                outcome.attempt.retried = True
            if error is None:
                if failing is not None:
                    log.warning("database back: recorded the held delivery outcomes after "
                                "%.1f s; delivery resumes", time.monotonic() - outage_started)
                    self.healthy.set()
                return
            waiting_out = is_unreachable(error) or is_transient_conflict(error)
            if not waiting_out:
                refused += 1
                if refused >= REFUSED_TRIES:
                    self._give_up(error)
                    return
            key = (type(error).__name__, error_code(error))
            if key != failing:
                if failing is None:
                    outage_started = time.monotonic()
                log.warning("recording %d delivery outcome(s) failed: %s; %s", len(self._held),
                            describe_error(error),
                            "keeping them and their leases, delivery paused, waiting for the "
                            "database" if waiting_out else "trying again")
                failing = key
                self.healthy.clear()
            if self._give_up_at is not None and time.monotonic() >= self._give_up_at:
                self._give_up(error)
                return
            self._wake.wait(pause)
            self._wake.clear()
            pause = min(pause * 2, BACKOFF_MAX)
            # Threads that finished meanwhile (none start while paused) join the next write.
            self._take_queued()

    def _try_write(self, *, renew: bool) -> BaseException | None:
        """One try; the error, or None when every held outcome is committed."""
        try:
            if renew:
                # First of all keep the leases: an outage longer than the lease would
                # otherwise let another worker claim (and send again) what was delivered.
                with unit_of_work(self.app) as session:
                    bound_lock_waits(session.connection(), self.lock_wait)
                    renew_leases(session, self.worker_id,
                                 [i for o in self._held for i in o.recipient_ids()],
                                 lease_seconds=self.lease_seconds)
            self._record([o.attempt for o in self._held])
        except NotRecorded as exc:
            unrecorded = {id(a) for a in exc.unrecorded}
            self._finish([o for o in self._held if id(o.attempt) not in unrecorded])
            self._held = [o for o in self._held if id(o.attempt) in unrecorded]
            return exc.cause
        except Exception as exc:  # noqa: BLE001 - judged and logged by the caller
            return exc
        self._finish(self._held)
        self._held = []
        return None

    def _record(self, attempts: list[Attempt]) -> None:
        """``record_outcomes`` in a session of its own, in the thread's app context: what
        ``unit_of_work`` does, without pushing an app context a group and without its final
        commit (``record_outcomes`` commits, or rolls back and raises, itself; an empty commit
        after it cost a session transaction's begin and end a group)."""
        scoped = self.app.extensions["sqlalchemy"].session
        session = scoped()
        try:
            record_outcomes(session, self.worker_id, attempts, self.policy,
                            lock_wait=self.lock_wait)
        except BaseException:
            session.rollback()
            raise
        finally:
            scoped.remove()

    def _finish(self, outcomes: list[Outcome]) -> None:
        self.recorded_attempts += len(outcomes)
        self.transactions += 1
        self._released = frozenset(o.thread for o in outcomes)
        self._settled(len(outcomes))
        for outcome in outcomes:
            outcome.recorded = True
            outcome.release()

    def _settled(self, count: int) -> None:
        with self._running_lock:
            self._unsettled -= count

    def _give_up(self, error: BaseException) -> None:
        count = sum(len(o.attempt.results) for o in self._held)
        log.error("giving up recording %d delivery outcome(s) of %d recipient(s): %s; their "
                  "leases stay and expire, then they are delivered again", len(self._held),
                  count, describe_error(error), exc_info=error)
        self._settled(len(self._held))
        for outcome in self._held:
            outcome.release()
        self._held = []
        self.healthy.set()

"""The RCPT check of all sessions, coalesced: one storage-thread run and one statement answer
every RCPT that arrived while the previous run was busy.

Profiling showed the storage threads at two thirds of the listener's CPU, much of it one
hand-off to a thread and one statement per RCPT. Here a check that finds no run under way
starts one at once (no timer: a lone RCPT is answered as soon as before); checks that arrive
while a run is busy wait in ``_waiting``, and the next run takes them all (up to
``intake.MAX_CHECKS``) when its thread starts, not when it is handed over, so checks that
arrive while it waits for a free thread join it too. ``intake.refusals_of`` gives each
check exactly the reply ``intake.refusal`` would have given it. One run at a time per
listener process: the batch grows with the load instead of the runs.

The same on SQLite and PostgreSQL (``Storage.run_check`` commits each run; on PostgreSQL its
connection is in autocommit). When a run fails every check it took gets the error, and
``Storage.run_check`` discards the connection, as for a single check before.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from ..control.intake import MAX_CHECKS, refusals_of

log = logging.getLogger("elemta.smtpd")

RunCheck = Callable[..., Awaitable[Any]]  # Storage.run_check


@dataclass(frozen=True)
class _Waiting:
    sender: str
    address: str
    reply: asyncio.Future[str | None]


class RecipientChecks:
    """``refusal(sender, address)`` for the sessions of one event loop, coalesced."""

    def __init__(self, run_check: RunCheck) -> None:
        self._run_check = run_check  # Storage.run_check: func(connection) on a storage thread
        self._waiting: list[_Waiting] = []
        self._lock = threading.Lock()  # _waiting: appended on the loop, taken on a thread
        self._running = False  # only read and set on the loop: no lost wake-up
        self.runs = 0
        self.checks = 0

    async def refusal(self, sender: str, address: str) -> str | None:
        """The reply refusing ``address`` from ``sender`` (``intake.refusal``), or None."""
        reply: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        with self._lock:
            self._waiting.append(_Waiting(sender, address, reply))
        if not self._running:
            self._running = True
            asyncio.get_running_loop().create_task(self._run_while_waiting())
        return await reply

    async def _run_while_waiting(self) -> None:
        try:
            while True:
                await self._run_once()
                with self._lock:
                    if not self._waiting:
                        return
        finally:
            self._running = False
            self._cancel_left()

    async def _run_once(self) -> None:
        taken: list[_Waiting] = []
        results: list[tuple[_Waiting, str | None]] = []

        def check(connection: sa.Connection) -> None:
            taken.extend(self._take())
            replies = refusals_of(connection, [(w.sender, w.address) for w in taken])
            # Handed back through the closure (``taken`` too, for the error case): read on the
            # loop once the run is over.
            results.extend(zip(taken, replies, strict=True))

        try:
            await self._run_check(check)
        except Exception as exc:
            # Failed before ``check`` took its checks (no connection: the database is
            # unreachable)? Those it would have taken get the error all the same.
            for waiting in taken or self._take():
                _settle(waiting.reply, error=exc)
            return
        except BaseException:  # cancelled (the loop is closing): nobody is left to answer
            for waiting in taken:
                waiting.reply.cancel()
            raise
        self.runs += 1
        self.checks += len(results)
        for waiting, reply in results:
            _settle(waiting.reply, reply=reply)

    def _take(self) -> list[_Waiting]:
        with self._lock:
            taken = self._waiting[:MAX_CHECKS]
            del self._waiting[:MAX_CHECKS]
        return taken

    def _cancel_left(self) -> None:
        """Checks still waiting when the runs stop for good (cancelled): never left hanging.
        (After a normal last run none are left: they are only added on the loop.)"""
        with self._lock:
            left, self._waiting = self._waiting, []
        for waiting in left:
            waiting.reply.cancel()

    def log_summary(self) -> None:
        if self.runs:
            log.info("RCPT checks: %d in %d runs (%.2f a run)", self.checks, self.runs,
                     self.checks / self.runs)


def _settle(future: asyncio.Future[str | None], *, reply: str | None = None,
            error: BaseException | None = None) -> None:
    if future.done():  # its session was cancelled meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(reply)

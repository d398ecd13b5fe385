"""Reads coalesced within a process: the requests that want the same value at the same time
share one read, and none of them takes a value read before it arrived.

Under load many request threads of one gunicorn worker ask for the queue counts at once; each
read is a database round trip (docs/PERFORMANCE.md, "HTTP, the stats read on the driver").
``ReadCoalescer.read(read)`` runs ``read`` for a *generation* of callers:

- A caller that finds no read running starts one at once, in its own thread (its own request's
  app context and session), and is that generation's leader: a lone request reads as before.
- Callers that arrive while a read is running must not take its value (it may predate a write
  they saw committed), so they join the *next* generation. Its first caller is its leader: it
  waits for the running read to end and then reads for all of them. Callers keep joining it
  until its leader starts the read; from then on, arrivals form the generation after.
- At most one read runs at a time, and every caller takes the value of a read that started
  after it arrived (linearizable: a client that committed a write and then asks sees it).
- Each caller gets its own copy of the value (``copy``). When the read raises, every caller of
  that generation raises the error (a copy each, the leader's as its ``__cause__``; the leader
  its own) and the next caller reads afresh: a failure is never kept.

No wait is longer than a read: the leader ends its generation in a ``finally``, whatever it
raised, and the locks are held only to look at and change the two generations, never across a
read or a wait. The precedent, for asyncio: ``app.smtpd.recipient_checks``.
"""

from __future__ import annotations

import copy as copying
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class _Generation(Generic[T]):
    """The callers one read answers."""

    __slots__ = ("callers", "done", "error", "value")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.callers = 1
        self.value: T | None = None
        self.error: BaseException | None = None


class ReadCoalescer(Generic[T]):
    """One read at a time for the concurrent callers of one process (module docstring)."""

    def __init__(self, name: str, copy: Callable[[T], T] = copying.copy) -> None:
        self.name = name
        self._copy = copy
        self._lock = threading.Lock()
        self._running: _Generation[T] | None = None  # its read has started
        self._forming: _Generation[T] | None = None  # waits for _running; its read has not
        self.reads = 0  # reads run (started)
        self.callers = 0  # calls of read()

    def read(self, read: Callable[[], T]) -> T:
        """``read()``'s value, from a read that started after this call began."""
        with self._lock:
            self.callers += 1
            generation = self._forming
            previous: _Generation[T] | None = None
            if generation is not None:  # the next read, not started yet: wait for it
                generation.callers += 1
                leads = False
            else:
                generation = _Generation()
                leads = True
                previous = self._running
                if previous is None:  # nothing running: read now
                    self._running = generation
                    self.reads += 1
                else:  # the running read may predate this call: lead the next one
                    self._forming = generation
        if not leads:
            generation.done.wait()  # set by the leader, whatever its read did
            if generation.error is not None:
                raise _own_copy(generation.error)
            return self._copy(generation.value)  # type: ignore[arg-type]
        if previous is not None:
            previous.done.wait()
            with self._lock:  # closed: later callers form the generation after this one
                self._forming = None
                self._running = generation
                self.reads += 1
        try:
            generation.value = read()
        except BaseException as error:
            generation.error = error
            raise
        finally:
            with self._lock:
                self._running = None
            generation.done.set()
        return self._copy(generation.value)


def _own_copy(error: BaseException) -> BaseException:
    """A copy of ``error`` for one more thread to raise (a raise rewrites the exception's
    traceback), caused by ``error``; the error itself when it cannot be copied."""
    try:
        copied = copying.copy(error)
    except Exception:
        return error
    copied.__cause__ = error
    return copied

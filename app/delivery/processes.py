"""``flask worker --processes N``: N delivery worker processes under one supervisor.

One worker process is one Python interpreter: its claims, SMTP transactions and outcome
recording share one GIL, so it uses about one core whatever its ``WORKER_CONCURRENCY``
(docs/PERFORMANCE.md, issue 13). Worker processes already share the queue through their
leases (each claims disjoint recipients, each records its own outcomes, each has its own
worker id and heartbeat), so more processes are more cores, with every guarantee of one.

The supervisor forks the workers once the application is loaded (the children start
without importing or configuring anything again), then only waits for them:

- SIGTERM or SIGINT (Ctrl-C, which the terminal also sends to the children) is passed on to
  every child as SIGTERM; each finishes its transactions under way and gives back what it has
  not started (``Worker.stop``), and the supervisor exits once all have.
- A child that ends otherwise (killed, crashed) is started again; one that keeps dying within
  ``RESTART_QUICK`` seconds of its start waits longer each time (up to ``RESTART_BACKOFF_MAX``).
  What it held is what a ``kill -9`` of a single worker leaves: its leases expire and are
  claimed again (docs/DELIVERY.md).
- With ``--once`` a child that finds nothing more due exits 0 and is not replaced; the
  supervisor exits when all have.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from types import FrameType

log = logging.getLogger("elemta.delivery")

RESTART_QUICK = 5.0  # a child that died sooner than this after its start was "quick"
RESTART_BACKOFF_MAX = 30.0


def supervise(count: int, run_child: Callable[[], int], *, once: bool) -> int:
    """Fork ``count`` children running ``run_child`` (it returns the exit status) and keep
    them running until SIGTERM/SIGINT (or, with ``once``, until each ended normally)."""
    children: dict[int, float] = {}  # pid -> monotonic start
    stopping = False
    pause = 1.0

    def stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def start() -> None:
        _flush_streams()
        pid = os.fork()
        if pid == 0:
            _child(run_child)  # never returns
        children[pid] = time.monotonic()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for _ in range(count):
            start()
        log.info("delivery worker supervisor %d started %d worker process(es): %s",
                 os.getpid(), count, ", ".join(str(pid) for pid in children))
        while children:
            try:
                pid, status = os.wait()
            except ChildProcessError:  # pragma: no cover - every child was reaped already
                break
            started = children.pop(pid, None)
            if started is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            if stopping or (once and code == 0):
                continue
            lived = time.monotonic() - started
            pause = min(pause * 2, RESTART_BACKOFF_MAX) if lived < RESTART_QUICK else 1.0
            log.warning("delivery worker process %d %s after %.1f s; starting another%s", pid,
                        f"was killed by signal {-code}" if code < 0 else f"exited with {code}",
                        lived, f" in {pause:.0f} s" if lived < RESTART_QUICK else "")
            if lived < RESTART_QUICK:
                _sleep_unless(lambda: stopping, pause)
                if stopping:
                    continue
            start()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("delivery worker supervisor %d stopped", os.getpid())
    return 0


def _child(run_child: Callable[[], int]) -> None:
    """The forked child: run the worker, then leave without running the parent's code."""
    code = 1
    try:
        # The supervisor's handlers are not this process's: run_child installs its own.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        code = run_child()
    except BaseException:  # noqa: BLE001 - the child must not return into the supervisor
        log.exception("delivery worker process %d failed", os.getpid())
    finally:
        try:
            from ..logs.handler import shutdown_database_logging

            shutdown_database_logging()
            logging.shutdown()
            _flush_streams()
        finally:
            os._exit(code)


def _flush_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001, S110 - a closed stream: nothing to flush
            pass


def _sleep_unless(stopped: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not stopped() and time.monotonic() < deadline:
        time.sleep(min(0.1, deadline - time.monotonic()))

"""``flask worker [--once] [--processes N]``: the delivery worker (API.md §10)."""

from __future__ import annotations

import os
import signal
import sys

import click
from flask import Flask, current_app
from flask.cli import with_appcontext

from .worker import Worker


@click.command("worker")
@click.option("--once", is_flag=True,
              help="Deliver everything that is due now, then exit (scripts and tests).")
@click.option("--processes", type=click.IntRange(min=0), default=None,
              help="Worker processes to run (default: ELEMTA_WORKER_PROCESSES, 1); 0: one per "
                   "CPU core. More than one: a supervisor forks them and restarts any that dies.")
@with_appcontext
def worker_cmd(once: bool, processes: int | None) -> None:
    """Run the delivery worker: claim due mail, deliver it over SMTP, record every outcome.

    SIGTERM or Ctrl-C: finish the SMTP transactions under way (at most 30 s), give back
    unstarted claims, exit 0 (with --processes, every worker process does so).
    """
    # The app itself, not the proxy: Flask types current_app as Flask, not as a LocalProxy.
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    count = worker_processes(app, processes)
    if count == 1:
        sys.exit(run_worker(app, once))
    from .processes import supervise

    sys.exit(supervise(count, lambda: run_worker(app, once, forked=True), once=once))


def worker_processes(app: Flask, requested: int | None) -> int:
    """How many worker processes: the option, else the setting; 0 is one per CPU core."""
    count = int(app.config["WORKER_PROCESSES"]) if requested is None else requested
    return count or os.cpu_count() or 1


def run_worker(app: Flask, once: bool, *, forked: bool = False) -> int:
    """One worker in this process until SIGTERM/SIGINT (or, ``once``, nothing due)."""
    if forked:
        # Connections the supervisor may have opened are not this process's to use.
        from ..extensions import db

        with app.app_context():
            db.engine.dispose(close=False)
    worker = Worker(app)

    def _stop(_signum: int, _frame: object) -> None:
        worker.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    return worker.run(once=once)

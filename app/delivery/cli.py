"""``flask worker [--once]``: the delivery worker (SPEC 10)."""

from __future__ import annotations

import signal
import sys

import click
from flask import current_app
from flask.cli import with_appcontext

from .worker import Worker


@click.command("worker")
@click.option("--once", is_flag=True,
              help="Deliver everything that is due now, then exit (scripts and tests).")
@with_appcontext
def worker_cmd(once: bool) -> None:
    """Run the delivery worker: claim due mail, deliver it over SMTP, record every outcome.

    SIGTERM or Ctrl-C: finish the SMTP transactions under way (at most 30 s), give back
    unstarted claims, exit 0.
    """
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    worker = Worker(app)

    def _stop(_signum: int, _frame: object) -> None:
        worker.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    sys.exit(worker.run(once=once))

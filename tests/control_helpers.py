"""A controllable clock and two-destination set-ups for the delivery-control tests."""

from __future__ import annotations

import datetime as dt
import threading
from typing import Any

from flask import Flask

from app.delivery.worker import Worker
from app.extensions import db
from app.timeutil import utcnow
from tests.delivery_helpers import FakeResolver
from tests.helpers import queue_message


class Clock:
    """What the workers (and the services under test) take for now; moved by hand."""

    def __init__(self, start: dt.datetime | None = None) -> None:
        self.now = start or utcnow()
        self.lock = threading.Lock()

    def __call__(self) -> dt.datetime:
        with self.lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self.lock:
            self.now += dt.timedelta(seconds=seconds)


def resolver_for(routes: dict[str, str]) -> FakeResolver:
    """MX records sending each domain to the peer at the given loopback address."""
    records: dict[tuple[str, str], Any] = {}
    for domain, host in routes.items():
        records[(domain, "MX")] = [f"10 mx.{domain}."]
        records[(f"mx.{domain}", "A")] = [host]
    return FakeResolver(records)


def queue_to(app: Flask, domain: str, count: int) -> list[str]:
    with app.app_context():
        ids = [queue_message(db.session, recipients=(f"user{i}@{domain}",))
               for i in range(count)]
        db.session.remove()
    return ids


def run_workers(app: Flask, resolver: FakeResolver, clock: Clock, count: int = 2) -> None:
    """``count`` workers side by side, each until nothing is due (``--once``)."""
    workers = [Worker(app, resolver=resolver, clock=clock) for _ in range(count)]
    threads = [threading.Thread(target=w.run, kwargs={"once": True}) for w in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(t.is_alive() for t in threads)

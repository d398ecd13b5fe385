"""``run_worker`` (``flask worker``): what it sets up for the process before the loop runs."""

from __future__ import annotations

import signal
import sys

from app.delivery import cli


class FakeWorker:
    seen = 0.0

    def __init__(self, app: object) -> None:
        pass

    def stop(self) -> None:  # pragma: no cover - not signalled here
        pass

    def run(self, once: bool = False) -> int:
        FakeWorker.seen = sys.getswitchinterval()
        return 0


def test_the_worker_process_switches_threads_sooner_than_the_default(monkeypatch):
    """The delivery threads wake together when the recorder commits; the worker's process
    hands the GIL over every SWITCH_INTERVAL (0.5 ms), not CPython's 5 ms."""
    before = sys.getswitchinterval()
    monkeypatch.setattr(cli, "Worker", FakeWorker)
    monkeypatch.setattr(signal, "signal", lambda *args: None)
    try:
        assert cli.run_worker(object(), once=True) == 0  # type: ignore[arg-type]
        assert FakeWorker.seen == cli.SWITCH_INTERVAL
        assert cli.SWITCH_INTERVAL < 0.005
    finally:
        sys.setswitchinterval(before)

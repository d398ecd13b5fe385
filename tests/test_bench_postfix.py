"""The Postfix side-by-side benchmark stops waiting for a worker that has exited, and reads
the settings of a variant side (issue 13).

``bench/suite_postfix.py`` times ``flask worker --once`` from its start to the first delivery.
A worker that exits before delivering anything (a refused setting, a crash) used to be waited
for until the half-hour timeout: ``make bench-quick`` seemed to hang. It now stops at the
worker's exit and says why.
"""

from __future__ import annotations

import os
import threading

import pytest
import sqlalchemy as sa

from bench import suite_postfix
from bench.suite_postfix import ElemtaSide
from tests.delivery_helpers import bulk_queue


@pytest.mark.slow
def test_delivery_stops_waiting_when_the_worker_exits_before_delivering(app, database_url):
    bulk_queue(app, 1)
    side = ElemtaSide("test", database_url, smtp_port=0, sink_port=0)
    side.env = {k: v for k, v in os.environ.items() if not k.startswith("ELEMTA_")}
    # A refused setting: the worker exits at once (status 2) without delivering anything.
    side.env.update({"FLASK_APP": "wsgi.py", "ELEMTA_DATABASE_URL": database_url,
                     "ELEMTA_RELAY_HOST": "127.0.0.1:notaport"})
    side.monitor = sa.create_engine(database_url)
    raised: list[BaseException] = []

    def deliver() -> None:
        try:
            side.deliver(1)
        except BaseException as exc:  # noqa: BLE001  (reported to the test's thread)
            raised.append(exc)

    waiter = threading.Thread(target=deliver, daemon=True)  # without the fix: waits 30 min
    try:
        waiter.start()
        waiter.join(90)
        assert not waiter.is_alive(), "still waiting for a worker that has exited"
    finally:
        side.monitor.dispose()
    assert len(raised) == 1 and isinstance(raised[0], RuntimeError)
    assert "exited (2) before delivering any of the 1 queued" in str(raised[0])
    assert "ELEMTA_RELAY_HOST" in str(raised[0])


def test_a_variant_is_elemta_settings_by_name():
    assert suite_postfix.variant_settings(
        "ELEMTA_SMTPD_PROCESSES=2, ELEMTA_WORKER_PROCESSES=2") == {
        "ELEMTA_SMTPD_PROCESSES": "2", "ELEMTA_WORKER_PROCESSES": "2"}
    assert suite_postfix.variant_settings("") == {}


@pytest.mark.parametrize("text", ["ELEMTA_SMTPD_PROCESSES", "SMTPD_PROCESSES=2", "PATH=/tmp"])
def test_a_variant_refuses_what_is_not_an_elemta_setting(text):
    with pytest.raises(SystemExit, match="not ELEMTA_NAME=VALUE"):
        suite_postfix.variant_settings(text)

"""API.md §5: /metrics, in one process and summed over several gunicorn workers."""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from flask.testing import FlaskClient
from prometheus_client import REGISTRY
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from app.events import record_event
from app.metrics import observe_delivery_latency
from app.timeutil import utcnow
from tests.helpers import queue_message

ROOT = Path(__file__).resolve().parent.parent


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found, name: str, **labels: str) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))


def test_queue_outcome_and_build_figures_are_read_at_scrape_time(client, session) -> None:
    an_hour_ago = utcnow() - dt.timedelta(hours=1)
    queue_message(session, created_at=an_hour_ago)
    queue_message(session)
    queue_message(session, state="deferred")
    message_id = queue_message(session, state="failed")
    for event_type in ("delivery", "delivery", "tempfail", "rejection"):
        record_event(session, event_type, message_id=message_id, recipient="bob@example.net",
                     message="outcome")
    session.commit()

    response = client.get("/metrics")

    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    found = samples(response.get_data(as_text=True))
    assert value(found, "elemta_queue_messages", state="pending") == 2
    assert value(found, "elemta_queue_messages", state="deferred") == 1
    assert value(found, "elemta_queue_messages", state="held") == 0
    assert value(found, "elemta_queue_messages", state="failed") == 1
    assert value(found, "elemta_queue_oldest_message_age_seconds", state="pending") >= 3600
    assert value(found, "elemta_queue_oldest_message_age_seconds", state="deferred") < 3600
    assert value(found, "elemta_queue_oldest_message_age_seconds", state="held") == 0
    assert value(found, "elemta_delivery_outcomes_total", outcome="delivered") == 2
    assert value(found, "elemta_delivery_outcomes_total", outcome="deferred") == 1
    assert value(found, "elemta_delivery_outcomes_total", outcome="failed") == 1
    assert value(found, "elemta_database_up") == 1
    from app import __version__

    build = [k for k in found if k[0] == "elemta_build_info"]
    assert len(build) == 1 and ("version", __version__) in build[0][1]


def test_request_durations_by_endpoint_method_and_status(client) -> None:
    rule = "/api/queue/message/<string:message_id>"

    def count() -> float:
        return REGISTRY.get_sample_value("elemta_http_request_duration_seconds_count",
                                         {"endpoint": rule, "method": "GET", "status": "404"}) or 0

    before = count()
    client.get("/api/queue/message/msg-doesnotexist1")
    client.get("/api/queue/message/msg-doesnotexist2")
    assert count() == before + 2
    found = samples(client.get("/metrics").get_data(as_text=True))
    assert value(found, "elemta_http_request_duration_seconds_count",
                 endpoint=rule, method="GET", status="404") == before + 2


def test_delivery_latency_histogram() -> None:
    def sample(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0

    count, under_5s = (sample("elemta_delivery_latency_seconds_count"),
                       sample("elemta_delivery_latency_seconds_bucket", le="5.0"))
    observe_delivery_latency(0.3)
    observe_delivery_latency(120)
    assert sample("elemta_delivery_latency_seconds_count") == count + 2
    assert sample("elemta_delivery_latency_seconds_bucket", le="5.0") == under_5s + 1


def test_scrape_still_answers_when_the_database_is_down(make_app, tmp_path) -> None:
    app = make_app(database_url=f"sqlite:///{tmp_path}/missing/elemta.db")
    # No API key: checking one would need the database (reads are open in the default mode).
    response = FlaskClient(app, app.response_class).get("/metrics")
    assert response.status_code == 200
    found = samples(response.get_data(as_text=True))
    assert value(found, "elemta_database_up") == 0
    assert not [k for k in found if k[0] == "elemta_queue_messages"]


# --------------------------------------------------------------------------- under gunicorn


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers={"Connection": "close"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, dict(error.headers), error.read()


def _per_process_livez_counts(directory: Path) -> dict[int, float]:
    counts = {}
    for path in glob.glob(str(directory / "histogram_*.db")):
        pid = int(Path(path).stem.rpartition("_")[2])
        for metric in MultiProcessCollector.merge([path]):
            for s in metric.samples:
                if (s.name == "elemta_http_request_duration_seconds_count"
                        and s.labels.get("endpoint") == "/livez"):
                    counts[pid] = counts.get(pid, 0) + s.value
    return counts


def _wait_until_up(base: str, process: subprocess.Popen) -> None:
    for _ in range(300):
        if process.poll() is not None:
            pytest.fail(f"gunicorn exited with {process.returncode}")
        try:
            if _get(base + "/livez")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    pytest.fail("gunicorn did not answer")


def test_two_gunicorn_workers_add_up(database_url: str, tmp_path: Path) -> None:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    metrics_dir = tmp_path / "prometheus"
    env = {**os.environ, "ELEMTA_DATABASE_URL": database_url, "ELEMTA_API_LISTEN":
           f"127.0.0.1:{port}", "WEB_CONCURRENCY": "2", "ELEMTA_API_THREADS": "8",
           "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    env.pop("ELEMTA_STARTED_AT", None)
    gunicorn = os.path.join(os.path.dirname(sys.executable), "gunicorn")
    log_path = tmp_path / "gunicorn.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([gunicorn, "-c", "gunicorn.conf.py", "wsgi:app"], cwd=ROOT,
                                   env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_until_up(base, process)  # its /livez is counted too
        sent = 1
        request_ids = set()
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            # Parallel fresh connections spread over both workers; go on until both served.
            for _ in range(40):
                for status, headers, _body in pool.map(lambda _: _get(base + "/livez"),
                                                       range(50)):
                    assert status == 200
                    request_ids.add(headers["X-Request-ID"])
                sent += 50
                if len(_per_process_livez_counts(metrics_dir)) >= 2:
                    break
        per_process = _per_process_livez_counts(metrics_dir)
        assert len(per_process) == 2, per_process
        assert all(n > 0 for n in per_process.values())

        status, headers, body = _get(base + "/metrics")
        assert status == 200
        found = samples(body.decode())
        scraped = value(found, "elemta_http_request_duration_seconds_count",
                        endpoint="/livez", method="GET", status="200")
        assert scraped == sent == sum(per_process.values())
        assert value(found, "elemta_database_up") == 1
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)

    # Every line gunicorn and the app wrote is JSON; access lines carry the request id.
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    access = [line for line in lines if line["logger"] == "gunicorn.access"]
    assert {line["request_id"] for line in access if line["path"] == "/livez"} >= request_ids
    assert all(line["role"] == "api" for line in lines)
    assert any(line["logger"] == "gunicorn.error" for line in lines)


def test_websocket_streams_are_not_request_durations(client) -> None:
    def count() -> float:
        labels = {"endpoint": "/livez", "method": "GET", "status": "200"}
        return REGISTRY.get_sample_value("elemta_http_request_duration_seconds_count",
                                         labels) or 0

    before = count()
    client.get("/livez", headers={"Upgrade": "websocket"})
    client.get("/livez")
    assert count() == before + 1

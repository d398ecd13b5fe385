"""The OpenAPI document describes what the server accepts: no looser, no tighter.

Generated clients and fuzzers only know the document; where it was looser than the server
(a free-form ``{queue_type}``, optional ``details``, unconstrained mailboxes) they could not
form a valid request, nor tell a right answer from a wrong one.
"""

from __future__ import annotations

import re

import pytest

from app.queue.actions import BULK_TYPES
from app.queue.reading import LIST_TYPES
from app.stream.position import MAX_ROW_ID

CANDIDATE_TYPES = (*LIST_TYPES, "ws", "message", "stats", "bogus", "ALL")


@pytest.fixture
def document(client):
    return client.get("/api/openapi.json").get_json()


def _path_enum(document, path, method):
    item = document["paths"][path]
    [param] = [p for p in item.get("parameters", []) + item[method].get("parameters", [])
               if p["in"] == "path" and p["name"] == "queue_type"]
    assert param["required"] is True
    return param["schema"]["enum"]


def _type_refused(response) -> bool:
    body = response.get_json()
    return response.status_code == 400 and "type" in (body.get("details") or {})


# `defer` is only the rules' verb (docs/DELIVERY.md), not an HTTP route.
@pytest.mark.parametrize("action", [None, *(a for a in BULK_TYPES if a != "defer")])
def test_queue_type_enum_is_exactly_what_the_server_accepts(client, document, action):
    path = "/api/queue/{queue_type}" + (f"/{action}" if action else "")
    method = "post" if action else "get"
    enum = _path_enum(document, path, method)
    for candidate in CANDIDATE_TYPES:
        url = path.replace("{queue_type}", candidate)
        if action:
            response = client.post(url, query_string={"dry_run": "true"})
        else:
            response = client.get(url)
        if candidate in enum:
            assert response.status_code == 200, (url, response.get_json())
        elif not (candidate in ("ws", "stats", "message") and not action):
            # (GET /api/queue/ws, /stats and /message are other endpoints' paths.)
            assert _type_refused(response), (url, response.get_json())


def test_every_error_has_details_in_the_document_and_the_body(client, document):
    error = document["components"]["schemas"]["Error"]
    assert set(error["required"]) == {"error", "code", "details"}
    assert error["properties"]["details"]["nullable"] is True
    body = client.get("/api/nothing").get_json()
    assert body["details"] is None and "details" in body


def test_mailboxes_are_constrained_as_the_server_checks_them(make_app, document):
    client = make_app(ratelimit_strict="100000 per minute").test_client()
    schema = document["components"]["schemas"]["SendTest"]["properties"]
    single, many = schema["to"]["oneOf"]
    for mailbox in (schema["from"], single, many["items"]):
        assert mailbox["minLength"] == 3 and mailbox["maxLength"] == 512
        assert mailbox["pattern"] == single["pattern"]
    pattern = re.compile(single["pattern"])
    # What the document refuses, the server refuses too (and names the field).
    for text in ("", "ab", "no-at-sign", "a\u2028b@example.com", "a\x00@x.y",
                 "x" * 506 + "@ex.com"):
        assert not (pattern.search(text) and 3 <= len(text) <= 512)
        for body in ({"from": text, "to": "b@example.net"},
                     {"from": "a@example.com", "to": [text]}):
            response = client.post("/api/send-test", json=body)
            assert response.status_code == 400, text
    subject = re.compile(schema["subject"]["pattern"])
    for separator in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029":
        assert not subject.search(f"a{separator}b")
    assert subject.search("An ordinary subject: [x] {y} \"z\"")


@pytest.mark.parametrize("path, name", [("/api/logs/ws", "since_log"),
                                        ("/api/logs/ws", "since_event"),
                                        ("/api/queue/ws", "since_event")])
def test_stream_resume_ids_are_bounded_in_the_document(document, path, name):
    item = document["paths"][path]
    [param] = [p for p in item.get("parameters", []) + item["get"].get("parameters", [])
               if p["name"] == name]
    assert param["schema"]["minimum"] == 0 and param["schema"]["maximum"] == MAX_ROW_ID


def test_the_queue_stats_schema_is_documented_as_plain_integers(document):
    """QueueStatsSchema dumps through IntegerCountsSchema's short path; the document is the
    one a plain marshmallow schema of the same fields gives (byte-identical when made)."""
    counts = ["pending", "deferred", "held", "failed", "total"]
    assert document["components"]["schemas"]["QueueStats"] == {
        "type": "object", "properties": {name: {"type": "integer"} for name in counts},
        "required": sorted(counts), "additionalProperties": False}
    assert not any("IntegerCounts" in name for name in document["components"]["schemas"])

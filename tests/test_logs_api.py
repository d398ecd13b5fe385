"""GET /api/logs (API.md §4.1): minimum level and aliases, limit, newest first, retention."""

from __future__ import annotations

import datetime as dt
import json

import pytest
import sqlalchemy as sa

from app.logs.service import list_system_logs, prune_system_logs
from app.models import SystemLog
from app.timeutil import utcnow

from .helpers import assert_error

ITEM_KEYS = {"id", "timestamp", "level", "logger", "message", "process"}
LEVELNO = {"debug": 10, "info": 20, "warn": 30, "error": 40, "fatal": 50}


def add_logs(session, levels: list[str], when: dt.datetime | None = None) -> list[int]:
    rows = [SystemLog(timestamp=when or utcnow(), levelno=LEVELNO[level], level=level,
                      logger="elemta.test", message=f"{level} {i}", process="api:1")
            for i, level in enumerate(levels)]
    session.add_all(rows)
    session.commit()
    return [row.id for row in rows]


def test_newest_first_with_the_item_shape(client, session):
    ids = add_logs(session, ["info", "warn", "error", "debug", "fatal"])
    body = client.get("/api/logs").get_json()
    assert set(body) == {"logs", "count"}
    assert [item["id"] for item in body["logs"]] == ids[::-1]
    assert body["count"] == 5
    first = body["logs"][0]
    assert set(first) == ITEM_KEYS
    assert first == {"id": ids[-1], "timestamp": first["timestamp"], "level": "fatal",
                     "logger": "elemta.test", "message": "fatal 4", "process": "api:1"}
    assert first["timestamp"].endswith("Z") and len(first["timestamp"]) == 20


def test_empty_is_an_empty_list(client):
    assert client.get("/api/logs").get_json() == {"logs": [], "count": 0}


@pytest.mark.parametrize("level, expected", [
    ("debug", ["debug", "info", "warn", "error", "fatal"]),
    ("info", ["info", "warn", "error", "fatal"]),
    ("warn", ["warn", "error", "fatal"]),
    ("warning", ["warn", "error", "fatal"]),
    ("WARN", ["warn", "error", "fatal"]),
    ("error", ["error", "fatal"]),
    ("fatal", ["fatal"]),
    ("critical", ["fatal"]),
    ("Critical", ["fatal"]),
])
def test_minimum_level(client, session, level, expected):
    add_logs(session, ["debug", "info", "warn", "error", "fatal"] * 2)
    body = client.get(f"/api/logs?level={level}").get_json()
    got = [item["level"] for item in body["logs"]]
    assert got == expected[::-1] * 2
    assert [item["id"] for item in body["logs"]] == sorted((i["id"] for i in body["logs"]),
                                                           reverse=True)


def test_limit_takes_the_newest(client, session):
    ids = add_logs(session, ["info"] * 7)
    body = client.get("/api/logs?limit=3").get_json()
    assert [item["id"] for item in body["logs"]] == ids[:-4:-1] and body["count"] == 3
    assert client.get("/api/logs?limit=1000").get_json()["count"] == 7
    assert client.get("/api/logs?limit=1").get_json()["count"] == 1


def test_rare_level_in_a_crowd(session):
    """The per-level branches merge correctly: newest errors among many infos, then limit."""
    errors = []
    for _ in range(4):
        add_logs(session, ["info"] * 30)
        errors += add_logs(session, ["error", "fatal"])
    newest = list_system_logs(session, min_levelno=40, limit=3)
    assert [row["id"] for row in newest] == sorted(errors, reverse=True)[:3]
    assert [row["id"] for row in list_system_logs(session, min_levelno=50, limit=100)] == \
        sorted(errors, reverse=True)[::2]


@pytest.mark.parametrize("query, field", [
    ("level=bogus", "level"),
    ("level=", "level"),
    ("level=notice", "level"),
    ("limit=0", "limit"),
    ("limit=1001", "limit"),
    ("limit=-1", "limit"),
    ("limit=abc", "limit"),
])
def test_bad_parameters_are_400(client, session, query, field):
    add_logs(session, ["info"])
    body = assert_error(client.get(f"/api/logs?{query}"), 400, "VALIDATION_ERROR")
    assert field in body["details"]


def test_prune_removes_only_what_is_older_than_the_retention(session):
    now = utcnow()
    old = add_logs(session, ["info", "error"], when=now - dt.timedelta(days=15))
    kept = add_logs(session, ["info"], when=now - dt.timedelta(days=13))
    assert prune_system_logs(session, 14 * 86400, now=now) == len(old)
    session.commit()
    assert session.scalars(sa.select(SystemLog.id)).all() == kept
    assert prune_system_logs(session, 0, now=now + dt.timedelta(days=365)) == 0  # 0 keeps all


def test_cli_show_and_prune(runner, session):
    add_logs(session, ["info"], when=utcnow() - dt.timedelta(days=30))
    ids = add_logs(session, ["info", "error"])
    result = runner.invoke(args=["logs", "show", "--level", "warning", "--json"])
    assert result.exit_code == 0, result.output
    body = json.loads(result.output[result.output.index("{"):])
    assert [item["id"] for item in body["logs"]] == [ids[1]] and body["count"] == 1
    result = runner.invoke(args=["logs", "show", "--level", "bogus"])
    assert result.exit_code == 2
    result = runner.invoke(args=["logs", "prune"])
    assert result.exit_code == 0 and "1 record(s) pruned" in result.output
    session.expire_all()
    # prune leaves its own audit record (written by the log handler whenever it drains), so
    # the test's records are compared apart from it.
    remaining = session.scalars(sa.select(SystemLog).order_by(SystemLog.id)).all()
    assert [row.id for row in remaining if row.logger == "elemta.test"] == ids
    assert all("pruned 1 system log record(s)" in row.message
               for row in remaining if row.logger != "elemta.test")


def test_cli_events_pages_like_the_api(runner, session):
    from app.events import record_event

    events = [record_event(session, "system", message_id=f"msg-{i}", message="held")
              for i in range(3)]
    session.commit()
    ids = [event.id for event in events]
    result = runner.invoke(args=["logs", "events", "--limit", "2", "--json"])
    body = json.loads(result.output)
    assert [item["id"] for item in body["logs"]] == ids[:0:-1]
    result = runner.invoke(args=["logs", "events", "--cursor", body["next_cursor"], "--json"])
    assert [item["id"] for item in json.loads(result.output)["logs"]] == ids[:1]
    result = runner.invoke(args=["logs", "events", "--cursor", "garbage"])
    assert result.exit_code == 1 and "Invalid cursor" in result.output

"""``/api/policies``, ``/api/suppressions``, ``/api/rules``, their CLI, the listener's refusals.

Every bad input gets the contract's JSON error and changes nothing (the tables are compared
before and after).
"""

from __future__ import annotations

import datetime as dt
import smtplib

import pytest
import sqlalchemy as sa

import app.queue.service as queue_service
from app.extensions import db
from app.models import DeliveryEvent, DeliveryPolicy, Message, Rule, Suppression
from app.timeutil import isoformat_z, utcnow
from tests.conftest import empty_database
from tests.control_helpers import Clock
from tests.helpers import queue_message
from tests.smtpd_helpers import email_message, running_listener


def snapshot(app):
    with app.app_context():
        out = {}
        for model in (DeliveryPolicy, Suppression, Rule, Message):
            out[model.__tablename__] = sorted(
                tuple(sorted((k, str(v)) for k, v in vars(row).items() if not k.startswith("_")))
                for row in db.session.scalars(sa.select(model)))
        db.session.remove()
        return out


def assert_error(response, status, code="VALIDATION_ERROR"):
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert set(body) == {"error", "code", "details"} and body["code"] == code


# --------------------------------------------------------------------------- policies


def test_policies_create_list_change_delete(client):
    created = client.post("/api/policies", json={"kind": "domain", "pattern": "Example.COM.",
                                                 "max_connections": 2,
                                                 "messages_per_minute": 60})
    assert created.status_code == 201
    policy = created.get_json()
    assert (policy["pattern"], policy["max_connections"], policy["messages_per_hour"]) == (
        "example.com", 2, None)
    mx = client.post("/api/policies", json={"kind": "mx", "pattern": "*.google.com",
                                            "max_connections": 10, "require_tls": True})
    default = client.post("/api/policies", json={"kind": "default", "max_connections": 5})
    assert mx.status_code == default.status_code == 201
    assert [p["kind"] for p in client.get("/api/policies").get_json()] == [
        "default", "domain", "mx"]
    changed = client.patch(f"/api/policies/{policy['id']}",
                           json={"messages_per_minute": None, "messages_per_hour": 100})
    assert changed.status_code == 200
    assert (changed.get_json()["messages_per_minute"], changed.get_json()["messages_per_hour"]) \
        == (None, 100)
    assert client.get(f"/api/policies/{policy['id']}").get_json()["messages_per_hour"] == 100
    assert client.delete(f"/api/policies/{policy['id']}").status_code == 200
    assert_error(client.get(f"/api/policies/{policy['id']}"), 404, "NOT_FOUND")
    assert client.get("/api/policies/state").get_json() == {"destinations": []}


@pytest.mark.parametrize("method,path,body", [
    ("post", "/api/policies", {"kind": "domain", "pattern": "bad domain"}),
    ("post", "/api/policies", {"kind": "domain"}),
    ("post", "/api/policies", {"kind": "planet", "pattern": "x.example"}),
    ("post", "/api/policies", {"kind": "domain", "pattern": "x.example", "max_connections": 0}),
    ("post", "/api/policies", {"kind": "domain", "pattern": "x.example",
                               "messages_per_minute": "fast"}),
    ("post", "/api/policies", {"kind": "domain", "pattern": "x.example", "colour": "red"}),
    ("post", "/api/policies", {"kind": "default", "pattern": "x.example"}),
    ("post", "/api/policies", {"kind": "mx", "pattern": "*"}),
    ("patch", "/api/policies/{id}", {"max_connections": -1}),
    ("patch", "/api/policies/{id}", {"kind": "mx"}),
    ("patch", "/api/policies/{id}", {"require_tls": "maybe"}),
    ("post", "/api/suppressions", {"address": "not an address"}),
    ("post", "/api/suppressions", {"address": "a@b.example", "expires_at": "yesterday"}),
    ("post", "/api/suppressions", {"address": "a@b.example",
                                   "expires_at": "2000-01-01T00:00:00Z"}),
    ("post", "/api/suppressions", {"reason": "no address"}),
    ("post", "/api/rules", {"action": "hold", "domain": "gmail.com"}),
    ("post", "/api/rules", {"action": "explode", "domain": "gmail.com", "minutes": 30}),
    ("post", "/api/rules", {"action": "hold", "minutes": 30}),
    ("post", "/api/rules", {"action": "hold", "domain": "gmail.com", "minutes": 0}),
    ("post", "/api/rules", {"action": "hold", "domain": "gmail.com", "minutes": 30,
                            "expires_at": "2099-01-01T00:00:00Z"}),
    ("post", "/api/rules", {"action": "hold", "domain": "gmail.com",
                            "expires_at": "2001-01-01T00:00:00Z"}),
    ("get", "/api/suppressions?limit=0", None),
    ("get", "/api/suppressions?cursor=%%%", None),
    ("get", "/api/suppressions?source=martians", None),
    ("get", "/api/rules?include_expired=perhaps", None),
])
def test_bad_input_gets_the_contract_error_and_changes_nothing(app, client, method, path, body):
    existing = client.post("/api/policies", json={"kind": "domain", "pattern": "kept.example",
                                                  "max_connections": 3}).get_json()
    queue_message_in(app, "bob@gmail.com")
    before = snapshot(app)
    response = getattr(client, method)(path.replace("{id}", str(existing["id"])), json=body)
    assert_error(response, 400)
    assert snapshot(app) == before


def queue_message_in(app, recipient):
    with app.app_context():
        message_id = queue_message(db.session, recipients=(recipient,))
        db.session.remove()
    return message_id


def test_not_json_not_found_conflict_and_auth(app, client, anonymous_client):
    assert_error(client.post("/api/policies", data="kind=domain",
                             content_type="application/x-www-form-urlencoded"), 415,
                 "UNSUPPORTED_MEDIA_TYPE")
    assert_error(client.post("/api/policies", data="{", content_type="application/json"), 400,
                 "INVALID_JSON")
    assert_error(client.patch("/api/policies/999", json={}), 404, "NOT_FOUND")
    assert_error(client.delete("/api/policies/0"), 404, "NOT_FOUND")
    assert_error(client.delete("/api/rules/999"), 404, "NOT_FOUND")
    assert_error(client.delete("/api/suppressions/nobody@example.com"), 404, "NOT_FOUND")
    assert_error(client.put("/api/rules", json={}), 405, "METHOD_NOT_ALLOWED")
    body = {"kind": "domain", "pattern": "twice.example"}
    assert client.post("/api/policies", json=body).status_code == 201
    assert_error(client.post("/api/policies", json=body), 409, "CONFLICT")
    assert client.post("/api/suppressions", json={"address": "a@b.example"}).status_code == 201
    assert_error(client.post("/api/suppressions", json={"address": "A@b.example"}), 409,
                 "CONFLICT")
    before = snapshot(app)
    for path, payload in (("/api/policies", {"kind": "default"}),
                          ("/api/suppressions", {"address": "c@d.example"}),
                          ("/api/rules", {"action": "hold", "domain": "x.example",
                                          "minutes": 5})):
        assert_error(anonymous_client.post(path, json=payload), 401, "UNAUTHORIZED")
    assert_error(anonymous_client.delete("/api/suppressions/a@b.example"), 401, "UNAUTHORIZED")
    assert anonymous_client.get("/api/policies").status_code == 200  # reads are open
    assert snapshot(app) == before


# --------------------------------------------------------------------------- suppressions


def test_suppressions_list_filter_page_remove(client):
    for i in range(5):
        assert client.post("/api/suppressions", json={
            "address": f"User{i}@Example.com", "reason": f"reason {i % 2}"}).status_code == 201
    first = client.get("/api/suppressions?limit=2")
    assert first.headers["X-Total-Count"] == "5"
    assert [s["address"] for s in first.get_json()] == [
        "user4@example.com", "user3@example.com"]
    next_url = first.headers["Link"].split(";")[0].strip("<>")
    second = client.get(next_url)
    assert [s["address"] for s in second.get_json()] == ["user2@example.com", "user1@example.com"]
    assert [s["address"] for s in client.get("/api/suppressions?reason=REASON 1").get_json()] \
        == ["user3@example.com", "user1@example.com"]
    assert client.get("/api/suppressions?address=user0").get_json()[0]["source"] == "operator"
    entry = client.get("/api/suppressions/USER0@example.com").get_json()
    assert entry["created_by"] == "test-admin"
    assert client.delete("/api/suppressions/user0@example.com").status_code == 200
    assert client.get("/api/suppressions").headers["X-Total-Count"] == "4"


def test_expired_suppressions_no_longer_apply(app, client):
    soon = utcnow() + dt.timedelta(minutes=5)
    client.post("/api/suppressions", json={"address": "x@y.example",
                                           "expires_at": isoformat_z(soon)})
    with app.app_context():
        from app.control import suppression
        assert suppression.active(db.session, ["x@y.example"])
        assert not suppression.active(db.session, ["x@y.example"], soon + dt.timedelta(seconds=1))
        db.session.remove()


def test_csv_export_and_import(app, client):
    client.post("/api/suppressions", json={"address": "a@one.example",
                                           "reason": 'said "no", twice'})
    exported = client.get("/api/suppressions/export")
    assert exported.status_code == 200 and exported.mimetype == "text/csv"
    text = exported.get_data(as_text=True)
    assert text.splitlines()[0] == "address,reason,source,created_at,expires_at"
    assert '"said ""no"", twice"' in text
    client.delete("/api/suppressions/a@one.example")
    csv_body = text + "b@two.example,imported by hand,,,\r\n"
    result = client.post("/api/suppressions/import", data=csv_body, content_type="text/csv")
    assert result.status_code == 200 and result.get_json() == {"imported": 2, "skipped": 0}
    again = client.post("/api/suppressions/import", data=csv_body, content_type="text/csv")
    assert again.get_json() == {"imported": 0, "skipped": 2}
    rows = client.get("/api/suppressions").get_json()
    assert {(r["address"], r["source"]) for r in rows} == {
        ("a@one.example", "import"), ("b@two.example", "import")}
    assert {r["reason"] for r in rows} == {'said "no", twice', "imported by hand"}
    # One bad row: nothing imported; the lines are named.
    before = snapshot(app)
    bad = client.post("/api/suppressions/import", content_type="text/csv",
                      data="address,reason\nc@three.example,ok\nnot-an-address,bad\n")
    assert_error(bad, 400)
    assert list(bad.get_json()["details"]) == ["line 3"]
    assert_error(client.post("/api/suppressions/import", content_type="text/csv",
                             data="email\nc@three.example\n"), 400)
    assert_error(client.post("/api/suppressions/import", json={"address": "c@three.example"}),
                 415, "UNSUPPORTED_MEDIA_TYPE")
    assert_error(client.post("/api/suppressions/import", content_type="text/csv",
                             data=b"address\n\xff@x.example\n"), 400)
    assert snapshot(app) == before


def test_the_listener_refuses_a_suppressed_recipient_at_rcpt(app, client):
    client.post("/api/suppressions", json={"address": "gone@example.net", "reason": "5.1.1"})
    with running_listener(app) as port, smtplib.SMTP("127.0.0.1", port) as smtp:
        smtp.ehlo("client.example")
        smtp.mail("alice@example.com")
        code, text = smtp.rcpt("Gone@example.net")
        assert code == 550 and text.startswith(b"5.1.1 <Gone@example.net>")
        assert b"suppressed" in text
        assert smtp.rcpt("here@example.net")[0] == 250
        smtp.data(email_message(to="here@example.net").as_bytes())
    with app.app_context():
        [message] = db.session.scalars(sa.select(Message))
        assert [r.address for r in message.recipients] == ["here@example.net"]
        [event] = db.session.scalars(sa.select(DeliveryEvent).where(
            DeliveryEvent.event_type == "rejection"))
        assert event.recipient == "Gone@example.net" and event.smtp_code == 550
        db.session.remove()


# --------------------------------------------------------------------------- rules


def test_a_hold_rule_holds_queued_and_new_mail_until_it_expires(app, client, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(queue_service, "utcnow", clock)  # acceptance reads this clock
    queued = queue_message_in(app, "ann@gmail.com")
    other = queue_message_in(app, "ann@example.org")
    made = client.post("/api/rules", json={"action": "hold", "domain": "gmail.com",
                                           "minutes": 30, "comment": "reputation check"})
    assert made.status_code == 201
    rule = made.get_json()
    assert (rule["queued_matches"], rule["hits"], rule["active"]) == (1, 0, True)
    assert client.get(f"/api/queue/message/{queued}").get_json()["queue"] == "held"
    assert client.get(f"/api/queue/message/{other}").get_json()["queue"] == "pending"

    new = queue_message_in(app, "Bob@GMAIL.com")
    detail = client.get(f"/api/queue/message/{new}").get_json()
    assert detail["queue"] == "held"
    assert any(f"held by rule {rule['id']}" in e["message"] for e in detail["events"])
    assert queue_message_in(app, "bob@example.org")  # not caught
    assert client.get(f"/api/rules/{rule['id']}").get_json()["hits"] == 1

    clock.advance(31 * 60)  # the rule has expired
    later = queue_message_in(app, "carol@gmail.com")
    assert client.get(f"/api/queue/message/{later}").get_json()["queue"] == "pending"
    assert client.get(f"/api/rules/{rule['id']}").get_json()["hits"] == 1
    # (the API's own clock is real time: the rule is still listed as made)
    assert [r["id"] for r in client.get("/api/rules").get_json()] == [rule["id"]]


def test_a_defer_rule_defers_until_expiry_and_a_bounce_rule_refuses(app, client):
    queued = queue_message_in(app, "ann@slow.example")
    rule = client.post("/api/rules", json={"action": "defer", "domain": "slow.example",
                                           "minutes": 10}).get_json()
    detail = client.get(f"/api/queue/message/{queued}").get_json()
    assert detail["queue"] == "deferred"
    assert detail["next_attempt_at"] == rule["expires_at"]
    new = queue_message_in(app, "bob@slow.example")
    assert client.get(f"/api/queue/message/{new}").get_json()["next_attempt_at"] \
        == rule["expires_at"]

    bounce = client.post("/api/rules", json={"action": "bounce", "sender": "spammer@",
                                             "minutes": 10}).get_json()
    refused = client.post("/api/send-test", json={"from": "spammer@example.com",
                                                  "to": "x@example.net"})
    assert_error(refused, 400)
    assert f"rule {bounce['id']}" in refused.get_json()["details"]["to"][0]
    with running_listener(app) as port, smtplib.SMTP("127.0.0.1", port) as smtp:
        smtp.ehlo("client.example")
        smtp.mail("spammer@example.com")
        code, text = smtp.rcpt("y@example.net")
    assert code == 550 and text.startswith(b"5.7.1")
    assert client.get(f"/api/rules/{bounce['id']}").get_json()["hits"] == 2
    assert client.delete(f"/api/rules/{bounce['id']}").status_code == 200
    assert client.post("/api/send-test", json={"from": "spammer@example.com",
                                               "to": "x@example.net"}).status_code == 200


def queued(app, sender, recipients, state="pending"):
    with app.app_context():
        message_id = queue_message(db.session, sender=sender, recipients=recipients, state=state)
        db.session.remove()
    return message_id


def bounces_to(app, address):
    """The DSNs queued for ``address``: their recipients and raw text."""
    with app.app_context():
        out = [(m.recipients[0].address, m.content.raw.decode())
               for m in db.session.scalars(sa.select(Message).where(Message.origin == "bounce"))
               if m.recipients[0].address == address]
        db.session.remove()
    return out


def test_a_bounce_rule_fails_the_matching_queued_recipients_and_bounces_them(app, client):
    mixed = queued(app, "alice@example.com", ("ann@blocked.example", "bob@open.example"))
    deferred = queued(app, "carol@example.org", ("dan@blocked.example",), state="deferred")
    held = queued(app, "erin@example.com", ("fay@blocked.example",), state="held")
    untouched = queued(app, "gus@example.com", ("hal@open.example",))

    rule = client.post("/api/rules", json={"action": "bounce", "domain": "blocked.example",
                                           "minutes": 30}).get_json()
    assert (rule["queued_matches"], rule["hits"]) == (2, 0)

    detail = client.get(f"/api/queue/message/{mixed}").get_json()
    status = {r["address"]: r["status"] for r in detail["recipients"]}
    assert status == {"ann@blocked.example": "failed", "bob@open.example": "pending"}
    assert detail["queue"] == "pending"  # bob is still to be delivered
    [event] = [e for e in detail["events"] if e["event_type"] == "rejection"]
    assert event["recipient"] == "ann@blocked.example"
    assert f"Refused by rule {rule['id']}" in event["message"]

    detail = client.get(f"/api/queue/message/{deferred}").get_json()
    assert detail["queue"] == "failed"
    assert detail["recipients"][0]["last_error"].startswith(f"Refused by rule {rule['id']}")
    assert client.get(f"/api/queue/message/{held}").get_json()["queue"] == "held"
    assert client.get(f"/api/queue/message/{untouched}").get_json()["queue"] == "pending"

    [(_, dsn)] = bounces_to(app, "alice@example.com")
    assert "Final-Recipient: rfc822; ann@blocked.example" in dsn and "5.7.1" in dsn
    assert "bob@open.example" not in dsn.split("text/rfc822-headers")[0]
    assert len(bounces_to(app, "carol@example.org")) == 1
    assert bounces_to(app, "erin@example.com") == []
    # The failures count as delivery outcomes, as a remote 5xx does.
    assert client.get("/api/stats/delivery").get_json()["total_failed"] == 2


def test_a_bounce_rule_sends_no_dsn_when_bounces_are_off(make_app):
    app = make_app(send_bounces=False)
    empty_database(app)
    client = app.test_client()
    message_id = queued(app, "alice@example.com", ("ann@blocked.example",))
    made = client.post("/api/rules", json={"action": "bounce", "recipient": "ann@",
                                           "minutes": 5})
    assert made.get_json()["queued_matches"] == 1
    assert client.get(f"/api/queue/message/{message_id}").get_json()["queue"] == "failed"
    assert bounces_to(app, "alice@example.com") == []


# --------------------------------------------------------------------------- CLI


def test_cli_policy_suppression_rule(app, runner, tmp_path):
    result = runner.invoke(args=["policy", "add", "--domain", "example.com",
                                 "--max-connections", "2", "--per-minute", "60"])
    assert result.exit_code == 0, result.output
    assert "max_connections=2, messages_per_minute=60" in result.output
    assert runner.invoke(args=["policy", "update", "1", "--per-minute", "0"]).exit_code == 0
    listed = runner.invoke(args=["policy", "list", "--json"])
    assert '"messages_per_minute": null' in listed.output
    bad = runner.invoke(args=["policy", "add", "--domain", "no such domain"])
    assert bad.exit_code != 0 and "Invalid policy" in bad.output
    assert runner.invoke(args=["policy", "state"]).exit_code == 0

    assert runner.invoke(args=["suppression", "add", "a@b.example", "--reason", "asked"]
                         ).exit_code == 0
    csv_file = tmp_path / "list.csv"
    csv_file.write_text("address\nc@d.example\n")
    imported = runner.invoke(args=["suppression", "import", str(csv_file)])
    assert "1 imported" in imported.output
    exported = runner.invoke(args=["suppression", "export"])
    assert "a@b.example,asked,operator" in exported.output and "c@d.example" in exported.output
    assert runner.invoke(args=["suppression", "remove", "c@d.example"]).exit_code == 0
    assert runner.invoke(args=["suppression", "remove", "c@d.example"]).exit_code != 0

    made = runner.invoke(args=["rule", "add", "--action", "hold", "--domain", "gmail.com",
                               "--minutes", "30"])
    assert made.exit_code == 0 and "Rule 1: hold domain=gmail.com" in made.output
    assert runner.invoke(args=["rule", "add", "--action", "hold", "--domain", "x"]).exit_code != 0
    assert "0 queued, 0 new" in runner.invoke(args=["rule", "list"]).output
    assert runner.invoke(args=["rule", "delete", "1"]).exit_code == 0
    with app.app_context():
        assert db.session.scalar(sa.select(sa.func.count()).select_from(Rule)) == 0
        db.session.remove()

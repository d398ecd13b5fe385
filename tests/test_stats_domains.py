"""Per-domain statistics, failure classes and ETags (docs/STATS.md), on both databases.

Every figure is checked against a direct computation from the generated events: the window
from the calendar (tests/stats_reference.py), the domain from the address, percentiles by
nearest rank over the raw latencies. The service reads the per-domain rollup only.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import random
from collections import Counter
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

import pytest
import sqlalchemy as sa

from app.events import record_event
from app.models import DeliveryEvent, DomainRollup
from app.stats import service
from app.stats.classify import failure_class
from app.stats.latency import bucket_of, upper_bound
from app.timeutil import utcnow
from tests.conftest import plan_of
from tests.helpers import assert_error
from tests.stats_reference import SIZES, key_of, previous_key, reference_window, start_of

UTC = dt.UTC
DOMAINS = ("alpha.example", "Beta.Example", "gamma.example", "delta.example")
REPLIES = {
    "tempfail": [(451, "4.7.1", "451 4.7.1 Greylisted, please try again later"),
                 (421, "4.4.2", "421 4.4.2 Connection timed out"),
                 (452, "4.2.2", "452 4.2.2 Mailbox full"),
                 (None, "4.7.5", "TLS failure with mx: handshake failed"),
                 (None, None, "Connection refused by mx")],
    "rejection": [(550, "5.1.1", "550 5.1.1 User unknown"),
                  (554, "5.7.1", "554 5.7.1 Message rejected as spam"),
                  (None, "5.1.2", "Domain x does not exist (DNS NXDOMAIN)")],
}
OUTCOME = {"delivery": "delivered", "tempfail": "deferred", "rejection": "failed"}


@dataclass
class Spec:
    message_id: str
    event_type: str
    timestamp: dt.datetime
    recipient: str
    reply: tuple[int | None, str | None, str]
    latency: float | None

    @property
    def domain(self) -> str:
        return self.recipient.split("@")[1].lower()

    @property
    def outcome(self) -> str:
        return OUTCOME[self.event_type]

    @property
    def cls(self) -> str | None:
        return None if self.event_type == "delivery" else failure_class(*self.reply)


def edge_moments(now: dt.datetime) -> list[tuple[dt.datetime, bool]]:
    """For every scale: the window's first instant (in) and the instant before (out), the
    last instant of the current bucket (in) and the end of the window (out)."""
    moments = []
    for unit, size in SIZES.items():
        keys = [key_of(unit, now)]
        while len(keys) < size:
            keys.append(previous_key(unit, keys[-1]))
        first = start_of(unit, keys[-1])
        end = service.bucket_shift(unit, service.bucket_floor(unit, now), 1)
        tick = dt.timedelta(microseconds=1)
        moments += [(first, True), (first - tick, False), (end - tick, True), (end, False)]
    return moments


def generate(session, rng: random.Random, now: dt.datetime, count: int = 240) -> list[Spec]:
    """Outcome events over 14 months before ``now`` (some a little after), the window edges of
    every scale, and events that are not outcomes (they must count nowhere)."""
    moments = [now - dt.timedelta(seconds=rng.randint(-1800, 430 * 86400)) for _ in range(count)]
    moments += [moment for moment, _ in edge_moments(now)]
    specs = []
    for n, moment in enumerate(moments):
        event_type = rng.choice(("delivery", "delivery", "delivery", "tempfail", "rejection"))
        reply = (250, "2.0.0", "250 ok") if event_type == "delivery" \
            else rng.choice(REPLIES[event_type])
        latency = None
        if event_type == "delivery" and rng.random() < 0.9:
            latency = rng.choice((0.2, 1.0, rng.uniform(1, 90), rng.uniform(60, 90000)))
        specs.append(Spec(f"msg-gen{n:08d}", event_type, moment,
                          f"user{n % 7}@{rng.choice(DOMAINS)}", reply, latency))
    for spec in specs:
        code, enhanced, text = spec.reply
        record_event(session, spec.event_type, message_id=spec.message_id,
                     recipient=spec.recipient, timestamp=spec.timestamp, smtp_code=code,
                     enhanced_code=enhanced, message=text, latency=spec.latency)
    # Not outcomes: a reception, an operator action, a refusal of the SMTP listener.
    record_event(session, "reception", message_id="msg-other0001",
                 recipient="x@alpha.example", timestamp=now)
    record_event(session, "system", message_id="msg-other0001", message="held", timestamp=now)
    record_event(session, "rejection", recipient="x@alpha.example", timestamp=now,
                 message="554 5.7.1 spam", smtp_code=554, enhanced_code="5.7.1")
    session.commit()
    return specs


def in_window(unit: str, now: dt.datetime, moment: dt.datetime) -> bool:
    keys = {key_of(unit, now)}
    key = key_of(unit, now)
    while len(keys) < SIZES[unit]:
        key = previous_key(unit, key)
        keys.add(key)
    return key_of(unit, moment) in keys


def rate(part: int, total: int) -> float:
    if not total:
        return 0.0
    return float((Decimal(100 * part) / Decimal(total)).quantize(Decimal("0.1"), ROUND_HALF_UP))


def nearest_rank(values: list[float], q: int) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return upper_bound(bucket_of(ordered[max(1, math.ceil(q * len(ordered) / 100)) - 1]))


def reference_domains(unit: str, now: dt.datetime, specs: list[Spec]) -> list[dict]:
    chosen = [s for s in specs if in_window(unit, now, s.timestamp)]
    items = []
    for domain in sorted({s.domain for s in chosen}):
        mine = [s for s in chosen if s.domain == domain]
        counts = Counter(s.outcome for s in mine)
        total = len(mine)
        classes = Counter(s.cls for s in mine if s.cls)
        latencies = [s.latency for s in mine if s.outcome == "delivered" and s.latency is not None]
        items.append({
            "domain": domain, "delivered": counts["delivered"], "failed": counts["failed"],
            "deferred": counts["deferred"], "total": total,
            "success_rate": rate(counts["delivered"], total) if total else 100.0,
            "failure_rate": rate(counts["failed"], total),
            "deferral_rate": rate(counts["deferred"], total),
            "failure_classes": [{"failure_class": c, "count": n} for c, n in
                                sorted(classes.items(), key=lambda kv: (-kv[1], kv[0]))[:5]],
            "latency_p50": nearest_rank(latencies, 50),
            "latency_p95": nearest_rank(latencies, 95),
        })
    return items


def domain_rollup(session) -> dict[tuple, int]:
    session.expire_all()
    return {(r.grain, r.start, r.domain, r.outcome, r.failure_class, r.latency_bucket): r.count
            for r in session.scalars(sa.select(DomainRollup)) if r.count}


# Instants chosen for their edges: a month, ISO week and day boundary; the middle of an hour.
NOWS = [dt.datetime(2026, 3, 1, 0, 0, 0, tzinfo=UTC),
        dt.datetime(2026, 1, 4, 23, 59, 59, 999999, tzinfo=UTC),
        dt.datetime(2025, 11, 19, 14, 31, 7, tzinfo=UTC)]


@pytest.mark.parametrize("seed", range(len(NOWS)))
def test_domain_figures_equal_a_direct_computation(session, seed) -> None:
    now = NOWS[seed]
    specs = generate(session, random.Random(seed), now)
    for unit in SIZES:
        expected = reference_domains(unit, now, specs)
        got = service.domain_stats(session, unit, limit=1000, now=now)
        assert got["total_domains"] == len(expected)
        assert sorted(got["domains"], key=lambda d: d["domain"]) == expected, unit
        by_volume = [d["domain"] for d in got["domains"]]
        assert by_volume == [d["domain"] for d in
                             sorted(expected, key=lambda d: (-d["total"], d["domain"]))]
        worst = service.domain_stats(session, unit, limit=2, sort="failure_rate", now=now)
        assert [d["domain"] for d in worst["domains"]] == [
            d["domain"] for d in sorted(expected, key=lambda d: (-d["failure_rate"],
                                                                 -d["total"], d["domain"]))][:2]


@pytest.mark.parametrize("seed", range(len(NOWS)))
def test_one_domains_buckets_equal_a_direct_computation(session, seed) -> None:
    now = NOWS[seed]
    specs = generate(session, random.Random(100 + seed), now)
    for domain in ("beta.example", "alpha.example", "nobody.example"):
        mine = [s for s in specs if s.domain == domain]
        for unit in SIZES:
            body = service.delivery_stats(session, unit, now=now, domain=domain)
            assert body["data"] == reference_window(
                unit, now, [(s.timestamp, s.outcome) for s in mine]), (domain, unit)
            assert body["by_hour"] == [
                {"hour": b.pop("label"), **b} for b in
                reference_window("hour", now, [(s.timestamp, s.outcome) for s in mine])]
        errors = [s for s in mine if s.event_type != "delivery"]
        assert [e["message_id"] for e in body["recent_errors"]] == [
            s.message_id for s in reversed(errors)][:10]


def test_empty_and_unknown_domains(client, session) -> None:
    now = utcnow()
    # Only long ago: the domain has no outcome in the hour window, so it is not listed.
    record_event(session, "delivery", message_id="msg-old00001", recipient="a@old.example",
                 timestamp=now - dt.timedelta(days=3), latency=5)
    session.commit()
    hour = client.get("/api/stats/domains?timeScale=hour").get_json()
    assert hour["domains"] == [] and hour["total_domains"] == 0
    day = client.get("/api/stats/domains?timeScale=day").get_json()
    assert [d["domain"] for d in day["domains"]] == ["old.example"]
    assert day["domains"][0]["latency_p50"] == day["domains"][0]["latency_p95"] == 8.0
    assert day["domains"][0]["failure_classes"] == []
    unknown = client.get("/api/stats/delivery?timeScale=week&domain=nobody.example").get_json()
    assert len(unknown["data"]) == 12 and unknown["recent_errors"] == []
    assert unknown["success_rate"] == 100.0 and unknown["total_delivered"] == 0


def test_the_endpoint_answers_the_service(client, session) -> None:
    now = utcnow()
    specs = generate(session, random.Random(7), now, count=60)
    body = client.get("/api/stats/domains?timeScale=month&limit=2&sort=failure_rate").get_json()
    expected = sorted(reference_domains("month", now, specs),
                      key=lambda d: (-d["failure_rate"], -d["total"], d["domain"]))
    assert [d["domain"] for d in body["domains"]] == [d["domain"] for d in expected[:2]]
    assert body["domains"][0]["failure_classes"] == expected[0]["failure_classes"]
    assert (body["time_scale"], body["sort"], body["total_domains"]) == (
        "month", "failure_rate", len(expected))
    assert body["since"].endswith("T00:00:00Z") and body["until"] > body["since"]
    one = client.get("/api/stats/delivery?timeScale=day&domain=BETA.example").get_json()
    mine = [(s.timestamp, s.outcome) for s in specs if s.domain == "beta.example"]
    assert [b["delivered"] for b in one["data"]] == [
        b["delivered"] for b in reference_window("day", now, mine)]


@pytest.mark.parametrize("query, field", [
    ("timeScale=year", "timeScale"), ("limit=0", "limit"), ("limit=1001", "limit"),
    ("limit=ten", "limit"), ("sort=name", "sort"),
])
def test_bad_domain_parameters_are_400(client, query, field) -> None:
    body = assert_error(client.get(f"/api/stats/domains?{query}"), 400, "VALIDATION_ERROR")
    assert field in body["details"]


@pytest.mark.parametrize("domain", ["", "a@b.example", "a b.example", "x" * 256])
def test_bad_domain_filter_is_400(client, domain) -> None:
    body = assert_error(client.get(f"/api/stats/delivery?domain={domain}"), 400,
                        "VALIDATION_ERROR")
    assert "domain" in body["details"]


# --------------------------------------------------------------------------- ETag


@pytest.mark.parametrize("path", ["/api/stats/delivery", "/api/stats/domains?timeScale=day",
                                  "/api/stats/delivery?domain=alpha.example"])
def test_etag_answers_304_until_the_figures_change(client, session, path) -> None:
    first = client.get(path)
    tag = first.headers["ETag"]
    assert first.status_code == 200 and tag
    again = client.get(path, headers={"If-None-Match": tag})
    assert again.status_code == 304 and again.data == b""
    assert again.headers["ETag"] == tag
    assert again.headers["Cache-Control"] == first.headers["Cache-Control"] == "no-store"
    assert client.get(path, headers={"If-None-Match": '"other"'}).status_code == 200
    record_event(session, "rejection", message_id="msg-etag0001", recipient="a@alpha.example",
                 message="550 5.1.1 User unknown", smtp_code=550, enhanced_code="5.1.1")
    session.commit()
    changed = client.get(path, headers={"If-None-Match": tag})
    assert changed.status_code == 200 and changed.headers["ETag"] != tag


def test_validation_errors_carry_no_etag(client) -> None:
    response = client.get("/api/stats/domains?sort=x")
    assert response.status_code == 400 and "ETag" not in response.headers


# --------------------------------------------------------------------------- failure classes


def test_failures_are_classified_when_written(client, session) -> None:
    specs = generate(session, random.Random(3), utcnow(), count=40)
    stored = dict(session.execute(sa.select(DeliveryEvent.message_id,
                                            DeliveryEvent.failure_class)).all())
    for spec in specs:
        assert stored[spec.message_id] == spec.cls
    listener = session.scalar(sa.select(DeliveryEvent).where(
        DeliveryEvent.message_id.is_(None), DeliveryEvent.event_type == "rejection"))
    assert listener.failure_class == "spam" and listener.domain is None  # not an outcome
    spam = client.get("/api/logs/messages?failure_class=spam&limit=1000").get_json()["logs"]
    assert {e["message_id"] for e in spam} == {
        s.message_id for s in specs if s.cls == "spam"} | {None}
    assert all(e["failure_class"] == "spam" for e in spam)
    delivered = client.get("/api/logs/messages?event_type=delivery&limit=1").get_json()["logs"]
    assert delivered[0]["failure_class"] is None
    body = assert_error(client.get("/api/logs/messages?failure_class=bad"), 400,
                        "VALIDATION_ERROR")
    assert "failure_class" in body["details"]


def test_cli_failure_class_filter_and_domains(runner, session) -> None:
    specs = generate(session, random.Random(4), utcnow(), count=40)
    result = runner.invoke(args=["logs", "events", "--failure-class", "mailbox_unknown",
                                 "--json"])
    assert result.exit_code == 0, result.output
    assert {e["message_id"] for e in json.loads(result.output)["logs"]} == {
        s.message_id for s in specs if s.cls == "mailbox_unknown"}
    result = runner.invoke(args=["stats", "domains", "--time-scale", "month", "--json"])
    assert result.exit_code == 0, result.output
    body = json.loads(result.output)
    assert body["domains"] == sorted(reference_domains("month", utcnow(), specs),
                                     key=lambda d: (-d["total"], d["domain"]))
    text = runner.invoke(args=["stats", "domains", "--sort", "failure_rate", "--limit", "2"])
    assert text.exit_code == 0 and "top failure classes" in text.output
    bad = runner.invoke(args=["stats", "domains", "--sort", "nope"])
    assert bad.exit_code != 0


# --------------------------------------------------------------------------- rebuild and backfill


def test_rebuild_recounts_the_domain_rollup(runner, session) -> None:
    generate(session, random.Random(11), utcnow())
    good = domain_rollup(session)
    assert good
    session.execute(sa.update(DomainRollup).values(count=DomainRollup.count + 3))
    session.commit()
    result = runner.invoke(args=["stats", "rebuild"])
    assert result.exit_code == 0, result.output
    assert domain_rollup(session) == good


@pytest.mark.parametrize("since, until", [
    ("2026-01-28T10:30:00Z", "2026-02-03T07:00:00Z"),  # across a month end, mid-week
    ("2026-03-02T00:00:00Z", "2026-03-02T00:00:01Z"),  # one second on a Monday
])
def test_rebuild_of_a_range_rebuilds_whole_buckets_of_every_grain(runner, session, since,
                                                                  until) -> None:
    from app.events import GRAIN_FLOOR, grain_ceil
    from app.timeutil import parse_iso

    generate(session, random.Random(13), dt.datetime(2026, 3, 20, tzinfo=UTC), count=400)
    good = domain_rollup(session)
    session.execute(sa.update(DomainRollup).values(count=DomainRollup.count + 3))
    session.commit()
    result = runner.invoke(args=["stats", "rebuild", "--since", since, "--until", until])
    assert result.exit_code == 0, result.output
    first, last = parse_iso(since), parse_iso(until)
    rebuilt = 0
    for key, count in domain_rollup(session).items():
        grain, start = key[0], key[1]
        inside = GRAIN_FLOOR[grain](first) <= start < grain_ceil(grain, last)
        # The hours under every rebuilt week and month are recounted too.
        if grain == "hour":
            inside = min(GRAIN_FLOOR[g](first) for g in ("week", "month")) <= start \
                < max(grain_ceil(g, last) for g in ("week", "month"))
        assert count == (good[key] if inside else good[key] + 3), key
        rebuilt += inside
    assert rebuilt and {k for k in good} == set(domain_rollup(session))


def test_rebuild_backfills_events_from_before_0007(runner, session) -> None:
    """Events written before migration 0007 have no class, domain or latency, and no rows in
    the per-domain rollup; ``flask stats rebuild`` gives them what new events get."""
    now = utcnow().replace(microsecond=0)
    generate(session, random.Random(12), now)
    record_event(session, "reception", message_id="msg-lat00001", recipient="a@alpha.example",
                 timestamp=now - dt.timedelta(seconds=100))
    record_event(session, "delivery", message_id="msg-lat00001", recipient="a@alpha.example",
                 timestamp=now, latency=100.0)
    session.commit()
    events = {e.id: (e.failure_class, e.domain, e.latency)
              for e in session.scalars(sa.select(DeliveryEvent))}
    good = domain_rollup(session)
    # As migration 0007 leaves them (the latency of msg-lat00001 can be found again).
    session.execute(sa.update(DeliveryEvent).values(failure_class=None, domain=None)
                    .where(DeliveryEvent.message_id != "msg-lat00001"))
    session.execute(sa.update(DeliveryEvent).values(failure_class=None, domain=None,
                                                    latency=None)
                    .where(DeliveryEvent.message_id == "msg-lat00001"))
    session.execute(sa.delete(DomainRollup))
    session.commit()
    result = runner.invoke(args=["stats", "rebuild"])
    assert result.exit_code == 0, result.output
    session.expire_all()
    after = {e.id: (e.failure_class, e.domain, e.latency)
             for e in session.scalars(sa.select(DeliveryEvent))}
    assert after.keys() == events.keys()
    for key, (cls, domain, latency) in events.items():
        assert after[key][:2] == (cls, domain)
        assert after[key][2] == pytest.approx(latency)
    assert domain_rollup(session) == good


def test_demo_seed_and_reset_keep_the_domain_rollup_in_step(runner, session) -> None:
    result = runner.invoke(args=["demo", "seed", "--messages", "60", "--events", "3000",
                                 "--seed", "5"])
    assert result.exit_code == 0, result.output
    seeded = domain_rollup(session)
    assert {key[3] for key in seeded} == {"delivered", "failed", "deferred"}
    assert any(key[5] >= 0 for key in seeded)  # latencies of the history's deliveries
    classes = {key[4] for key in seeded} - {""}
    assert {"mailbox_unknown", "spam", "connection"} <= classes
    assert runner.invoke(args=["stats", "rebuild"]).exit_code == 0
    assert domain_rollup(session) == seeded
    assert runner.invoke(args=["demo", "reset"]).exit_code == 0
    assert domain_rollup(session) == {}


# --------------------------------------------------------------------------- plans


def test_a_domains_errors_and_a_class_are_read_from_partial_indexes_on_postgresql(
        client, session) -> None:
    # Old errors of rare.example and old TLS failures, then 60 000 newer outcomes of other
    # domains and classes: read backwards along the primary key, both would filter them all.
    if session.get_bind().dialect.name != "postgresql":
        pytest.skip("a PostgreSQL planner choice")
    session.execute(sa.text(
        "INSERT INTO delivery_events (timestamp, event_type, message_id, recipient, domain, "
        "failure_class, message, threats) SELECT now(), 'rejection', 'msg-rare' || g, "
        "'r@rare.example', 'rare.example', 'tls', 'TLS failure', '[]' "
        "FROM generate_series(1, 30) AS g"))
    session.execute(sa.text(
        "INSERT INTO delivery_events (timestamp, event_type, message_id, recipient, domain, "
        "failure_class, message, threats) SELECT now(), "
        "(ARRAY['delivery', 'delivery', 'tempfail', 'rejection'])[1 + g % 4], 'msg-' || g, "
        "'r@d' || (g % 50) || '.example', 'd' || (g % 50) || '.example', "
        "CASE WHEN g % 4 >= 2 THEN 'policy' END, repeat('x', 80), '[]' "
        "FROM generate_series(1, 60000) AS g"))
    session.commit()
    with session.get_bind().connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM (ANALYZE) delivery_events")

    every = plan_of(client, session, "/api/stats/delivery?domain=rare.example",
                    "FROM delivery_events")
    assert any(n.get("Index Name") == "ix_delivery_events_domain_errors" for n in every), every
    assert sum(n.get("Rows Removed by Filter", 0) for n in every) == 0, every

    every = plan_of(client, session, "/api/logs/messages?failure_class=tls&limit=20",
                    "FROM delivery_events")
    assert any(n.get("Index Name") == "ix_delivery_events_failure_class" for n in every), every
    assert sum(n.get("Rows Removed by Filter", 0) for n in every) == 0, every


# --------------------------------------------------------------------------- the worker's path


def test_the_worker_records_classes_domains_and_latency(make_app, app, session) -> None:
    """Real SMTP on loopback: what the worker records feeds the per-domain rollup exactly as a
    recount from its events does."""
    from app.extensions import db
    from tests.delivery_helpers import Behaviour, Peer, run_worker
    from tests.helpers import queue_message

    replies = {"gone@one.example": "550 5.1.1 No such user",
               "full@two.example": "452 4.2.2 Mailbox full"}
    with Peer(Behaviour(rcpt_replies=replies)) as peer:
        relay = make_app(relay_host=peer.address, smtp_timeout=1, send_bounces=False)
        with relay.app_context():
            message_id = queue_message(db.session, recipients=(
                "gone@one.example", "full@two.example", "ok@Two.Example"),
                created_at=utcnow() - dt.timedelta(seconds=90))
            db.session.remove()
        run_worker(relay)
    rows = {e.recipient: e for e in session.scalars(
        sa.select(DeliveryEvent).where(DeliveryEvent.message_id == message_id,
                                       DeliveryEvent.event_type.in_(list(OUTCOME))))}
    assert {r: (e.event_type, e.failure_class, e.domain) for r, e in rows.items()} == {
        "gone@one.example": ("rejection", "mailbox_unknown", "one.example"),
        "full@two.example": ("tempfail", "mailbox_full", "two.example"),
        "ok@Two.Example": ("delivery", None, "two.example")}
    latency = rows["ok@Two.Example"].latency
    assert 90 <= latency < 150 and rows["full@two.example"].latency is None
    recorded = domain_rollup(session)
    day = next(k for k in recorded if k[0] == "day" and k[3] == "delivered")
    assert day[2] == "two.example" and day[5] == bucket_of(latency) == 7  # (64, 128] s
    with app.app_context():
        from app.events import rebuild_rollup
        rebuild_rollup(db.session)
        db.session.commit()
        db.session.remove()
    assert domain_rollup(session) == recorded

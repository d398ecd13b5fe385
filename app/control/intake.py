"""Checks on new mail before it is queued: suppressed recipients and ``bounce`` rules.

The SMTP listener asks per RCPT (``refusal``) and answers with the reply given; send-test
asks for all its recipients at once (``refusals``) and refuses the request when any is
refused. Either way nothing is queued for that recipient, so no delivery is attempted.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
import sqlalchemy.orm as so
from sqlalchemy.dialects import postgresql

from ..models import Rule, Suppression
from ..sqltypes import UTCDateTime
from ..timeutil import utcnow
from . import rulebook, suppression

RULE_REPLY = "550 5.7.1 <{address}>: Refused by rule {rule_id} (until {until})"

# The listener's check of its recipients (``refusals_of``, asked at every RCPT, several
# sessions' RCPTs at once: ``app/smtpd/recipient_checks.py``): the same reads as ``refusals``
# (suppression.active, rulebook.in_force), as ONE prebuilt Core statement, a UNION ALL of the
# recipients' active suppressions (kind "s") and the bounce rules in force (kind "r"), run on
# a plain Core connection (``Storage.run_check``: no ORM session, and on PostgreSQL no
# BEGIN/COMMIT either): one round trip per batch of RCPTs, and no ORM session to set up and
# tear down (docs/PERFORMANCE.md, "Intake, group commit as arrays" and "Intake, concurrent
# RCPT checks in one statement").
_NO_TEXT = sa.cast(sa.null(), sa.String)


def _check_statement(address_matches: Any) -> Any:
    suppressed = sa.select(
        sa.literal("s").label("kind"), sa.cast(sa.null(), sa.Integer).label("id"),
        Suppression.address.label("address"),
        Suppression.reason.label("reason"), Suppression.source.label("source"),
        _NO_TEXT.label("sender"), _NO_TEXT.label("recipient"), _NO_TEXT.label("domain"),
        _NO_TEXT.label("action"), sa.cast(sa.null(), UTCDateTime).label("expires_at"),
    ).where(
        address_matches,
        sa.or_(Suppression.expires_at.is_(None), Suppression.expires_at > sa.bindparam("now")))
    bounce_rules = sa.select(
        sa.literal("r"), Rule.id, _NO_TEXT, _NO_TEXT, _NO_TEXT, Rule.sender, Rule.recipient,
        Rule.domain, Rule.action, Rule.expires_at,
    ).where(Rule.expires_at > sa.bindparam("now"), Rule.action == "bounce")
    # The suppressions first (each decides alone), then the rules in id order, as
    # rulebook.in_force.
    return sa.union_all(suppressed, bounce_rules).order_by(sa.text("kind DESC, id"))


# On PostgreSQL the addresses go as one array (``= ANY``): one SQL text whatever the number
# of checks, so SQLAlchemy renders nothing per run (an expanding IN is rewritten for every
# execution) and psycopg prepares it once. SQLite has no arrays: an expanding IN there.
_CHECK_ANY: Any = _check_statement(Suppression.address == sa.any_(
    sa.bindparam("addresses", type_=postgresql.ARRAY(sa.String))))
_CHECK_IN: Any = _check_statement(
    Suppression.address.in_(sa.bindparam("addresses", expanding=True)))
_COUNT_HITS = sa.update(Rule).where(Rule.id == sa.bindparam("rule_id")).values(
    hits=Rule.hits + sa.bindparam("caught", type_=sa.Integer))
# Bounds the statement's parameters (SQLite allows 32766, PostgreSQL 65535).
MAX_CHECKS = 1000


def refusals(session: so.Session, sender: str, addresses: Sequence[str],
             now: dt.datetime | None = None) -> dict[str, str]:
    """The SMTP reply refusing each refused recipient of ``addresses``; no commit (a bounce
    rule's hit count is the caller's to commit)."""
    now = now or utcnow()
    found = suppression.active(session, addresses, now)
    replies = {a: suppression.refusal_reply(a, found[suppression.normalise(a)])
               for a in addresses if suppression.normalise(a) in found}
    bounces = rulebook.in_force(session, now, ("bounce",))
    for address in addresses:
        if address in replies:
            continue
        rule = rulebook.first_match(bounces, sender, [address])
        if rule is not None:
            rulebook.count_hit(session, rule.id)
            replies[address] = _rule_reply(address, rule)
    return replies


def refusal(connection: sa.Connection, sender: str, address: str,
            now: dt.datetime | None = None) -> str | None:
    """``refusals`` for one recipient, on a Core connection: the reply refusing it, or None.
    A bounce rule's hit is counted on ``connection``; no commit (``Storage.run_check``'s
    connection commits, or is in autocommit)."""
    return refusals_of(connection, [(sender, address)], now)[0]


def refusals_of(connection: sa.Connection, checks: Sequence[tuple[str, str]],
                now: dt.datetime | None = None) -> list[str | None]:
    """``refusal`` for each ``(sender, address)`` of ``checks`` (at most ``MAX_CHECKS``; the
    senders may differ: the checks come from different sessions), in one statement: the
    reply refusing each, or None. Each refused recipient counts one hit of its rule, as
    ``refusal`` would have, in one UPDATE per rule caught."""
    if not checks:
        return []
    now = now or utcnow()
    check = _CHECK_ANY if connection.dialect.name == "postgresql" else _CHECK_IN
    rows = connection.execute(check, {
        "addresses": sorted({suppression.normalise(a) for _, a in checks}), "now": now}).all()
    suppressed = {row.address: row for row in rows if row.kind == "s"}
    bounces = [row for row in rows if row.kind == "r"]
    replies: list[str | None] = []
    caught: Counter[int] = Counter()
    for sender, address in checks:
        entry = suppressed.get(suppression.normalise(address))
        if entry is not None:
            replies.append(suppression.refusal_reply(address, entry))
            continue
        rule = rulebook.first_match(bounces, sender, [address])
        if rule is not None:
            caught[rule.id] += 1
        replies.append(None if rule is None else _rule_reply(address, rule))
    if caught:  # in id order, so that concurrent listeners lock the rules in one order
        connection.execute(_COUNT_HITS, [{"rule_id": rule_id, "caught": n}
                                         for rule_id, n in sorted(caught.items())])
    return replies


def _rule_reply(address: str, rule: Any) -> str:
    return RULE_REPLY.format(address=address, rule_id=rule.id,
                             until=rule.expires_at.strftime("%Y-%m-%dT%H:%M:%SZ"))

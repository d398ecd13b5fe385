"""Checks on new mail before it is queued: suppressed recipients and ``bounce`` rules.

The SMTP listener asks per RCPT (``refusal``) and answers with the reply given; send-test
asks for all its recipients at once (``refusals``) and refuses the request when any is
refused. Either way nothing is queued for that recipient, so no delivery is attempted.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
import sqlalchemy.orm as so

from ..models import Rule, Suppression
from ..sqltypes import UTCDateTime
from ..timeutil import utcnow
from . import rulebook, suppression

RULE_REPLY = "550 5.7.1 <{address}>: Refused by rule {rule_id} (until {until})"

# The listener's check of one recipient (``refusal``), asked at every RCPT: the same reads as
# ``refusals`` (suppression.active, rulebook.in_force), as ONE prebuilt Core statement, a
# UNION ALL of the recipient's active suppression (kind "s") and the bounce rules in force
# (kind "r"), run on a plain Core connection (``Storage.run_check``: no ORM session, and on
# PostgreSQL no BEGIN/COMMIT either): one round trip per RCPT instead of two, and no ORM
# session to set up and tear down (docs/PERFORMANCE.md, "Intake, group commit as arrays").
_NO_TEXT = sa.cast(sa.null(), sa.String)
_SUPPRESSED = sa.select(
    sa.literal("s").label("kind"), sa.cast(sa.null(), sa.Integer).label("id"),
    Suppression.reason.label("reason"), Suppression.source.label("source"),
    _NO_TEXT.label("sender"), _NO_TEXT.label("recipient"), _NO_TEXT.label("domain"),
    _NO_TEXT.label("action"), sa.cast(sa.null(), UTCDateTime).label("expires_at"),
).where(
    Suppression.address == sa.bindparam("address"),
    sa.or_(Suppression.expires_at.is_(None), Suppression.expires_at > sa.bindparam("now")))
_BOUNCE_RULES = sa.select(
    sa.literal("r"), Rule.id, _NO_TEXT, _NO_TEXT, Rule.sender, Rule.recipient, Rule.domain,
    Rule.action, Rule.expires_at,
).where(Rule.expires_at > sa.bindparam("now"), Rule.action == "bounce")
# The suppression first (it decides alone), then the rules in id order, as rulebook.in_force.
_CHECK: Any = sa.union_all(_SUPPRESSED, _BOUNCE_RULES).order_by(
    sa.text("kind DESC, id"))
_COUNT_HIT = sa.update(Rule).where(Rule.id == sa.bindparam("rule_id")).values(
    hits=Rule.hits + 1)


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
            replies[address] = RULE_REPLY.format(
                address=address, rule_id=rule.id,
                until=rule.expires_at.strftime("%Y-%m-%dT%H:%M:%SZ"))
    return replies


def refusal(connection: sa.Connection, sender: str, address: str,
            now: dt.datetime | None = None) -> str | None:
    """``refusals`` for one recipient, on a Core connection: the reply refusing it, or None.
    A bounce rule's hit is counted on ``connection``; no commit (``Storage.run_check``'s
    connection commits, or is in autocommit)."""
    now = now or utcnow()
    rows = connection.execute(_CHECK, {"address": suppression.normalise(address),
                                       "now": now}).all()
    if rows and rows[0].kind == "s":
        return suppression.refusal_reply(address, rows[0])
    rule = rulebook.first_match(rows, sender, [address])
    if rule is None:
        return None
    connection.execute(_COUNT_HIT, {"rule_id": rule.id})
    return RULE_REPLY.format(address=address, rule_id=rule.id,
                             until=rule.expires_at.strftime("%Y-%m-%dT%H:%M:%SZ"))

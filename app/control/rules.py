"""Rules: a queue filter, an action and an expiry (docs/DELIVERY.md, "Rules").

Made, a rule acts at once on the queued mail its filter matches, through the queue's bulk
service (``hold``: held; ``defer``: deferred until the rule expires; ``bounce``: see below),
and then on every new message until it expires (``rulebook``, called by the queue's
acceptance and by the intake checks). ``hits`` counts the new messages it caught;
``queued_matches`` what it changed when it was made. Deleting a rule ends it early; mail it
held stays held until released (as after an operator's hold).

``bounce`` refuses new mail that matches before it is queued (the SMTP client gets
``550 5.7.1`` at RCPT, send-test a 400), so its sender hears at once; the queued recipients it
matches fail for good (``queue.failing``: a ``rejection`` event each naming the rule, and a
DSN to the sender when bounces are on), and ``queued_matches`` counts their messages.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping
from functools import partial
from typing import Any

import sqlalchemy as sa
import sqlalchemy.orm as so

from ..config import local_hostname
from ..delivery.outcomes import queue_operator_bounce
from ..errors import NotFound, ValidationFailed
from ..models import RULE_ACTIONS, Rule
from ..queue.actions import bulk_action
from ..queue.failing import Bounce, fail_recipients
from ..queue.reading import MessageFilters
from ..timeutil import isoformat_z, utcnow

log = logging.getLogger("elemta.control")

MAX_DURATION = dt.timedelta(days=365)


def list_rules(session: so.Session, include_expired: bool = True) -> list[Rule]:
    query = sa.select(Rule).order_by(Rule.id)
    if not include_expired:
        query = query.where(Rule.expires_at > utcnow())
    return list(session.scalars(query))


def get_rule(session: so.Session, rule_id: int) -> Rule:
    rule = session.get(Rule, rule_id) if 0 < rule_id < 2**31 else None
    if rule is None:
        raise NotFound(f"Rule {rule_id} not found")
    return rule


def create_rule(session: so.Session, *, action: str, expires_at: dt.datetime,
                sender: str | None = None, recipient: str | None = None,
                domain: str | None = None, comment: str = "", actor: str,
                now: dt.datetime | None = None,
                config: Mapping[str, Any] | None = None) -> Rule:
    """Make a rule, apply it to the queued mail it matches; commits. Returns the rule.

    ``config`` (the app's) says whether a ``bounce`` rule sends DSNs (``SEND_BOUNCES``) and
    the name they report (``SMTP_HOSTNAME``); without it, none are sent."""
    now = (now or utcnow()).replace(microsecond=0)
    problems: dict[str, list[str]] = {}
    if action not in RULE_ACTIONS:
        problems["action"] = [f"Must be one of: {', '.join(RULE_ACTIONS)}."]
    if expires_at <= now:
        problems["expires_at"] = ["Must be in the future."]
    elif expires_at - now > MAX_DURATION:
        problems["expires_at"] = ["At most a year ahead."]
    sender, recipient = (sender or "").strip() or None, (recipient or "").strip() or None
    domain = (domain or "").strip().lower().rstrip(".") or None
    if not (sender or recipient or domain):
        problems["filter"] = ["Give at least one of sender, recipient, domain (a rule for "
                              "all mail is a hold of the whole queue)."]
    if problems:
        raise ValidationFailed("Invalid rule", problems)
    rule = Rule(action=action, expires_at=expires_at, sender=sender, recipient=recipient,
                domain=domain, comment=comment.strip(), created_by=actor[:100], created_at=now,
                queued_matches=0, hits=0)
    session.add(rule)
    session.commit()  # in force from here: new mail is caught while the queue is worked on
    filters = MessageFilters(sender=sender, recipient=recipient, domain=domain)
    who = f"{actor} (rule {rule.id})"
    if action == "hold":
        changed = bulk_action(session, "hold", "all", filters, who)
    elif action == "defer":
        changed = bulk_action(session, "defer", "all", filters, who, until=expires_at)
    else:
        changed = fail_recipients(
            session, filters, f"Refused by rule {rule.id} ({actor}; until "
                              f"{isoformat_z(expires_at)})",
            enhanced_code="5.7.1", bounce=_bouncer(config)).messages
    rule.queued_matches = changed
    session.commit()
    log.info("Rule %s made by %s: %s %s until %s; %d queued message(s) %s", rule.id, actor,
             action, describe_filter(rule), isoformat_z(expires_at), changed,
             {"hold": "held", "defer": "deferred", "bounce": "bounced"}[action])
    return rule


def _bouncer(config: Mapping[str, Any] | None) -> Bounce | None:
    if not (config and config.get("SEND_BOUNCES")):
        return None
    return partial(queue_operator_bounce, local_hostname(config.get("SMTP_HOSTNAME") or ""))


def delete_rule(session: so.Session, rule_id: int, actor: str) -> None:
    rule = get_rule(session, rule_id)
    text = f"{rule.action} {describe_filter(rule)}"
    session.delete(rule)
    session.commit()
    log.info("Rule %s (%s) deleted by %s", rule_id, text, actor)


def describe_filter(rule: Rule) -> str:
    fields = (("sender", rule.sender), ("recipient", rule.recipient), ("domain", rule.domain))
    parts = [f"{name}={value}" for name, value in fields if value]
    return " ".join(parts)


def expiry(expires_at: dt.datetime | None, minutes: int | None) -> dt.datetime:
    """A rule's end: the time given, or ``minutes`` from now."""
    if expires_at is not None:
        return expires_at
    if minutes is None:
        raise ValidationFailed("Invalid rule", {"expires_at": ["Give expires_at or minutes."]})
    return utcnow().replace(microsecond=0) + dt.timedelta(minutes=minutes)

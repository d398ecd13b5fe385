"""Which rule catches a new message (pure matching and the hit count; no queue import).

A rule's filter is the queue listing's: ``sender`` and ``recipient`` are case-insensitive
substrings, ``domain`` the exact recipient domain; the fields given must all match (a
message matches when its sender matches and one of its recipients matches the recipient
filters). Rules in force (``expires_at`` after now) are read from the database on every
acceptance: a rule catches the next message after it is made, in every process, and stops at
its expiry, with no restart and no cache to wait for.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Protocol, TypeVar

import sqlalchemy as sa
import sqlalchemy.orm as so

from ..models import Rule


class RuleFields(Protocol):
    """What matching reads of a rule: a ``Rule``, or a row of these columns (the listener's
    RCPT check reads rows, ``control.intake.refusal``)."""

    @property
    def id(self) -> int: ...
    @property
    def sender(self) -> str | None: ...
    @property
    def recipient(self) -> str | None: ...
    @property
    def domain(self) -> str | None: ...
    @property
    def action(self) -> str: ...
    @property
    def expires_at(self) -> dt.datetime: ...


R = TypeVar("R", bound=RuleFields)


def in_force(session: so.Session, now: dt.datetime,
             actions: Sequence[str] | None = None) -> list[Rule]:
    query = sa.select(Rule).where(Rule.expires_at > now).order_by(Rule.id)
    if actions is not None:
        query = query.where(Rule.action.in_(list(actions)))
    return list(session.scalars(query))


def recipient_matches(rule: RuleFields, address: str) -> bool:
    address = address.lower()
    if rule.recipient and rule.recipient.lower() not in address:
        return False
    return not rule.domain or address.rpartition("@")[2] == rule.domain.lower()


def matches(rule: RuleFields, sender: str, recipients: Sequence[str]) -> bool:
    if rule.sender and rule.sender.lower() not in sender.lower():
        return False
    return any(recipient_matches(rule, address) for address in recipients)


def first_match(rules: Sequence[R], sender: str, recipients: Sequence[str]) -> R | None:
    """The rule that decides: ``bounce`` over ``hold`` over ``defer``, then the oldest."""
    order = {"bounce": 0, "hold": 1, "defer": 2}
    caught = [rule for rule in rules if matches(rule, sender, recipients)]
    return min(caught, key=lambda r: (order[r.action], r.id)) if caught else None


def count_hit(session: so.Session, rule_id: int) -> None:
    """One more message caught (an atomic increment in the caller's transaction)."""
    session.execute(sa.update(Rule).where(Rule.id == rule_id).values(hits=Rule.hits + 1)
                    .execution_options(synchronize_session=False))

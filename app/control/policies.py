"""Destination policies: which limits apply to mail for a recipient domain.

A policy matches a recipient domain (``example.com``, or ``*.example.com`` for its
subdomains), an MX host pattern (``*.google.com``: every domain whose mail goes to Google's
servers) or every destination (``default``, at most one). The most specific one applies: an
exact domain, then the longest domain pattern, then an MX pattern, then the default, then the
built-in default (``ELEMTA_MAX_CONNECTIONS_PER_DOMAIN`` connections, no rate limit).

A policy's limits are shared by everything it covers, across every worker process and host:
the *limit key* names that shared state (connection slots, rate counters, backoff). An exact
domain and the default give each destination its own key; a pattern (domain or MX) gives all
the domains it covers one key, so ``*.google.com`` at 10 connections means 10 to Google.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
import sqlalchemy.exc as sa_exc
import sqlalchemy.orm as so

from ..errors import Conflict, NotFound, ValidationFailed
from ..models import POLICY_KINDS, DeliveryPolicy
from ..timeutil import utcnow

log = logging.getLogger("elemta.control")

LIMIT_FIELDS = ("max_connections", "messages_per_connection", "messages_per_minute",
                "messages_per_hour")
MAX_LIMIT = 1_000_000
_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_DOMAIN = re.compile(rf"^(?:\*\.)?{_LABEL}(?:\.{_LABEL})*$")
_HOST_GLOB = re.compile(r"^[a-z0-9*?-]{1,63}(?:\.[a-z0-9*?-]{1,63})*$")


@dataclass(frozen=True)
class Limits:
    """What the worker applies to one destination (from a policy or the built-in default)."""

    key: str
    policy_id: int | None
    max_connections: int
    messages_per_connection: int | None = None
    messages_per_minute: int | None = None
    messages_per_hour: int | None = None
    require_tls: bool = False

    @property
    def shared(self) -> bool:
        """Whether the limits need the shared state (a policy exists for it)."""
        return self.policy_id is not None


def normalise_pattern(kind: str, pattern: str | None) -> str:
    """The stored pattern of a policy, or ``ValidationFailed`` naming the field."""
    if kind not in POLICY_KINDS:
        raise ValidationFailed("Invalid policy", {"kind": [f"Must be one of: "
                                                           f"{', '.join(POLICY_KINDS)}."]})
    if kind == "default":
        if pattern not in (None, "", "*"):
            raise ValidationFailed("Invalid policy", {"pattern": [
                "The default policy has no pattern (it applies to every destination)."]})
        return "*"
    text = (pattern or "").strip().lower().rstrip(".")
    try:
        text = text.encode("idna").decode("ascii") if not text.isascii() else text
    except UnicodeError:
        text = ""
    checker = _DOMAIN if kind == "domain" else _HOST_GLOB
    if len(text) > 253 or not checker.match(text) or text.strip("*.?") == "":
        what = ("a domain (example.com) or *.domain for its subdomains" if kind == "domain"
                else "an MX host name pattern such as *.google.com")
        raise ValidationFailed("Invalid policy", {"pattern": [f"Must be {what}."]})
    return text


def _check_limits(values: dict[str, Any]) -> None:
    problems = {}
    for name in LIMIT_FIELDS:
        value = values.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or not 1 <= value <= MAX_LIMIT):
            problems[name] = [f"Must be a whole number from 1 to {MAX_LIMIT}, or null."]
    if "require_tls" in values and not isinstance(values["require_tls"], bool):
        problems["require_tls"] = ["Must be true or false."]
    if problems:
        raise ValidationFailed("Invalid policy", problems)


def list_policies(session: so.Session) -> list[DeliveryPolicy]:
    order = sa.case({"default": 0, "domain": 1, "mx": 2}, value=DeliveryPolicy.kind)
    return list(session.scalars(sa.select(DeliveryPolicy).order_by(order, DeliveryPolicy.pattern)))


def get_policy(session: so.Session, policy_id: int) -> DeliveryPolicy:
    policy = session.get(DeliveryPolicy, policy_id) if 0 < policy_id < 2**31 else None
    if policy is None:
        raise NotFound(f"Policy {policy_id} not found")
    return policy


def create_policy(session: so.Session, values: dict[str, Any], actor: str) -> DeliveryPolicy:
    """A new policy (``kind``, ``pattern`` and limits); commits. 409 when one exists."""
    kind = values.get("kind", "domain")
    pattern = normalise_pattern(kind, values.get("pattern"))
    _check_limits(values)
    now = utcnow().replace(microsecond=0)
    policy = DeliveryPolicy(kind=kind, pattern=pattern, created_at=now, updated_at=now,
                            require_tls=bool(values.get("require_tls", False)),
                            **{name: values.get(name) for name in LIMIT_FIELDS})
    session.add(policy)
    try:
        session.commit()
    except sa_exc.IntegrityError:
        session.rollback()
        raise Conflict(f"A {kind} policy for {pattern} exists already; change it "
                       "instead") from None
    log.info("Delivery policy %s created by %s: %s", policy.id, actor, describe(policy))
    return policy


def update_policy(session: so.Session, policy_id: int, values: dict[str, Any],
                  actor: str) -> DeliveryPolicy:
    """Change a policy's limits (the fields given; null removes a limit); commits."""
    policy = get_policy(session, policy_id)
    _check_limits(values)
    for name in (*LIMIT_FIELDS, "require_tls"):
        if name in values:
            setattr(policy, name, values[name])
    policy.updated_at = utcnow().replace(microsecond=0)
    session.commit()
    log.info("Delivery policy %s changed by %s: %s", policy.id, actor, describe(policy))
    return policy


def delete_policy(session: so.Session, policy_id: int, actor: str) -> None:
    policy = get_policy(session, policy_id)
    text = describe(policy)
    session.delete(policy)
    session.commit()
    log.info("Delivery policy %s deleted by %s (was: %s)", policy_id, actor, text)


def describe(policy: DeliveryPolicy) -> str:
    limits = ", ".join(f"{name}={getattr(policy, name)}" for name in LIMIT_FIELDS
                       if getattr(policy, name) is not None) or "no limits"
    tls = ", TLS required" if policy.require_tls else ""
    return f"{policy.kind} {policy.pattern}: {limits}{tls}"


# --------------------------------------------------------------------------- matching


@dataclass(frozen=True)
class PolicyRow:
    """A policy as the worker keeps it in memory (no session needed to match)."""

    id: int
    kind: str
    pattern: str
    max_connections: int | None
    messages_per_connection: int | None
    messages_per_minute: int | None
    messages_per_hour: int | None
    require_tls: bool


def load_rows(session: so.Session) -> list[PolicyRow]:
    return [PolicyRow(p.id, p.kind, p.pattern, p.max_connections, p.messages_per_connection,
                      p.messages_per_minute, p.messages_per_hour, p.require_tls)
            for p in list_policies(session)]


class PolicyBook:
    """Matches destinations to policies (pure: built from rows, no database)."""

    def __init__(self, rows: Iterable[PolicyRow], default_connections: int) -> None:
        rows = list(rows)
        self.default_connections = max(1, default_connections)
        self.exact = {r.pattern: r for r in rows if r.kind == "domain"
                      and not r.pattern.startswith("*.")}
        self.suffixes = sorted((r for r in rows if r.kind == "domain"
                                and r.pattern.startswith("*.")),
                               key=lambda r: -len(r.pattern))
        self.mx = sorted((r for r in rows if r.kind == "mx"), key=lambda r: -len(r.pattern))
        self.default = next((r for r in rows if r.kind == "default"), None)
        self.empty = not rows

    def needs_hosts(self, domain: str) -> bool:
        """Whether the MX host names could change the answer for ``domain``."""
        return bool(self.mx) and self._by_domain(domain) is None

    def limits_for(self, destination: str, domain: str,
                   hostnames: Sequence[str] = ()) -> Limits:
        domain = domain.lower()
        row = self._by_domain(domain)
        key = None
        if row is not None:
            key = f"dest:{destination}" if row.kind == "domain" and row.pattern == domain \
                else f"domain:{row.pattern}"
        else:
            row = self._by_hosts(hostnames)
            if row is not None:
                key = f"mx:{row.pattern}"
            else:
                row = self.default
        key = key or f"dest:{destination}"
        if row is None:
            return Limits(key, None, self.default_connections)
        return Limits(key, row.id, row.max_connections or self.default_connections,
                      row.messages_per_connection, row.messages_per_minute,
                      row.messages_per_hour, row.require_tls)

    def _by_domain(self, domain: str) -> PolicyRow | None:
        if domain in self.exact:
            return self.exact[domain]
        for row in self.suffixes:
            if domain.endswith(row.pattern[1:]):
                return row
        return None

    def _by_hosts(self, hostnames: Sequence[str]) -> PolicyRow | None:
        for host in hostnames:
            host = host.lower().rstrip(".")
            for row in self.mx:
                if fnmatch.fnmatchcase(host, row.pattern):
                    return row
        return None

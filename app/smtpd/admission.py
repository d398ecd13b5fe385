"""Who gets an SMTP session: the listener's cap, room kept for trusted clients, and per-client
limits in the spirit of Postfix's anvil (docs/SMTPD.md, "Connection limits").

Decided at connect (after the PROXY header when there is one), before the greeting:

1. ``ELEMTA_SMTPD_MAX_SESSIONS`` admitted sessions at most, for everybody (``421 4.3.2``).
2. Clients outside ``ELEMTA_RELAY_NETWORKS`` ("untrusted": they can only send after AUTH)
   share ``max_sessions - ELEMTA_SMTPD_TRUSTED_RESERVE`` sessions: however many addresses
   an attacker uses, the relay networks keep that many sessions of their own (``421 4.7.0``).
3. Each untrusted client (an IPv4 address, or an IPv6 /64: one customer's network) may hold
   ``ELEMTA_SMTPD_CLIENT_CONNECTION_COUNT_LIMIT`` sessions at once and open
   ``ELEMTA_SMTPD_CLIENT_CONNECTION_RATE_LIMIT`` connections per minute, refused ones
   included, so a client hammering the port stays refused until it slows down (``421 4.7.0``).
   Clients of the relay networks are exempt, as Postfix exempts ``$mynetworks``
   (``smtpd_client_event_limit_exceptions``): they are the operator's own hosts.

Everything here runs on the listener's event loop: no locks. With several listener processes
(``processes.py``) it runs in their parent alone, so the counts are those of the whole port.
"""

from __future__ import annotations

import functools
import ipaddress
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .policy import IPAddress

# Postfix's anvil_rate_time_unit: connection rates are counted per minute.
RATE_WINDOW_SECONDS = 60.0
# The listener is "under stress" from this share of its session cap on: idle sessions outside
# a mail transaction then get the short idle timeout (Postfix's stress-dependent timeouts).
STRESS_FRACTION = 0.8
# IPv6 clients are counted per network of this size: one host usually holds a whole /64.
IPV6_CLIENT_PREFIX = 64
# Client entries with no session and an expired rate window are dropped this often.
SWEEP_SECONDS = 60.0

REPLY_BUSY = "421 4.3.2 Too many connections, try again later"
REPLY_SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"
REPLY_UNTRUSTED_FULL = ("421 4.7.0 Too many connections from outside the relay networks, "
                        "try again later")
REPLY_CLIENT_COUNT = "421 4.7.0 Too many connections from {client}, try again later"
REPLY_CLIENT_RATE = "421 4.7.0 Too many connections per minute from {client}, try again later"


@dataclass(frozen=True)
class AdmissionLimits:
    max_sessions: int
    trusted_reserve: int  # sessions untrusted clients can never take
    client_count_limit: int  # sessions per untrusted client at once; 0: no limit
    client_rate_limit: int  # connections per untrusted client per minute; 0: no limit

    @property
    def untrusted_sessions(self) -> int:
        return max(1, self.max_sessions - self.trusted_reserve)

    @functools.cached_property  # asked at every command of every session (_reset_timeout)
    def stress_threshold(self) -> int:
        return max(1, math.ceil(self.max_sessions * STRESS_FRACTION))


@dataclass(frozen=True)
class Refusal:
    reason: str  # busy, shutting-down, untrusted-full, client-count, client-rate
    reply: str
    client: str  # the client's key (address or IPv6 /64)


@dataclass
class _Client:
    sessions: int = 0
    window_start: float = 0.0
    window_connections: int = 0


@dataclass(eq=False)
class Ticket:
    """An admitted session; give it back with ``Admission.leave`` when the session ends."""

    client: str
    trusted: bool
    left: bool = field(default=False)
    number: int = 0  # with several listener processes: the parent's name for it


def client_key(ip: IPAddress | None) -> str:
    """What per-client limits count by: the IPv4 address, or the IPv6 /64 it is in."""
    if ip is None:
        return "unknown"
    if ip.version == 6:
        return str(ipaddress.ip_network(f"{ip}/{IPV6_CLIENT_PREFIX}", strict=False))
    return str(ip)


class Admission:
    """The counters behind the decisions of the module docstring."""

    def __init__(self, limits: AdmissionLimits,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.clock = clock
        self.sessions = 0  # admitted and not yet left
        self.untrusted = 0
        self._clients: dict[str, _Client] = {}
        self._last_sweep = clock()

    @property
    def stressed(self) -> bool:
        return self.sessions >= self.limits.stress_threshold

    def admit(self, ip: IPAddress | None, trusted: bool) -> Ticket | Refusal:
        """A ticket for a new session, or why it is refused (nothing counted then but the
        connection itself, towards its client's rate)."""
        limits = self.limits
        key = client_key(ip)
        if trusted:
            if self.sessions >= limits.max_sessions:
                return Refusal("busy", REPLY_BUSY, key)
            self.sessions += 1
            return Ticket(key, trusted=True)
        now = self.clock()
        self._sweep(now)
        client = self._clients.setdefault(key, _Client(window_start=now))
        if now - client.window_start >= RATE_WINDOW_SECONDS:
            client.window_start, client.window_connections = now, 0
        client.window_connections += 1
        if self.sessions >= limits.max_sessions:
            return Refusal("busy", REPLY_BUSY, key)
        if limits.client_rate_limit and client.window_connections > limits.client_rate_limit:
            return Refusal("client-rate", REPLY_CLIENT_RATE.format(client=key), key)
        if limits.client_count_limit and client.sessions >= limits.client_count_limit:
            return Refusal("client-count", REPLY_CLIENT_COUNT.format(client=key), key)
        if self.untrusted >= limits.untrusted_sessions:
            return Refusal("untrusted-full", REPLY_UNTRUSTED_FULL, key)
        client.sessions += 1
        self.untrusted += 1
        self.sessions += 1
        return Ticket(key, trusted=False)

    def leave(self, ticket: Ticket) -> None:
        if ticket.left:
            return
        ticket.left = True
        self.sessions -= 1
        if ticket.trusted:
            return
        self.untrusted -= 1
        client = self._clients.get(ticket.client)
        if client is not None:
            client.sessions -= 1

    def client_sessions(self, ip: IPAddress | None) -> int:
        client = self._clients.get(client_key(ip))
        return client.sessions if client is not None else 0

    def _sweep(self, now: float) -> None:
        """Forget clients with no session whose rate window is over (memory stays bounded by
        the clients of the last minute)."""
        if now - self._last_sweep < SWEEP_SECONDS:
            return
        self._last_sweep = now
        stale = [key for key, c in self._clients.items()
                 if c.sessions == 0 and now - c.window_start >= RATE_WINDOW_SECONDS]
        for key in stale:
            del self._clients[key]


class RefusalThrottle:
    """Refused connections are logged and recorded once per client and reason per minute:
    a flood of them must not become a flood of log rows and events. The next one after the
    minute says how many were refused in between."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}

    def due(self, refusal: Refusal) -> int | None:
        """None: stay quiet; otherwise record it, with the count refused silently before it."""
        now = self.clock()
        key = (refusal.client, refusal.reason)
        last = self._seen.get(key)
        if last is not None and now - last[0] < RATE_WINDOW_SECONDS:
            self._seen[key] = (last[0], last[1] + 1)
            return None
        if len(self._seen) > 10_000:  # a wide flood: forget the old entries
            self._seen = {k: v for k, v in self._seen.items()
                          if now - v[0] < RATE_WINDOW_SECONDS}
        self._seen[key] = (now, 0)
        return last[1] if last is not None else 0

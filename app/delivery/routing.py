"""Where mail for a recipient domain goes: a smarthost, or the domain's MX hosts.

MX routing follows RFC 5321 section 5.1: MX records by preference (equal preferences in random
order), the domain itself as implicit MX when it has no MX records, and RFC 7505's null MX
(``MX 0 .``) as a permanent failure. A domain that does not exist (NXDOMAIN) fails
permanently; timeouts, SERVFAIL and a missing resolver configuration are temporary, so mail
waits in the deferred queue instead of bouncing while the network is down.

The resolver is injectable: anything with dnspython's ``resolve(qname, rdtype)`` that raises
dnspython's exceptions (tests use one that answers from a table).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..config import parse_host_port

SANITY_TTL = 60.0  # seconds a resolver health check is trusted
log = logging.getLogger("elemta.delivery")

RELAY_HINT = "no relay configured (set ELEMTA_RELAY_HOST to deliver through a smarthost)"


class DnsHealthNotice:
    """Says "DNS is not working" once per process, and "works again" once when it recovers.

    A worker has several routers and delivery threads that find the same broken resolver
    within the same second; the operator needs the news once, not once per finder.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reported_broken = False

    def observe(self, healthy: bool) -> None:
        with self._lock:
            changed = self._reported_broken == healthy
            self._reported_broken = not healthy
        if not changed:
            return
        if healthy:
            log.info("DNS works again (the root zone resolves)")
        else:
            log.warning("DNS is not working (the root zone does not resolve): MX mail "
                        "waits deferred; %s", RELAY_HINT)


dns_health_notice = DnsHealthNotice()


class Resolver(Protocol):
    def resolve(self, qname: str, rdtype: str) -> Any: ...


@dataclass(frozen=True)
class Hop:
    """One server to try: its name (for the record and TLS) and the address to connect to."""

    hostname: str
    address: str
    port: int


@dataclass(frozen=True)
class Route:
    """The servers for one destination, in the order to try them."""

    destination: str
    hops: tuple[Hop, ...]
    tls: str  # "opportunistic" (MX), "required" (a policy), or the relay's none | starttls | tls
    username: str = ""
    password: str = field(default="", repr=False)


class RoutingError(Exception):
    """No server can be tried; ``permanent`` says whether to give up on the recipients."""

    def __init__(self, message: str, *, permanent: bool, enhanced_code: str) -> None:
        super().__init__(message)
        self.message = message
        self.permanent = permanent
        self.enhanced_code = enhanced_code


class Router:
    """Turns a recipient domain into a ``Route`` (or a ``RoutingError``)."""

    def __init__(self, config: Mapping[str, Any], resolver: Resolver | None = None) -> None:
        self.mx_port = int(config["SMTP_PORT"])
        self.dns_timeout = float(config["DNS_TIMEOUT"])
        self.dns_servers = list(config["DNS_SERVERS"])
        self.relay: tuple[str, int] | None = None
        if config["RELAY_HOST"]:
            default = 465 if config["RELAY_TLS"] == "tls" else 25
            self.relay = parse_host_port(str(config["RELAY_HOST"]), default)
        self.relay_tls = config["RELAY_TLS"]
        self.username = config["RELAY_USERNAME"] or ""
        self.password = config["RELAY_PASSWORD"] or ""
        self._resolver = resolver
        self._lock = threading.Lock()
        self._sane = False
        self._sane_checked_at = -SANITY_TTL

    def destination_of(self, domain: str) -> str:
        """The key that groups recipients into one SMTP transaction and limits connections."""
        if self.relay:
            return f"relay:{self.relay[0]}:{self.relay[1]}"
        return domain.lower()

    def route(self, domain: str) -> Route:
        if self.relay:
            host, port = self.relay
            return Route(self.destination_of(domain), (Hop(host, host, port),), self.relay_tls,
                         self.username, self.password)
        return Route(domain.lower(), tuple(self._mx_hops(domain.lower())), "opportunistic")

    # ----------------------------------------------------------------- DNS

    # dnspython is imported by the methods that look up MX records, not with this module: a
    # worker that relays through a smarthost, or has nothing due, never needs it (about 25 ms of
    # its start-up; tests/test_worker_startup.py).

    def resolver(self) -> Resolver:
        import dns.resolver

        from ..dnsresolver import make_resolver

        with self._lock:
            if self._resolver is None:
                try:
                    self._resolver = make_resolver(self.dns_servers, self.dns_timeout)
                except dns.resolver.NoResolverConfiguration:
                    raise RoutingError(f"no DNS resolver configured; {RELAY_HINT}",
                                       permanent=False, enhanced_code="4.4.3") from None
            return self._resolver

    def _query(self, name: str, rdtype: str) -> Any:
        return self.resolver().resolve(name, rdtype)

    def _mx_hops(self, domain: str) -> list[Hop]:
        import dns.exception
        import dns.name
        import dns.resolver

        implicit = False
        try:
            answer = list(self._query(domain, "MX"))
        except dns.resolver.NXDOMAIN:
            self._require_sane_dns(domain)
            raise RoutingError(f"Domain {domain} does not exist (DNS NXDOMAIN)",
                               permanent=True, enhanced_code="5.1.2") from None
        except dns.resolver.NoAnswer:
            answer, implicit = [], True
        except dns.exception.DNSException as exc:
            raise self._temporary(f"MX lookup for {domain}", exc) from None

        if implicit:
            exchanges = [domain]
        else:
            if any(rr.exchange == dns.name.root for rr in answer):
                raise RoutingError(f"Domain {domain} does not accept mail (null MX, RFC 7505)",
                                   permanent=True, enhanced_code="5.1.10")
            exchanges = [str(rr.exchange).rstrip(".") for rr in _by_preference(answer)]

        hops: list[Hop] = []
        problems: list[str] = []
        for exchange in exchanges:
            for rdtype in ("A", "AAAA"):
                try:
                    hops.extend(Hop(exchange, rr.address, self.mx_port)
                                for rr in self._query(exchange, rdtype))
                except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                    continue
                except dns.exception.DNSException as exc:
                    problems.append(f"{rdtype} lookup for {exchange}: {_describe(exc)}")
        if hops:
            return hops
        if problems:
            raise RoutingError(f"DNS lookup failed: {'; '.join(problems)}; {RELAY_HINT}",
                               permanent=False, enhanced_code="4.4.3")
        if implicit:
            self._require_sane_dns(domain)
            raise RoutingError(f"Domain {domain} has no MX and no address records",
                               permanent=True, enhanced_code="5.1.2")
        # MX hosts that resolve to nothing: usually a DNS mistake being fixed; retry later.
        raise RoutingError(f"No address for the MX hosts of {domain} ({', '.join(exchanges)})",
                           permanent=False, enhanced_code="4.4.4")

    def _require_sane_dns(self, domain: str) -> None:
        """Before bouncing mail for a domain that "does not exist", check the resolver itself.

        A resolver with no way out (a sandbox, a broken network, a captive DNS) often answers
        NXDOMAIN for every name. The root zone always exists: when even its NS records do not
        resolve, the answer about ``domain`` means nothing and the mail must wait.
        """
        now = time.monotonic()
        with self._lock:
            if now - self._sane_checked_at < SANITY_TTL:
                healthy = self._sane
            else:
                healthy = None
        if healthy is None:
            import dns.exception

            try:
                healthy = bool(list(self._query(".", "NS")))
            except dns.exception.DNSException:
                healthy = False
            with self._lock:
                self._sane, self._sane_checked_at = healthy, now
            # Once per process (not per check, router or thread): the operator sees why all MX
            # mail waits without a log line per recipient.
            dns_health_notice.observe(healthy)
        if not healthy:
            raise RoutingError(
                f"DNS says {domain} does not exist, but the resolver cannot resolve the root "
                f"zone either, so DNS is not working; {RELAY_HINT}",
                permanent=False, enhanced_code="4.4.3")

    @staticmethod
    def _temporary(what: str, exc: Exception) -> RoutingError:
        return RoutingError(f"{what} failed: {_describe(exc)}; {RELAY_HINT}",
                            permanent=False, enhanced_code="4.4.3")


def _describe(exc: Exception) -> str:
    import dns.exception
    import dns.resolver

    if isinstance(exc, dns.exception.Timeout):
        return "DNS timeout"
    if isinstance(exc, dns.resolver.NoNameservers):
        return "no name server answered (SERVFAIL)"
    return str(exc) or type(exc).__name__


def _by_preference(records: list[Any]) -> list[Any]:
    """Lowest preference first; equal preferences shuffled to spread the load (RFC 5321 5.1)."""
    shuffled = list(records)
    random.shuffle(shuffled)
    return sorted(shuffled, key=lambda rr: rr.preference)

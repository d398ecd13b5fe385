"""The DNS resolver of this host's lookups (MX routing, the domain check).

``ELEMTA_DNS_SERVERS`` names the servers (``ip`` or ``ip:port``); empty means the system's
(/etc/resolv.conf). Tests and trials point it at a DNS server of their own on loopback.
"""

from __future__ import annotations

from collections.abc import Sequence

import dns.nameserver
import dns.resolver


def make_resolver(servers: Sequence[tuple[str, int]], timeout: float) -> dns.resolver.Resolver:
    """A resolver asking ``servers`` (the system's when empty); each lookup at most
    ``timeout`` seconds. Raises ``NoResolverConfiguration`` when there is none at all."""
    resolver = dns.resolver.Resolver(configure=not servers)
    if servers:
        resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port)
                                for host, port in servers]
    resolver.lifetime = timeout
    return resolver

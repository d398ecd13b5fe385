"""SPF evaluated by pyspf (RFC 7208), through the domain check's resolver.

pyspf looks names up through one module function, ``spf.DNSLookup`` (it picks dnspython's or
pydns' at import). We put ours in its place, once: it asks the resolver of the evaluation in
progress (a context variable, so concurrent checks with different resolvers never mix), never
the system's, and uses dnspython's current API (pyspf's calls a deprecated one).
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import Any

import dns.exception
import dns.resolver
import spf

_resolver: contextvars.ContextVar[Any] = contextvars.ContextVar("elemta_spf_resolver")
LOOKUP_SECONDS = 20  # RFC 7208 4.6.4: the whole evaluation


def _dns_lookup(name: str, qtype: str, tcpfallback: bool = True,
                timeout: float = 30) -> list[tuple[tuple[str, str], Any]]:
    """pyspf's DNSLookup contract: ``[((name, type), value)]``; TempError when DNS fails."""
    resolver = _resolver.get(None)
    if resolver is None:
        raise spf.TempError("DNS: no resolver for this SPF evaluation")
    try:
        answers = resolver.resolve(name, qtype, lifetime=timeout)
    except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
        return []
    except dns.exception.DNSException as exc:
        raise spf.TempError(f"DNS {exc}") from None
    result: list[tuple[tuple[str, str], Any]] = []
    for rdata in answers:
        if qtype in ("A", "AAAA"):
            result.append(((name, qtype), rdata.address))
        elif qtype == "MX":
            result.append(((name, qtype), (rdata.preference, rdata.exchange)))
        elif qtype == "PTR":
            result.append(((name, qtype), rdata.target.to_text(True)))
        elif qtype in ("TXT", "SPF"):
            result.append(((name, qtype), rdata.strings))
    return result


spf.DNSLookup = _dns_lookup


@dataclass(frozen=True)
class SpfRecord:
    record: str | None  # None: no SPF record
    error: str | None = None  # two records, DNS failure
    temporary: bool = False


@dataclass(frozen=True)
class SpfResult:
    ip: str
    result: str  # pass | fail | softfail | neutral | none | permerror | temperror
    explanation: str


def _query(domain: str, ip: str, helo: str) -> spf.query:
    return spf.query(i=ip, s=f"postmaster@{domain}", h=helo, timeout=LOOKUP_SECONDS,
                     querytime=LOOKUP_SECONDS)


def spf_record(resolver: Any, domain: str) -> SpfRecord:
    token = _resolver.set(resolver)
    try:
        return SpfRecord(_query(domain, "192.0.2.1", domain).dns_spf(domain))
    except spf.PermError as exc:
        return SpfRecord(None, str(exc))
    except spf.TempError as exc:
        return SpfRecord(None, str(exc), temporary=True)
    finally:
        _resolver.reset(token)


def evaluate(resolver: Any, domain: str, ip: str, helo: str) -> SpfResult:
    """What a receiver concludes for mail from ``@domain`` arriving from ``ip``."""
    token = _resolver.set(resolver)
    try:
        result, _code, explanation = _query(domain, ip, helo).check()
    finally:
        _resolver.reset(token)
    return SpfResult(ip, str(result), str(explanation))

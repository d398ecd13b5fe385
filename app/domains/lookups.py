"""DNS answers for the domain check: records, or why there are none, never an exception."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import dns.exception
import dns.resolver
import dns.reversename


@dataclass
class Answer:
    """Records found (as text), or ``missing`` (NXDOMAIN / no record) or ``error`` (DNS failed)."""

    records: list[str] = field(default_factory=list)
    nxdomain: bool = False
    error: str | None = None

    @property
    def missing(self) -> bool:
        return not self.records and self.error is None


class Lookups:
    """One resolver's answers, as text."""

    def __init__(self, resolver: Any) -> None:
        self.resolver = resolver

    def query(self, name: str, rdtype: str) -> Answer:
        try:
            rrset = self.resolver.resolve(name, rdtype)
        except dns.resolver.NXDOMAIN:
            return Answer(nxdomain=True)
        except dns.resolver.NoAnswer:
            return Answer()
        except dns.exception.Timeout:
            return Answer(error=f"DNS timeout looking up {rdtype} {name}")
        except dns.resolver.NoNameservers:
            return Answer(error=f"no name server answered for {rdtype} {name} (SERVFAIL)")
        except dns.exception.DNSException as exc:
            return Answer(error=f"DNS error looking up {rdtype} {name}: {exc}")
        return Answer(records=[_text(rdtype, rdata) for rdata in rrset])

    def txt(self, name: str, prefix: str | None = None) -> Answer:
        """TXT records at ``name`` (strings joined); only those starting ``prefix`` (case-
        insensitive) when given, as SPF, DKIM and DMARC pick theirs among others."""
        answer = self.query(name, "TXT")
        if prefix is not None:
            answer.records = [r for r in answer.records
                              if r.lower().replace(" ", "").startswith(prefix.lower())]
        return answer

    def ptr(self, ip: str) -> Answer:
        return self.query(dns.reversename.from_address(ip).to_text(), "PTR")

    def addresses(self, name: str) -> Answer:
        """A and AAAA together; an error of either is the answer's error."""
        found = [self.query(name, rdtype) for rdtype in ("A", "AAAA")]
        errors = [a.error for a in found if a.error]
        return Answer(records=[r for a in found for r in a.records],
                      nxdomain=all(a.nxdomain for a in found),
                      error=errors[0] if errors and not any(a.records for a in found) else None)


def _text(rdtype: str, rdata: Any) -> str:
    if rdtype == "TXT":
        return b"".join(rdata.strings).decode("utf-8", "replace")
    if rdtype in ("PTR", "CNAME"):
        return rdata.target.to_text(omit_final_dot=True).lower()
    if rdtype == "MX":  # "10 mx.example.com." ; a null MX (RFC 7505) is "0 ."
        return f"{rdata.preference} {rdata.exchange.to_text().lower()}"
    return rdata.to_text()

"""A DNS server on loopback for the tests (dnslib): the zone is a dict the test edits.

    with LoopbackDns() as dns:
        dns.add("s1._domainkey.example.com", "TXT", "v=DKIM1; k=rsa; p=...")
        resolver = dns.resolver()   # dnspython, asking only this server

Names not in the zone are NXDOMAIN; a name with records of other types answers NOERROR with
nothing. UDP and TCP on the same port (large TXT records, truncation). ``python -m
tests.dns_server ZONE.json PORT READY_FILE`` serves a zone dumped by ``LoopbackDns.dump`` the
same way, for a tool that can only ask port 53 (in a private namespace: tests/dkim_verifiers.py).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import dns.resolver
from dnslib import AAAA, MX, PTR, QTYPE, RCODE, RR, TXT, A, DNSRecord
from dnslib.server import BaseResolver, DNSLogger, DNSServer

from app.dnsresolver import make_resolver
from tests.smtpd_helpers import free_port

TTL = 60


def _rdata(rtype: str, value: str) -> Any:
    if rtype == "TXT":  # character-strings of at most 255 octets
        raw = value.encode()
        return TXT([raw[i:i + 255] for i in range(0, len(raw), 255)] or [b""])
    if rtype == "A":
        return A(value)
    if rtype == "AAAA":
        return AAAA(value)
    if rtype == "PTR":
        return PTR(value)
    if rtype == "MX":
        preference, exchange = value.split()
        return MX(exchange, int(preference))
    raise ValueError(rtype)


class ZoneResolver(BaseResolver):
    def __init__(self) -> None:
        self.records: dict[str, list[tuple[str, str]]] = defaultdict(list)
        self.lock = threading.Lock()
        self.queries: list[tuple[str, str]] = []

    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        reply = request.reply()
        name = str(request.q.qname).rstrip(".").lower()
        rtype = QTYPE[request.q.qtype]
        with self.lock:
            self.queries.append((name, rtype))
            if name not in self.records:
                reply.header.rcode = RCODE.NXDOMAIN
                return reply
            for kind, value in self.records[name]:
                if kind == rtype:
                    reply.add_answer(RR(request.q.qname, getattr(QTYPE, kind), ttl=TTL,
                                        rdata=_rdata(kind, value)))
        return reply


class _Quiet(DNSLogger):
    def __init__(self) -> None:
        super().__init__(log="-request,-reply,-truncated,-error,-recv,-send,-data")


class LoopbackDns:
    def __init__(self, port: int | None = None, address: str = "127.0.0.1") -> None:
        self.address = address
        self.port = port or free_port()
        self.zone = ZoneResolver()
        self._servers = [DNSServer(self.zone, port=self.port, address=address, tcp=tcp,
                                   logger=_Quiet()) for tcp in (False, True)]

    def add(self, name: str, rtype: str, value: str) -> None:
        with self.zone.lock:
            self.zone.records[name.rstrip(".").lower()].append((rtype, value))

    def remove(self, name: str, rtype: str | None = None) -> None:
        with self.zone.lock:
            key = name.rstrip(".").lower()
            self.zone.records[key] = [r for r in self.zone.records[key]
                                      if rtype is not None and r[0] != rtype]
            if not self.zone.records[key]:
                del self.zone.records[key]

    def dump(self) -> dict[str, list[list[str]]]:
        with self.zone.lock:
            return {name: [list(r) for r in records] for name, records in
                    self.zone.records.items()}

    def resolver(self) -> dns.resolver.Resolver:
        return make_resolver([(self.address, self.port)], timeout=5)

    def txt(self, name: bytes, timeout: float = 5) -> bytes:
        """dkimpy's ``dnsfunc``: the TXT record of ``name``, strings joined (b"" if none)."""
        try:
            answer = self.resolver().resolve(name.decode().rstrip("."), "TXT")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return b""
        return b"".join(next(iter(answer)).strings)

    def __enter__(self) -> LoopbackDns:
        for server in self._servers:
            server.start_thread()
        return self

    def __exit__(self, *exc: object) -> None:
        for server in self._servers:
            server.stop()
            server.server.server_close()


def serve_zone_file(zone_file: str, port: str, ready_file: str) -> None:
    server = LoopbackDns(port=int(port))
    for name, records in json.loads(Path(zone_file).read_text()).items():
        for rtype, value in records:
            server.add(name, rtype, value)
    with server:
        Path(ready_file).write_text("ready")
        while True:
            time.sleep(3600)


if __name__ == "__main__":
    serve_zone_file(*sys.argv[1:4])

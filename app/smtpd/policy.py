"""Who may hand us mail, and which envelope addresses we take (API.md §11).

Elemta has no local mailboxes: every accepted recipient is relayed. So the relay policy is the
whole acceptance policy: a client may send when its address is in ``ELEMTA_RELAY_NETWORKS`` or
when it authenticated with an API key; nobody else may send to anyone.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# RFC 5321 4.5.3.1: local part 64, whole path 256 octets; the column holds 320.
MAX_LOCAL_PART = 64
MAX_ADDRESS = 254
# C0 controls and DEL, and the C1 controls (U+0080-U+009F): one regex search instead of a
# Python-level test of every character (two addresses a message).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Any character ``str.isspace`` takes for a space (``\s`` of a str pattern is the same test).
_SPACE = re.compile(r"\s")


# Hosts already parsed by client_ip (every connection parses its peer's: ~2 us a time); a
# few clients send most connections. Cleared when full rather than kept in LRU order.
_PARSED: dict[str, IPAddress | None] = {}
_PARSED_MAX = 4096


def client_ip(address: object) -> IPAddress | None:
    """The IP of a peer as asyncio reports it (``(host, port[, flow, scope])``), unmapped."""
    host = address[0] if isinstance(address, (tuple, list)) and address else address
    if not isinstance(host, str):
        return None
    try:
        return _PARSED[host]
    except KeyError:
        pass
    ip = _parse_ip(host)
    if len(_PARSED) >= _PARSED_MAX:
        _PARSED.clear()
    _PARSED[host] = ip
    return ip


def _parse_ip(host: str) -> IPAddress | None:
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # a dual-stack socket shows IPv4 clients as ::ffff:a.b.c.d
    return ip


def in_networks(ip: IPAddress | None, networks: Sequence[IPNetwork]) -> bool:
    return ip is not None and any(ip.version == net.version and ip in net for net in networks)


@dataclass(frozen=True)
class RelayPolicy:
    networks: tuple[IPNetwork, ...]
    # Clients already looked up (asked at every connection and every RCPT); cleared when full.
    _trusted: dict[IPAddress, bool] = field(default_factory=dict, compare=False, repr=False)

    def trusted(self, ip: IPAddress | None) -> bool:
        """A client of the relay networks: may send without authenticating."""
        if ip is None:
            return False
        known = self._trusted.get(ip)
        if known is None:
            known = in_networks(ip, self.networks)
            if len(self._trusted) >= _PARSED_MAX:
                self._trusted.clear()
            self._trusted[ip] = known
        return known

    def may_relay(self, ip: IPAddress | None, authenticated: bool) -> bool:
        return authenticated or self.trusted(ip)

    @staticmethod
    def auth_allowed(ip: IPAddress | None, over_tls: bool) -> bool:
        """AUTH sends the key in clear text: only over TLS, or where no wire can be sniffed."""
        return over_tls or (ip is not None and ip.is_loopback)


def address_problem(address: str, *, is_sender: bool, smtputf8: bool) -> str | None:
    """Why an envelope address is unusable (an SMTP reply), or None when it is fine.

    aiosmtpd parses the path; this checks what delivery needs: a mailbox with a domain,
    lengths the database and remote servers take, valid UTF-8, non-ASCII only under SMTPUTF8.
    """
    if is_sender and address == "":
        return None  # the null sender <> of bounces
    try:
        address.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes arrive as surrogates
        return "553 5.1.7 Address is not valid UTF-8" if is_sender \
            else "553 5.1.3 Address is not valid UTF-8"
    if not address.isascii() and not smtputf8:
        return "553 5.6.7 Non-ASCII address requires SMTPUTF8"
    local, at, domain = address.rpartition("@")
    bad = "501 5.1.7 Bad sender address syntax" if is_sender \
        else "501 5.1.3 Bad recipient address syntax"
    if not at or not local or not domain or len(address) > MAX_ADDRESS \
            or len(local.encode("utf-8")) > MAX_LOCAL_PART:
        return bad
    # Spaces are legal only inside a quoted local part; control characters nowhere: C0 and
    # DEL, and under SMTPUTF8 also C1 (U+0080-U+009F, "UTF8-non-ascii" to RFC 6532's grammar
    # but no mailbox name; a NEL or CSI in an address is an injection attempt).
    if _CONTROL.search(address) is not None \
            or _SPACE.search(domain) is not None or domain.startswith(".") \
            or domain.endswith(".") or ".." in domain:
        return bad
    if domain.startswith("[") != domain.endswith("]"):
        return bad
    return None

"""Syntax of mailboxes (RFC 5321 ``Mailbox`` / RFC 5322 ``name-addr``), without any DNS lookup."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

# RFC 5322 atext; a dot-atom is atoms joined by single dots.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_ATOM = re.compile(rf"^{_ATEXT}+(?:\.{_ATEXT}+)*$")
_QUOTED = re.compile(r'^"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"$')
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_NAME_ADDR = re.compile(r"^(?P<name>[^<>]*?)\s*<(?P<addr>[^<>]*)>$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Every character str.splitlines() ends a line at. The email library folds and refuses headers
# by that rule, so a header value holding any of them (not only CR and LF) either breaks the
# header in two or makes the message impossible to build.
LINE_BREAKS = re.compile("[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")
LINE_BREAKS_REFUSED = "Must not contain line breaks (CR, LF or another line separator)."

MAX_ADDRESS = 254  # RFC 5321 path limit (256 with the angle brackets)
MAX_LOCAL = 64
MAX_DOMAIN = 253


@dataclass(frozen=True)
class Mailbox:
    """A parsed mailbox: the envelope address and an optional display name."""

    address: str
    display_name: str = ""


class AddressError(ValueError):
    """Not a syntactically valid mailbox; the message says why."""


def parse_mailbox(text: str) -> Mailbox:
    """``user@example.com`` or ``Name <user@example.com>``; raises ``AddressError``."""
    if LINE_BREAKS.search(text):
        raise AddressError(LINE_BREAKS_REFUSED)
    if _CONTROL.search(text):
        raise AddressError("Must not contain control characters.")
    text = text.strip()
    name = ""
    match = _NAME_ADDR.match(text)
    if match:
        name = match.group("name").strip()
        if len(name) >= 2 and name[0] == name[-1] == '"':
            name = name[1:-1]
        text = match.group("addr").strip()
    check_address(text)
    return Mailbox(address=text, display_name=name)


def check_header_text(value: str) -> None:
    """Raise ``AddressError`` when ``value`` cannot be one header line (a line break in it)."""
    if LINE_BREAKS.search(value):
        raise AddressError(LINE_BREAKS_REFUSED)


def check_address(address: str) -> None:
    """Raise ``AddressError`` unless ``address`` is an RFC 5321 ``Mailbox`` (local@domain)."""
    if not address:
        raise AddressError("Must not be empty.")
    if len(address) > MAX_ADDRESS:
        raise AddressError(f"Longer than {MAX_ADDRESS} characters.")
    local, at, domain = address.rpartition("@")
    if not at or not local:
        raise AddressError("Not an email address (local@domain).")
    if len(local) > MAX_LOCAL:
        raise AddressError(f"Local part longer than {MAX_LOCAL} characters.")
    if not (_DOT_ATOM.match(local) or _QUOTED.match(local)):
        raise AddressError("Invalid local part.")
    if domain.startswith("[") and domain.endswith("]"):
        _check_literal(domain[1:-1])
        return
    if len(domain) > MAX_DOMAIN or not all(_LABEL.match(label) for label in domain.split(".")):
        raise AddressError("Invalid domain.")


def _check_literal(literal: str) -> None:
    try:
        if literal.lower().startswith("ipv6:"):
            ipaddress.IPv6Address(literal[5:])
        else:
            ipaddress.IPv4Address(literal)
    except ValueError:
        raise AddressError("Invalid address literal.") from None

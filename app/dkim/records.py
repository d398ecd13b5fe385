"""Names and DNS records of DKIM keys: what the operator publishes, what a receiver looks up."""

from __future__ import annotations

import re
from dataclasses import dataclass

_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")
SELECTOR_RULE = ("letters, digits and hyphens, labels separated by dots (e.g. rsa-2026-01), "
                 "at most 63 characters")
# A TXT character-string holds at most 255 octets; longer values are split for zone files.
TXT_CHUNK = 255


class InvalidName(ValueError):
    """Not a usable domain or selector; the message says why."""


def normalise_domain(text: str) -> str:
    """A mail domain as DNS knows it: lower case, IDNA A-labels, no final dot."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidName("A domain is required.")
    value = text.strip().rstrip(".")
    import dns.exception  # here, not at import: the worker's start needs no dnspython
    import dns.name

    try:
        name = dns.name.from_unicode(value) if not value.isascii() else dns.name.from_text(value)
        ascii_name = name.to_text(omit_final_dot=True).lower()
    except (dns.exception.DNSException, UnicodeError, ValueError):
        raise InvalidName(f"{text!r} is not a domain name.") from None
    labels = ascii_name.split(".")
    if len(labels) < 2 or len(ascii_name) > 253 or not all(_LABEL.match(x) for x in labels):
        raise InvalidName(f"{text!r} is not a domain name (e.g. example.com).")
    return ascii_name


def check_selector(text: str) -> str:
    value = (text or "").strip().lower()
    if not value or len(value) > 63 or not all(_LABEL.match(x) for x in value.split(".")):
        raise InvalidName(f"Invalid selector: {SELECTOR_RULE}.")
    return value


def parent_domains(domain: str) -> list[str]:
    """``a.b.example.com`` -> itself and each parent with at least two labels, most specific
    first: the domains whose key may sign for it."""
    labels = domain.split(".")
    return [".".join(labels[i:]) for i in range(len(labels) - 1)]


def record_name(selector: str, domain: str) -> str:
    return f"{selector}._domainkey.{domain}"


def record_value(algorithm: str, public_key: str) -> str:
    return f"v=DKIM1; k={algorithm}; p={public_key}"


@dataclass(frozen=True)
class DnsRecord:
    """A record to publish: its name, type and value, and the same as a zone-file line."""

    name: str
    type: str
    value: str

    @property
    def zone_line(self) -> str:
        chunks = [self.value[i:i + TXT_CHUNK] for i in range(0, len(self.value), TXT_CHUNK)]
        quoted = " ".join(f'"{chunk}"' for chunk in chunks)
        return f"{self.name}. IN {self.type} {quoted}"

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "type": self.type, "value": self.value,
                "zone_line": self.zone_line}


def key_record(selector: str, domain: str, algorithm: str, public_key: str) -> DnsRecord:
    return DnsRecord(record_name(selector, domain), "TXT", record_value(algorithm, public_key))


def parse_tags(text: str) -> dict[str, str]:
    """``v=DKIM1; k=rsa; p=...`` -> {"v": "DKIM1", ...} (RFC 6376 3.2 tag lists; FWS removed
    from values, where base64 data may be broken by spaces)."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        name, sep, value = part.partition("=")
        if sep and name.strip():
            tags.setdefault(name.strip().lower(), re.sub(r"\s+", "", value))
    return tags

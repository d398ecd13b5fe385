"""How a webhook request is signed, and how a receiver checks it (docs/WEBHOOKS.md).

``Elemta-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>``. The key is
the webhook's secret as UTF-8 bytes (the whole ``whsec_...`` string); the message is the
timestamp in decimal, a dot, and the raw body bytes. Receivers compare in constant time and
refuse a timestamp too far from their clock (replays).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

SECRET_PREFIX = "whsec_"
SIGNATURE_HEADER = "Elemta-Signature"
DEFAULT_TOLERANCE = 300  # seconds a receiver should accept between t= and its clock


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def signature(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode("utf-8"), f"{timestamp}.".encode("ascii") + body,
                   hashlib.sha256)
    return mac.hexdigest()


def signature_header(secret: str, timestamp: int, body: bytes) -> str:
    return f"t={timestamp},v1={signature(secret, timestamp, body)}"


def verify(secret: str, header: str, body: bytes, now: int,
           tolerance: int = DEFAULT_TOLERANCE) -> bool:
    """What a receiver does: parse the header, recompute, compare, check the age."""
    fields: dict[str, list[str]] = {}
    for part in header.split(","):
        key, sep, value = part.strip().partition("=")
        if sep:
            fields.setdefault(key, []).append(value)
    try:
        timestamp = int(fields["t"][0])
    except (KeyError, ValueError):
        return False
    if abs(now - timestamp) > tolerance:
        return False
    expected = signature(secret, timestamp, body)
    return any(hmac.compare_digest(expected, given) for given in fields.get("v1", []))

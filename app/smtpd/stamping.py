"""What the listener adds to a message it accepts: a ``Received:`` trace header (RFC 5321
4.4) at the top, and a ``Message-ID`` (RFC 5322 3.6.4) and a ``Date`` (required by RFC 5322
3.6; added by a submission server, RFC 6409 8.1, as Postfix does for its clients) when the
client sent none. Receivers refuse or junk mail without a Date, and OpenDKIM will not even
verify it.

The rest of the message is kept byte for byte, except that a bare LF becomes CRLF: RFC 5321
2.3.8 allows no other line end, and receivers now refuse bare LFs (SMTP smuggling defences),
so a message stored with them could not be delivered.
"""

from __future__ import annotations

import email.utils
import re
from dataclasses import dataclass

from ..timeutil import rfc5322_date

_MESSAGE_ID_HEADER = re.compile(rb"^message-id[ \t]*:", re.IGNORECASE | re.MULTILINE)
_DATE_HEADER = re.compile(rb"^date[ \t]*:", re.IGNORECASE | re.MULTILINE)
_UNPRINTABLE = re.compile(r"[^\x21-\x7e]")
_BARE_LF = re.compile(rb"(?<!\r)\n")


@dataclass(frozen=True)
class Trace:
    """The facts of one SMTP transaction that go into its Received header."""

    helo: str
    client_ip: str
    hostname: str
    esmtp: bool
    tls: bool
    authenticated: bool
    smtputf8: bool
    recipients: tuple[str, ...]


def protocol_name(trace: Trace) -> str:
    """The ``with`` keyword of RFC 3848 / RFC 6531 (ESMTP, ESMTPSA, UTF8SMTPS, ...)."""
    if not trace.esmtp:
        return "SMTP"
    base = "UTF8SMTP" if trace.smtputf8 else "ESMTP"
    return base + ("S" if trace.tls else "") + ("A" if trace.authenticated else "")


def _clean(text: str, limit: int = 255) -> str:
    """The client's words (HELO name) made safe for a header: printable ASCII, bounded."""
    return _UNPRINTABLE.sub("?", text)[:limit] or "unknown"


def received_header(trace: Trace, newline: bytes) -> bytes:
    literal = f"IPv6:{trace.client_ip}" if ":" in trace.client_ip else trace.client_ip
    lines = [f"Received: from {_clean(trace.helo)} ([{literal}])",
             f"\tby {_clean(trace.hostname)} (Elemta) with {protocol_name(trace)}"]
    if len(trace.recipients) == 1 and trace.recipients[0].isascii():
        # Only for a single recipient: naming every recipient would disclose Bcc lists.
        lines.append(f"\tfor <{_clean(trace.recipients[0], 320)}>")
    lines[-1] += ";"
    lines.append("\t" + rfc5322_date())
    return newline.join(line.encode("ascii") for line in lines) + newline


def header_end(raw: bytes) -> int:
    """Offset of the blank line that ends the header section (len(raw) if there is none)."""
    if raw.startswith((b"\r\n", b"\n")):
        return 0
    crlf = raw.find(b"\n\r\n")
    # An LF-only blank line counts only before the CRLF one: not a scan of a 7 MB body for it.
    lf = raw.find(b"\n\n", 0, len(raw) if crlf < 0 else crlf + 1)
    ends = [i + 1 for i in (crlf, lf) if i >= 0]
    return min(ends) if ends else len(raw)


def has_message_id(raw: bytes) -> bool:
    return _MESSAGE_ID_HEADER.search(raw, 0, header_end(raw)) is not None


def has_date(raw: bytes) -> bool:
    return _DATE_HEADER.search(raw, 0, header_end(raw)) is not None


def stamp(raw: bytes, trace: Trace) -> bytes:
    """The message as it is queued: Received on top, Message-ID and Date added when missing
    (at the end of the header section)."""
    if raw.count(b"\n") != raw.count(b"\r\n"):  # two scans in C; the regex is 10x slower
        raw = _BARE_LF.sub(b"\r\n", raw)
    newline = b"\r\n"
    received = received_header(trace, newline)
    added = b""
    end = header_end(raw)
    if not _MESSAGE_ID_HEADER.search(raw, 0, end):
        added += (b"Message-ID: " + email.utils.make_msgid(domain=_clean(trace.hostname))
                  .encode() + newline)
    if not _DATE_HEADER.search(raw, 0, end):
        added += b"Date: " + rfc5322_date().encode() + newline
    if not added:
        return received + raw
    head = raw[:end]
    if head and not head.endswith(b"\n"):  # headers only, no final newline
        head += newline
    return received + head + added + raw[end:]

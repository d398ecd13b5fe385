"""Reading raw RFC 5322 content: headers in order, the subject, a text rendering."""

from __future__ import annotations

import email.errors
import email.header
import email.parser
import email.policy

_HEADER_PARSER = email.parser.BytesHeaderParser(policy=email.policy.compat32)


def _decode(value: str) -> str:
    """Unfold and decode RFC 2047 words; fall back to the raw value for broken encodings."""
    unfolded = value.replace("\r\n", "").replace("\n", "")
    try:
        return str(email.header.make_header(email.header.decode_header(unfolded)))
    except (ValueError, LookupError, UnicodeError, email.errors.HeaderParseError):
        return unfolded


def headers_of(raw: bytes) -> list[list[str]]:
    """``[[name, value], ...]`` in message order."""
    parsed = _HEADER_PARSER.parsebytes(raw)
    return [[name, _decode(str(value))] for name, value in parsed.items()]


def subject_of(raw: bytes) -> str:
    parsed = _HEADER_PARSER.parsebytes(raw)
    value = parsed.get("Subject")
    return _decode(str(value)) if value is not None else ""


def text_of(raw: bytes) -> str:
    """The raw message as text (UTF-8; undecodable bytes replaced, never an error)."""
    return raw.decode("utf-8", errors="replace")

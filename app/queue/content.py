"""Reading raw RFC 5322 content: headers in order, the subject, a text rendering."""

from __future__ import annotations

import email.errors
import email.parser
import email.policy
from email.headerregistry import HeaderRegistry, UnstructuredHeader

_HEADER_PARSER = email.parser.BytesHeaderParser(policy=email.policy.compat32)
# Every header read as unstructured text: encoded words are decoded wherever they stand, text
# around them is kept as it is (non-ASCII included), and a broken word is a defect, not an
# exception. email.header.decode_header cannot mix raw UTF-8 text with encoded words.
_UNSTRUCTURED = HeaderRegistry(default_class=UnstructuredHeader, use_default_map=False)


def _decode(value: str) -> str:
    """Unfold, read raw 8-bit bytes as UTF-8 and decode RFC 2047 words."""
    unfolded = value.replace("\r\n", "").replace("\n", "")
    if not unfolded.isascii():
        # The compat32 parser keeps 8-bit header bytes as surrogate escapes. SMTPUTF8 (RFC
        # 6532) and every 8BITMIME client in practice send UTF-8; other bytes become U+FFFD.
        unfolded = unfolded.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    if "=?" not in unfolded:
        return unfolded  # the common case, without the (slow) header parser
    try:
        decoded = str(_UNSTRUCTURED("X-Elemta-Decode", unfolded))
    except (ValueError, LookupError, UnicodeError, email.errors.HeaderParseError):
        return unfolded
    # A word in an unknown charset can leave surrogate escapes: not valid in JSON text.
    return decoded.encode("utf-8", "replace").decode("utf-8")


def _raw_headers(raw: bytes) -> list[tuple[str, str]]:
    # raw_items(): values as stored. items() would hand 8-bit values over as Header objects
    # in the "unknown-8bit" charset, whose str() has already replaced every byte with U+FFFD.
    # Only the header section goes to the parser: it would read (and split into lines) the
    # whole body, 7 MB for a large message, to return the same header fields.
    crlf = raw.find(b"\n\r\n")
    lf = raw.find(b"\n\n", 0, len(raw) if crlf < 0 else crlf + 1)  # only before the CRLF one
    ends = [i for i in (lf, crlf) if i >= 0]
    head = raw[:min(ends) + 1] if ends else raw
    return list(_HEADER_PARSER.parsebytes(head).raw_items())


def headers_of(raw: bytes) -> list[list[str]]:
    """``[[name, value], ...]`` in message order."""
    return [[name, _decode(value)] for name, value in _raw_headers(raw)]


def subject_of(raw: bytes) -> str:
    for name, value in _raw_headers(raw):
        if name.lower() == "subject":
            return _decode(value)
    return ""


def text_of(raw: bytes) -> str:
    """The raw message as text (UTF-8; undecodable bytes replaced, never an error)."""
    return raw.decode("utf-8", errors="replace")

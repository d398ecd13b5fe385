"""Reading raw RFC 5322 content: headers in order, the subject, a text rendering."""

from __future__ import annotations

import email.errors
import email.parser
import email.policy
import re
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


def _header_section(raw: bytes) -> bytes:
    # Only the header section goes to the parser: it would read (and split into lines) the
    # whole body, 7 MB for a large message, to return the same header fields.
    crlf = raw.find(b"\n\r\n")
    lf = raw.find(b"\n\n", 0, len(raw) if crlf < 0 else crlf + 1)  # only before the CRLF one
    ends = [i for i in (lf, crlf) if i >= 0]
    return raw[:min(ends) + 1] if ends else raw


def _raw_headers(raw: bytes) -> list[tuple[str, str]]:
    # raw_items(): values as stored. items() would hand 8-bit values over as Header objects
    # in the "unknown-8bit" charset, whose str() has already replaced every byte with U+FFFD.
    return list(_HEADER_PARSER.parsebytes(_header_section(raw)).raw_items())


# A field line as the parser's feedparser.headerRE takes it, with a non-empty name (a line
# ":x" is skipped by the parser, which then folds the lines after it into the field before).
_FIELD = re.compile(rb"[\x21-\x39\x3b-\x7e]+:")
# Control characters other than tab, CR and LF: some Pythons' parsers end lines at \x0b, \x0c,
# \x1c-\x1e too (str.splitlines); such rare sections go to the parser.
_UNUSUAL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def headers_of(raw: bytes) -> list[list[str]]:
    """``[[name, value], ...]`` in message order."""
    return [[name, _decode(value)] for name, value in _raw_headers(raw)]


def plain_subject(head: bytes) -> str | None:
    """``subject_of`` without the email parser, for the header section of nearly every
    message: ASCII without control characters, no encoded word (``=?``), lines ended by CRLF
    or LF (no bare CR), each a field or the folded continuation of one, up to the first blank
    line. None for anything else: the parser decides then (``subject_of``). The parser costs
    ~0.1 ms a message in the listener; tests/test_queue_content.py checks that both agree."""
    if not head.isascii() or b"=?" in head or _UNUSUAL.search(head):
        return None
    text = head.replace(b"\r\n", b"\n")
    if b"\r" in text:
        return None
    lines = text.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    parts: list[bytes] | None = None
    for n, line in enumerate(lines):
        if line[:1] in (b" ", b"\t"):
            if n == 0:
                return None
            if parts is not None:
                parts.append(line)
            continue
        match = _FIELD.match(line)
        if match is None:  # a blank line, "From ...", a line without a name: the parser's
            return None
        if parts is not None:
            break  # the subject field is complete
        if line[:match.end() - 1].lower() == b"subject":
            parts = [line[match.end():].lstrip(b" \t")]
    return "" if parts is None else b"".join(parts).decode("ascii")


def subject_of(raw: bytes) -> str:
    head = _header_section(raw)
    plain = plain_subject(head)
    if plain is not None:
        return plain
    for name, value in _HEADER_PARSER.parsebytes(head).raw_items():
        if name.lower() == "subject":
            return _decode(value)
    return ""


def text_of(raw: bytes) -> str:
    """The raw message as text (UTF-8; undecodable bytes replaced, never an error)."""
    return raw.decode("utf-8", errors="replace")

"""``subject_of``'s fast path (``plain_subject``, no email parser) finds exactly the subject
the parser finds, on thousands of generated header sections: plain ones (which it must take)
and odd ones (folding, bare CR, blank lines, ``From `` lines, nameless fields, encoded words,
8-bit bytes, control characters), where it either agrees or leaves the parser to decide."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.queue import content

NAMES = ["Subject", "subject", "SUBJECT", "Subject ", "X-Subject", "Subjects", "From", "To",
         "Message-ID", "", "From x", "Re:Subject", "Sub\x7fject", "Date"]
ENDINGS = ["\r\n", "\r\n", "\r\n", "\n", "\r"]
VALUE_TEXT = st.lists(st.sampled_from(
    list("abcXYZ019 \t:;,.<>@=?-_\"()") + ["=?", "?=", "=?utf-8?q?caf=C3=A9?=", "\x00",
                                           "\x0b", "\x0c", "\x1d", "é", "\udcff"]),
    max_size=20).map("".join)


def _reference(raw: bytes) -> str:
    """``subject_of`` as it was: the parser alone."""
    for name, value in content._raw_headers(raw):
        if name.lower() == "subject":
            return content._decode(value)
    return ""


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


@st.composite
def header_section(draw, plain: bool) -> bytes:  # type: ignore[no-untyped-def]
    names = NAMES[:8] if plain else NAMES
    ascii_value = st.text(alphabet=st.sampled_from(list("abcXYZ019 \t:;,.<>@-_\"()")),
                          max_size=30)
    value = ascii_value if plain else VALUE_TEXT
    endings = ["\r\n", "\n"] if plain else ENDINGS
    lines = []
    if not plain and draw(st.booleans()):
        lines.append(draw(st.sampled_from(["From alice@example.com Mon Jan 1\r\n", " lead\r\n",
                                           "\r\n", ":nameless\r\n"])))
    for _ in range(draw(st.integers(1 if plain else 0, 8))):
        name = draw(st.sampled_from(names))
        if plain and " " in name:
            name = name.strip()
        ending = draw(st.sampled_from(endings))
        lines.append(f"{name}:{draw(st.sampled_from(['', ' ', '  ', chr(9)]))}"
                     f"{draw(value)}{ending}")
        for _ in range(draw(st.integers(0, 2))):  # folded continuation lines
            lines.append(f"{draw(st.sampled_from([' ', chr(9), '  ']))}{draw(value)}{ending}")
        if not plain and draw(st.integers(0, 9)) == 0:
            lines.append(draw(st.sampled_from(["\r\n", "not a field\r\n", ":x\r\n", "\r",
                                               "From y\r\n"])))
    body = draw(st.sampled_from(["\r\nbody\r\nSubject: not this\r\n", "\n\nbody\n", ""]))
    return _encode("".join(lines) + body)


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header_section(plain=True))
def test_plain_sections_take_the_fast_path_and_agree_with_the_parser(raw: bytes) -> None:
    assert content.plain_subject(content._header_section(raw)) is not None
    assert content.subject_of(raw) == _reference(raw)


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header_section(plain=False))
def test_any_section_gets_the_subject_the_parser_finds(raw: bytes) -> None:
    assert content.subject_of(raw) == _reference(raw)


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_get_the_subject_the_parser_finds(raw: bytes) -> None:
    assert content.subject_of(raw) == _reference(raw)


def test_the_usual_message_is_read_without_the_parser(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    def never(_head: bytes) -> None:
        raise AssertionError("parsed")

    monkeypatch.setattr(content._HEADER_PARSER, "parsebytes", never)
    raw = (b"Received: from client.example\r\n\tby mx.example; Fri, 4 Dec 2026 11:00:00 +0000\r\n"
           b"From: Alice <alice@example.com>\r\nSubject: Quarterly report,\r\n  draft 2\r\n"
           b"To: bob@example.net\r\n\r\nSubject: body\r\n")
    assert content.subject_of(raw) == "Quarterly report,  draft 2"

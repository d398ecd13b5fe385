"""SMTP replies (``delivery.smtp_client``) and what a bounce reports (``delivery.bounces``)."""

from __future__ import annotations

import pytest

from app.delivery.bounces import dsn_status, original_headers
from app.delivery.smtp_client import (
    TEXT_LIMIT,
    RecipientResult,
    clean_remote,
    enhanced_of,
    kind_of,
    reply_text,
)


@pytest.mark.parametrize(("code", "kind"), [
    (250, "delivered"), (251, "delivered"), (299, "delivered"),
    (421, "tempfail"), (450, "tempfail"), (452, "tempfail"),
    (500, "rejection"), (550, "rejection"), (554, "rejection"),
])
def test_reply_classes(code, kind):
    assert kind_of(code) == kind


def test_reply_text_joins_the_lines_of_a_multiline_reply():
    assert reply_text(550, b"5.1.1 no such\n  user here") == "550 5.1.1 no such user here"
    assert reply_text(250, "") == "250"


def test_reply_text_survives_undecodable_bytes():
    assert reply_text(451, b"caf\xe9 closed") == "451 caf\ufffd closed"


@pytest.mark.parametrize(("response", "code", "enhanced"), [
    (b"5.1.1 no such user", 550, "5.1.1"),
    (b"  4.7.1 greylisted", 451, "4.7.1"),
    ("2.0.0 Ok: queued", 250, "2.0.0"),
    (b"4.2.2 mailbox full", 552, None),  # class disagrees with the reply code: not trusted
    (b"no enhanced code", 550, None),
    (b"5.1.1 user", None, None),
    (b"5.1.1234 too long a detail", 550, None),
])
def test_enhanced_status_codes(response, code, enhanced):
    assert enhanced_of(response, code) == enhanced


def test_clean_remote_replaces_control_characters_and_bounds_the_length():
    assert clean_remote(None) is None
    assert clean_remote("a\r\nb\tc\x00d\x1b[31m\x85") == "a b c?d?[31m?"
    assert clean_remote("\ud800x") == "?x"
    long = clean_remote("x" * (TEXT_LIMIT + 50))
    assert long is not None and len(long) == TEXT_LIMIT and long.endswith("...")
    assert clean_remote("x" * TEXT_LIMIT) == "x" * TEXT_LIMIT


def test_clean_remote_keeps_a_printable_text_and_treats_every_unsafe_character_alike():
    """The shortcut for printable texts gives what the substitution gives, for every
    character the substitution matches and a few it does not (one at a time, in a text)."""
    import re

    unsafe = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\ud800-\udfff]")

    def by_substitution(text: str, limit: int = TEXT_LIMIT) -> str:
        text = unsafe.sub("?", text.replace("\r\n", " ").replace("\t", " "))
        return text if len(text) <= limit else text[: limit - 3] + "..."

    assert clean_remote("250 2.0.0 Ok: queued as 4Xyz") == "250 2.0.0 Ok: queued as 4Xyz"
    for code in [*range(0x00, 0x300), *range(0xD800, 0xE000), 0x2028, 0x200B, 0xFEFF, 0x10FFFF]:
        for text in (chr(code), f"250 ok {chr(code)} x", f"a\r\n{chr(code)}\tb"):
            assert clean_remote(text) == by_substitution(text), hex(code)
            assert clean_remote(text, 4) == by_substitution(text, 4), hex(code)


def test_a_recipient_result_is_sanitised_once_on_creation():
    result = RecipientResult(recipient_id=1, address="bob@example.net", kind="tempfail",
                             text="451\x00 later", remote_host="mx\x07.example.net",
                             remote_ip="192.0.2.1")
    assert (result.text, result.remote_host, result.remote_ip) == (
        "451? later", "mx?.example.net", "192.0.2.1")


@pytest.mark.parametrize(("enhanced", "code", "expired", "status"), [
    ("5.1.1", 550, False, "5.1.1"),
    (None, 550, False, "5.0.0"),
    ("4.2.2", 452, False, "5.0.0"),  # a temporary code never stands for a permanent failure
    ("4.4.1", 451, True, "4.4.7"),  # delivery time expired (RFC 3463)
    ("5.1.1", 550, True, "4.4.7"),
])
def test_dsn_status(enhanced, code, expired, status):
    assert dsn_status(enhanced, code, expired) == status


@pytest.mark.parametrize(("raw", "headers"), [
    (b"From: a\r\nTo: b\r\n\r\nbody\r\n\r\nmore", b"From: a\r\nTo: b"),
    (b"From: a\nTo: b\n\nbody", b"From: a\nTo: b"),
    (b"From: a\r\n\r\nx\n\ny", b"From: a"),
    (b"From: a\r\nNo body", b"From: a\r\nNo body"),
])
def test_a_bounce_quotes_only_the_original_headers(raw, headers):
    assert original_headers(raw) == headers

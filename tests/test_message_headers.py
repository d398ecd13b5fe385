"""The header reads of the acceptance path: only the header section counts, whatever the body
holds (the parser is given the header section alone, not a 7 MB body), and bare LFs become
CRLF only where they are (the stamp checks for them before rewriting)."""

from __future__ import annotations

import pytest

from app.queue.content import headers_of, subject_of
from app.smtpd.stamping import Trace, stamp

TRACE = Trace(helo="client.example", client_ip="127.0.0.1", hostname="mx.example", esmtp=True,
              tls=False, authenticated=False, smtputf8=False, recipients=("bob@example.net",))


@pytest.mark.parametrize("raw, subject, names", [
    (b"Subject: a\r\nFrom: x@example.com\r\n\r\nSubject: body\r\n", "a", ["Subject", "From"]),
    (b"Subject: lf only\n\nSubject: body\n", "lf only", ["Subject"]),
    (b"From: x\r\n\r\n", "", ["From"]),
    (b"Subject: no body, no blank line", "no body, no blank line", ["Subject"]),
    (b"\r\nSubject: in the body", "", []),
    (b"Subject: folded\r\n  twice\r\n\r\n" + b"x" * 100_000, "folded  twice", ["Subject"]),
])
def test_headers_come_from_the_header_section_only(raw, subject, names):
    assert subject_of(raw) == subject
    assert [name for name, _value in headers_of(raw)] == names


@pytest.mark.parametrize("raw, stored_tail", [
    (b"Message-ID: <1@x>\r\nDate: Thu, 3 Dec 2026 10:00:00 +0000\r\n\r\nok\r\n", b"\r\n\r\nok\r\n"),
    (b"Message-ID: <1@x>\nDate: Thu, 3 Dec 2026 10:00:00 +0000\n\nbare\n", b"\r\n\r\nbare\r\n"),
    (b"Message-ID: <1@x>\r\nDate: Thu, 3 Dec 2026 10:00:00 +0000\r\n\r\nmix\nend\r\n",
     b"\r\n\r\nmix\r\nend\r\n"),
])
def test_stamp_turns_only_bare_lfs_into_crlf(raw, stored_tail):
    stored = stamp(raw, TRACE)
    assert stored.startswith(b"Received: from client.example")
    assert stored.endswith(stored_tail)
    assert stored.count(b"\n") == stored.count(b"\r\n")

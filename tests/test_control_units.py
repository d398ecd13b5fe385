"""The pure parts of delivery control: policy matching, backoff, reply classification."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import pytest

from app.control.backoff import BackoffState, after_throttle, is_throttling, reduced
from app.control.limits import chunk_for, window_start, windows_of
from app.control.policies import PolicyBook, PolicyRow, normalise_pattern
from app.control.suppression import suppresses
from app.errors import ValidationFailed

T0 = dt.datetime(2026, 12, 3, 12, 0, 5, tzinfo=dt.UTC)


def row(id_, kind, pattern, **limits):
    values = {"max_connections": None, "messages_per_connection": None,
              "messages_per_minute": None, "messages_per_hour": None, "require_tls": False}
    values.update(limits)
    return PolicyRow(id_, kind, pattern, **values)


def test_the_most_specific_policy_applies_with_its_limit_key():
    book = PolicyBook([row(1, "default", "*", max_connections=4),
                       row(2, "domain", "example.com", max_connections=2),
                       row(3, "domain", "*.example.org", messages_per_minute=60),
                       row(4, "mx", "*.google.com", max_connections=10)], 10)
    exact = book.limits_for("example.com", "Example.com")
    assert (exact.key, exact.policy_id, exact.max_connections) == ("dest:example.com", 2, 2)
    sub = book.limits_for("a.example.org", "a.example.org")
    assert (sub.key, sub.max_connections, sub.messages_per_minute) == (
        "domain:*.example.org", 10, 60)
    assert book.needs_hosts("customer.example") and not book.needs_hosts("example.com")
    google = book.limits_for("customer.example", "customer.example",
                             ["aspmx.l.google.com", "alt1.aspmx.l.google.com"])
    assert (google.key, google.max_connections) == ("mx:*.google.com", 10)
    other = book.limits_for("else.example", "else.example", ["mx.else.example"])
    assert (other.key, other.policy_id, other.max_connections) == ("dest:else.example", 1, 4)
    bare = PolicyBook([], 7).limits_for("x.example", "x.example")
    assert (bare.shared, bare.max_connections) == (False, 7)


@pytest.mark.parametrize("kind,pattern,stored", [
    ("domain", "Example.COM.", "example.com"), ("domain", "*.example.com", "*.example.com"),
    ("domain", "bücher.example", "xn--bcher-kva.example"), ("mx", "*.Google.com", "*.google.com"),
    ("default", None, "*")])
def test_patterns_are_normalised(kind, pattern, stored):
    assert normalise_pattern(kind, pattern) == stored


@pytest.mark.parametrize("kind,pattern", [
    ("domain", "a b.example"), ("domain", "*"), ("domain", "example.*"), ("mx", "*.*"),
    ("domain", ""), ("mx", "a..b"), ("default", "example.com"), ("cloud", "x")])
def test_bad_patterns_are_refused(kind, pattern):
    with pytest.raises(ValidationFailed):
        normalise_pattern(kind, pattern)


@dataclass
class Reply:
    kind: str
    text: str
    smtp_code: int | None = None
    enhanced_code: str | None = None


@pytest.mark.parametrize("reply,throttling", [
    (Reply("tempfail", "421 4.7.0 Try again later", 421, "4.7.0"), True),
    (Reply("tempfail", "451 4.7.650 The mail server has been temporarily rate limited", 451,
           "4.7.650"), True),
    (Reply("tempfail", "Could not connect to any server for x: mx[1.2.3.4]:25: 421 Too many "
                       "connections"), True),
    (Reply("tempfail", "450 4.7.1 Greylisted, try again", 450, "4.7.1"), False),
    (Reply("tempfail", "TLS failure with x", None, "4.7.5"), False),
    (Reply("tempfail", "451 4.3.0 Local problem", 451, "4.3.0"), False),
    (Reply("rejection", "550 5.7.1 Rejected", 550, "5.7.1"), False),
])
def test_throttling_replies(reply, throttling):
    assert is_throttling(reply) is throttling


def test_backoff_pauses_grows_and_recovers_step_by_step():
    level, until = after_throttle(None, T0)
    assert (level, (until - T0).total_seconds()) == (1, 30)
    state = BackoffState("k", level, until, T0, "421", 1)
    assert after_throttle(state, T0 + dt.timedelta(seconds=10)) is None  # paused already
    level2, until2 = after_throttle(state, until + dt.timedelta(seconds=5))
    assert (level2, (until2 - until).total_seconds()) == (2, 65)
    state = BackoffState("k", 3, T0, T0, "421", 3)
    assert [state.level_at(T0 + dt.timedelta(seconds=s)) for s in (0, 59, 60, 120, 180, 999)] \
        == [3, 3, 2, 1, 0, 0]
    assert [reduced(10, n) for n in range(5)] == [10, 5, 2, 1, 1]
    assert reduced(None, 3) is None


@pytest.mark.parametrize("code,enhanced,text,suppressed", [
    (550, "5.1.1", "550 5.1.1 User unknown", True),
    (550, "5.1.10", "550 5.1.10 Recipient address rejected", True),
    (550, "5.2.1", "550 5.2.1 The email account that you tried to reach is disabled", True),
    (552, "5.2.1", "552 5.2.1 Mailbox full", False),
    (550, "5.7.1", "550 5.7.1 Spam", False),
    (None, "5.1.10", "Domain does not accept mail (null MX, RFC 7505)", False),
    (450, "4.1.1", "450 4.1.1 Try later", False),
])
def test_which_failures_suppress(code, enhanced, text, suppressed):
    assert suppresses(code, enhanced, text) is suppressed


def test_rate_windows():
    assert windows_of(60, None) == [("slice", 10), ("minute", 60)]
    assert windows_of(7, 100) == [("slice", 2), ("minute", 7), ("hour", 100)]
    assert windows_of(None, None) == []
    now = dt.datetime(2026, 12, 3, 12, 34, 56, 789, tzinfo=dt.UTC)
    assert [window_start(w, now).strftime("%H:%M:%S") for w in ("slice", "minute", "hour")] \
        == ["12:34:50", "12:34:00", "12:00:00"]


def test_reservations_are_chunked_only_for_generous_limits():
    assert chunk_for(windows_of(60, None)) == 1  # never hoarded: 10 per ten seconds
    assert chunk_for(windows_of(6000, None)) == 50  # a twentieth of the 1,000 a slice
    assert chunk_for(windows_of(1_000_000, None)) == 500  # at most CHUNK_MAX
    assert chunk_for(windows_of(1_000_000, 400)) == 20
    assert chunk_for([]) == 1

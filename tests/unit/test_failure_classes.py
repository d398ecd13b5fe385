"""Failure classes (stats/classify.py) and the latency histogram (stats/latency.py): pure rules."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.demo.vocabulary import PERM_ERRORS, TEMP_ERRORS
from app.stats.classify import FAILURE_CLASSES, failure_class
from app.stats.latency import BOUNDS, NO_BUCKET, OVERFLOW, bucket_of, percentile, upper_bound


@pytest.mark.parametrize("code, enhanced, text, expected", [
    # The enhanced code decides when it is specific, whatever the text says.
    (550, "5.1.1", "550 5.1.1 <bob@example.org>: Recipient address rejected", "mailbox_unknown"),
    (550, "5.1.1", "550 5.1.1 spam filter says no such user", "mailbox_unknown"),
    (452, "4.2.2", "452 4.2.2 Mailbox full", "mailbox_full"),
    (552, "5.2.2", "552 5.2.2 over quota", "mailbox_full"),
    (552, "5.3.4", "552 5.3.4 Message size exceeds fixed limit", "content"),
    (550, "5.6.0", "550 5.6.0 bad content", "content"),
    (421, "4.4.2", "421 4.4.2 Connection timed out", "connection"),
    (None, "4.4.3", "MX lookup for example.org failed: timeout", "dns"),
    (None, "5.1.2", "Domain nowhere.example does not exist (DNS NXDOMAIN)", "dns"),
    (None, "5.1.10", "Domain example.org does not accept mail (null MX, RFC 7505)", "dns"),
    (None, "4.7.5", "TLS failure with mx.example.org: certificate verification failed", "tls"),
    (535, "5.7.8", "535 5.7.8 Error: authentication failed", "auth"),
    (451, "4.4.5", "451 4.4.5 Server busy", "rate_limited"),
    (550, "5.7.26", "550 5.7.26 Unauthenticated email is not accepted (DMARC)", "policy"),
    # Generic enhanced codes: the text decides.
    (554, "5.7.1", "554 5.7.1 Message rejected as spam", "spam"),
    (550, "5.7.1", "550 5.7.1 Service unavailable; client host blocked using Spamhaus", "spam"),
    (451, "4.7.1", "451 4.7.1 Greylisted, please try again later", "policy"),
    (550, "5.7.1", "550 5.7.1 Relaying denied", "policy"),
    (421, "4.7.0", "421 4.7.0 Too many connections from your IP, slow down", "rate_limited"),
    (450, "4.7.0", "450 4.7.0 rate limit exceeded for this sender", "rate_limited"),
    (550, "5.0.0", "550 5.0.0 User unknown", "mailbox_unknown"),
    (554, "5.7.1", "554 5.7.1 refused", "policy"),  # the text says nothing: x.7 is policy
    (None, None, "Connection to mx.example.org[192.0.2.1]:25 lost: EOF", "connection"),
    # Expired: 4.4.7, classified by the last error it carries; "other" when that says nothing.
    (None, "4.4.7", "Queue lifetime expired (last error: 452 4.2.2 Mailbox full)",
     "mailbox_full"),
    (None, "4.4.7", "Queue lifetime expired (last error: 451 try later)", "other"),
    # No enhanced code: the text, then the basic code.
    (None, None, "Connection refused by mx.example.org", "connection"),
    (None, None, "Could not connect to any server for example.org: timed out", "connection"),
    (550, None, "550 Requested action not taken: mailbox unavailable", "mailbox_unknown"),
    (530, None, "530 Must issue a STARTTLS command first", "tls"),
    (535, None, "535 Incorrect", "auth"),
    (552, None, "552 Requested mail action aborted", "mailbox_full"),
    (421, None, "421 Service not available", "connection"),
    (451, None, "451 Requested action aborted: local error in processing", "other"),
    (None, None, "internal error: RuntimeError (see the worker log)", "other"),
    (None, None, None, "other"),
    (554, "not-a-code", "554 Transaction failed", "policy"),
])
def test_failure_class(code, enhanced, text, expected) -> None:
    assert failure_class(code, enhanced, text) == expected


@given(st.one_of(st.none(), st.integers(-1000, 1000)),
       st.one_of(st.none(), st.text(max_size=20),
                 st.from_regex(r"\A[245]\.\d{1,3}\.\d{1,3}\Z")),
       st.one_of(st.none(), st.text(max_size=200)))
def test_every_reply_gets_one_of_the_classes(code, enhanced, text) -> None:
    assert failure_class(code, enhanced, text) in FAILURE_CLASSES


def test_the_demo_replies_cover_several_classes() -> None:
    classes = {failure_class(*error) for error in TEMP_ERRORS + PERM_ERRORS}
    assert classes == {"policy", "connection", "mailbox_full", "mailbox_unknown", "spam"}


# --------------------------------------------------------------------------- latency


def test_buckets_are_log_spaced_and_closed_above() -> None:
    assert all(b == 2 * a for a, b in zip(BOUNDS, BOUNDS[1:], strict=False))
    assert BOUNDS[-1] >= 432000  # the default queue lifetime fits
    assert bucket_of(None) == NO_BUCKET
    assert bucket_of(0) == bucket_of(1) == 0
    assert bucket_of(1.001) == bucket_of(2) == 1
    assert bucket_of(2.5) == 2
    assert bucket_of(BOUNDS[-1]) == OVERFLOW - 1
    assert bucket_of(BOUNDS[-1] + 1) == OVERFLOW


def nearest_rank(values: list[float], q: int) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered) / 100)) - 1]


@given(st.lists(st.floats(0, 2 * BOUNDS[-1], allow_nan=False), min_size=1, max_size=300),
       st.sampled_from([1, 50, 90, 95, 99, 100]))
def test_percentile_is_the_upper_bound_of_the_nearest_rank_bucket(values, q) -> None:
    counts: dict[int, int] = {}
    for value in values:
        counts[bucket_of(value)] = counts.get(bucket_of(value), 0) + 1
    exact = nearest_rank(values, q)
    reported = percentile(counts, q)
    assert reported == upper_bound(bucket_of(exact))
    if exact <= BOUNDS[-1]:
        assert exact <= reported <= max(1.0, 2 * exact)


def test_percentile_of_nothing_is_none() -> None:
    assert percentile({}, 50) is None
    assert percentile({NO_BUCKET: 4}, 95) is None


def test_percentile_rank_is_exact_in_integers() -> None:
    # 95 % of 20 is the 19th value: floating point would make it 19.000000000000004 -> 20th.
    counts = {0: 19, 5: 1}
    assert percentile(counts, 95) == 1.0
    assert percentile(counts, 100) == 32.0

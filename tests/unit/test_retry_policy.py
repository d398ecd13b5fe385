"""The delivery policy (``delivery.outcomes``): retry delays, what a result makes of a recipient."""

from __future__ import annotations

import datetime as dt
import random

import pytest

from app.delivery.outcomes import EXPIRED, OutcomePolicy, judge, retry_delay
from app.delivery.smtp_client import RecipientResult
from app.queue.states import RecipientStatus

UTC = dt.UTC
POLICY = OutcomePolicy(retry_schedule=(60, 300, 900), max_queue_lifetime=3600,
                       send_bounces=True, reporting_mta="mx.example.com")
EXACT = OutcomePolicy(retry_schedule=(60, 300, 900), max_queue_lifetime=3600,
                      send_bounces=True, reporting_mta="mx.example.com", jitter=0.0)
ACCEPTED = dt.datetime(2026, 1, 28, 12, 0, tzinfo=UTC)


def result(kind: str, text: str = "451 4.3.0 try later") -> RecipientResult:
    return RecipientResult(recipient_id=1, address="bob@example.net", kind=kind, text=text)


@pytest.mark.parametrize(("attempts", "step"), [(0, 60), (1, 60), (2, 300), (3, 900), (4, 900),
                                                (50, 900)])
def test_retry_delay_follows_the_schedule_and_repeats_its_last_step(attempts, step):
    assert retry_delay(EXACT, attempts) == step


def test_retry_delay_jitter_stays_within_ten_percent_and_varies():
    rng = random.Random(7)
    delays = [retry_delay(POLICY, 2, rng) for _ in range(500)]
    assert all(270 <= d <= 330 for d in delays)
    assert max(delays) - min(delays) > 30  # mail deferred together does not return together


def test_a_2xx_result_is_delivered():
    verdict = judge(POLICY, result("delivered", "250 ok"), 1, ACCEPTED, ACCEPTED)
    assert (verdict.status, verdict.last_error, verdict.next_attempt_at) == (
        RecipientStatus.DELIVERED, None, None)


def test_a_tempfail_is_deferred_by_the_schedule():
    now = ACCEPTED + dt.timedelta(minutes=1)
    verdict = judge(EXACT, result("tempfail"), 2, ACCEPTED, now)
    assert verdict.status == RecipientStatus.DEFERRED
    assert verdict.last_error == "451 4.3.0 try later"
    assert verdict.next_attempt_at == now + dt.timedelta(seconds=300)
    assert not verdict.expired


def test_the_next_attempt_is_never_planned_past_the_queue_lifetime():
    now = ACCEPTED + dt.timedelta(seconds=3500)
    verdict = judge(EXACT, result("tempfail"), 3, ACCEPTED, now)
    assert verdict.status == RecipientStatus.DEFERRED
    assert verdict.next_attempt_at == ACCEPTED + dt.timedelta(seconds=3600)


def test_a_tempfail_at_the_end_of_the_lifetime_fails_as_expired():
    now = ACCEPTED + dt.timedelta(seconds=3600)
    verdict = judge(POLICY, result("tempfail"), 9, ACCEPTED, now)
    assert verdict.status == RecipientStatus.FAILED
    assert verdict.expired
    assert verdict.last_error == f"{EXPIRED} (last error: 451 4.3.0 try later)"
    assert verdict.next_attempt_at is None


def test_a_rejection_fails_at_once_whatever_the_lifetime_left():
    verdict = judge(POLICY, result("rejection", "550 5.1.1 no such user"), 1, ACCEPTED, ACCEPTED)
    assert (verdict.status, verdict.last_error, verdict.expired) == (
        RecipientStatus.FAILED, "550 5.1.1 no such user", False)

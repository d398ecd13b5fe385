"""The listener's RCPT check (``intake.refusal``, prebuilt Core reads) refuses exactly what the
general check (``intake.refusals``, through the ORM) refuses, with the same reply, and counts
a bounce rule's hit the same way."""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa

from app.control import intake
from app.control.rules import create_rule
from app.control.suppression import add_suppression
from app.extensions import db
from app.models import Rule, Suppression
from app.timeutil import utcnow

CHECKS = [
    ("alice@example.com", "gone@example.net"),
    ("alice@example.com", "  GONE@Example.NET "),
    ("alice@example.com", "was-gone@example.net"),  # its suppression expired
    ("alice@example.com", "fine@example.net"),
    ("spammer@example.com", "anyone@example.org"),  # a bounce rule on the sender
    ("alice@example.com", "x@bounced.example"),  # a bounce rule on the domain
    ("alice@example.com", "x@expired.example"),  # that rule expired
    ("alice@example.com", "x@held.example"),  # a hold rule: not a refusal
    ("", "gone@example.net"),
]


def _seed(app, session) -> None:
    """The suppressions and rules CHECKS are checked against."""
    later = utcnow() + dt.timedelta(hours=1)
    with app.app_context():
        add_suppression(db.session, "gone@example.net", "user unknown", None, "test")
        add_suppression(db.session, "was-gone@example.net", "full", later, "test")
        create_rule(db.session, action="bounce", expires_at=later, sender="spammer@",
                    actor="test")
        create_rule(db.session, action="bounce", expires_at=later, domain="bounced.example",
                    actor="test")
        expiring = create_rule(db.session, action="bounce", expires_at=later,
                               domain="expired.example", actor="test").id
        create_rule(db.session, action="hold", expires_at=later, domain="held.example",
                    actor="test")
        db.session.remove()
    session.execute(sa.update(Suppression).where(Suppression.address == "was-gone@example.net")
                    .values(expires_at=utcnow() - dt.timedelta(seconds=1)))
    session.execute(sa.update(Rule).where(Rule.id == expiring)
                    .values(expires_at=utcnow() - dt.timedelta(seconds=1)))
    session.commit()


def _hits(session) -> dict[int, int]:
    session.expire_all()
    return {rule_id: n for rule_id, n in session.execute(sa.select(Rule.id, Rule.hits))}


def test_one_recipient_is_refused_as_the_general_check_refuses_it(app, session):
    _seed(app, session)
    answers = []
    for sender, address in CHECKS:
        with app.app_context():
            before = _hits(session)
            general = intake.refusals(db.session, sender, [address]).get(address)
            db.session.commit()
            after_general = _hits(session)
            one = intake.refusal(db.session.connection(), sender, address)
            db.session.commit()
            db.session.remove()
        assert one == general, (sender, address)
        assert {k: v - after_general[k] for k, v in _hits(session).items()} == \
            {k: v - before[k] for k, v in after_general.items()}
        answers.append(one is not None)
    assert answers == [True, True, False, False, True, True, False, False, True]


def test_a_batch_of_checks_is_answered_as_each_check_alone(app, session):
    """``refusals_of`` (several sessions' RCPTs in one statement): each check's reply is
    ``refusal``'s, and each refused recipient counts its rule's hit once."""
    _seed(app, session)
    checks = [*CHECKS, ("alice@example.com", "y@bounced.example")]  # a rule caught twice
    alone = []
    before = _hits(session)
    with app.app_context():
        for sender, address in checks:
            alone.append(intake.refusal(db.session.connection(), sender, address))
            db.session.commit()
        db.session.remove()
    after_alone = _hits(session)
    with app.app_context():
        batch = intake.refusals_of(db.session.connection(), checks)
        db.session.commit()
        db.session.remove()
    assert batch == alone
    assert {k: v - after_alone[k] for k, v in _hits(session).items()} == \
        {k: v - before[k] for k, v in after_alone.items()}
    assert sum(after_alone.values()) - sum(before.values()) == 3  # the rule refusals
    with app.app_context():
        assert intake.refusals_of(db.session.connection(), []) == []
        db.session.remove()

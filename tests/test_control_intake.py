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


def test_one_recipient_is_refused_as_the_general_check_refuses_it(app, session):
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

    def hits() -> dict[int, int]:
        session.expire_all()
        return {rule_id: n for rule_id, n in session.execute(sa.select(Rule.id, Rule.hits))}

    answers = []
    for sender, address in CHECKS:
        with app.app_context():
            before = hits()
            general = intake.refusals(db.session, sender, [address]).get(address)
            db.session.commit()
            after_general = hits()
            one = intake.refusal(db.session.connection(), sender, address)
            db.session.commit()
            db.session.remove()
        assert one == general, (sender, address)
        assert {k: v - after_general[k] for k, v in hits().items()} == \
            {k: v - before[k] for k, v in after_general.items()}
        answers.append(one is not None)
    assert answers == [True, True, False, False, True, True, False, False, True]

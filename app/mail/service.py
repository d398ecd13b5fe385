"""Building the test email and queueing it like any other message."""

from __future__ import annotations

import email.policy
import email.utils
from collections.abc import Sequence
from email.headerregistry import Address
from email.message import EmailMessage

import sqlalchemy.orm as so

from ..control import intake
from ..dkim.signing import sign_outgoing
from ..errors import ValidationFailed
from ..events import record_event
from ..models import Message
from ..queue.service import accept_message
from ..timeutil import rfc5322_date
from .addresses import Mailbox

# CRLF line ends as they go on the wire; headers folded at 78, non-ASCII encoded (RFC 2047).
WIRE_POLICY = email.policy.SMTP


def _header_address(mailbox: Mailbox) -> Address:
    local, _, domain = mailbox.address.rpartition("@")
    return Address(display_name=mailbox.display_name, username=local, domain=domain)


def build_test_message(sender: Mailbox, recipients: Sequence[Mailbox], subject: str, body: str,
                       hostname: str) -> bytes:
    """An RFC 5322 message with every header a receiving server expects."""
    msg = EmailMessage(policy=WIRE_POLICY)
    msg["From"] = _header_address(sender)
    msg["To"] = [_header_address(r) for r in recipients]
    msg["Subject"] = subject
    msg["Date"] = rfc5322_date()
    msg["Message-ID"] = email.utils.make_msgid(domain=hostname)
    msg["X-Mailer"] = "Elemta send-test"
    # set_content adds MIME-Version and Content-Type with the charset. Non-ASCII text goes
    # quoted-printable: the message stays 7-bit clean for servers without 8BITMIME.
    cte = None if body.isascii() else "quoted-printable"
    msg.set_content(body, charset="utf-8", cte=cte)
    return msg.as_bytes()


def send_test(session: so.Session, sender: Mailbox, recipients: Sequence[Mailbox], subject: str,
              body: str, hostname: str) -> Message:
    """Queue a test email as ``pending`` with its ``reception`` event; commits.

    A suppressed recipient or a bounce rule refuses the whole request (400, nothing queued),
    with a ``rejection`` event per refused recipient, as the SMTP listener records them.
    """
    refused = intake.refusals(session, sender.address, [r.address for r in recipients])
    if refused:
        for address, reply in refused.items():
            record_event(session, "rejection", sender=sender.address, recipient=address,
                         message=f"send-test refused: {reply}", smtp_code=int(reply[:3]),
                         enhanced_code=reply.split()[1], counts_as_outcome=False)
        session.commit()
        raise ValidationFailed("Recipient refused; nothing was queued",
                               {"to": sorted(refused.values())})
    raw = sign_outgoing(session, build_test_message(sender, recipients, subject, body, hostname))
    return accept_message(
        session,
        sender=sender.address,
        recipients=[r.address for r in recipients],
        raw=raw,
        origin="api",
        reception_note=f"Test email accepted from the API ({len(raw)} bytes)",
    )

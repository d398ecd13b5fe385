"""Request and response shapes of ``POST /api/send-test`` (SPEC 6)."""

from __future__ import annotations

from typing import Any

import marshmallow as ma

from .addresses import AddressError, Mailbox, parse_mailbox

MAX_RECIPIENTS = 50
MAX_MAILBOX = 512  # display name and address together
MAX_SUBJECT = 998  # RFC 5322 line limit
MAX_BODY = 512 * 1024
DEFAULT_SUBJECT = "Test Email"
DEFAULT_BODY = "This is a test email from Elemta."


class MailboxField(ma.fields.String):
    """A mailbox (``a@b.c`` or ``Name <a@b.c>``) loaded as a ``Mailbox``; no CR/LF, no DNS."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Mailbox:
        text = super()._deserialize(value, attr, data, **kwargs)
        if len(text) > MAX_MAILBOX:
            raise ma.ValidationError(f"Longer than {MAX_MAILBOX} characters.")
        try:
            return parse_mailbox(text)
        except AddressError as exc:
            raise ma.ValidationError(f"Not a valid mailbox: {exc}") from None


class RecipientsField(ma.fields.Field):
    """One mailbox or a list of 1..50 mailboxes, always loaded as a list."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> list[Mailbox]:
        items = value if isinstance(value, list) else [value]
        if not items:
            raise ma.ValidationError("At least one recipient is required.")
        if len(items) > MAX_RECIPIENTS:
            raise ma.ValidationError(f"At most {MAX_RECIPIENTS} recipients.")
        inner = MailboxField()
        errors: dict[int, list[str]] = {}
        mailboxes = []
        for index, item in enumerate(items):
            try:
                mailboxes.append(inner.deserialize(item))
            except ma.ValidationError as exc:
                errors[index] = exc.messages  # type: ignore[assignment]
        if errors:
            if isinstance(value, list):
                raise ma.ValidationError(errors)  # type: ignore[arg-type]
            raise ma.ValidationError(errors[0])
        return mailboxes


def _no_line_breaks(value: str) -> None:
    if "\r" in value or "\n" in value:
        raise ma.ValidationError("Must not contain CR or LF.")


class SendTestSchema(ma.Schema):
    """Body of ``POST /api/send-test``; unknown fields are refused."""

    sender = MailboxField(required=True, data_key="from",
                          metadata={"description": "Sender mailbox (envelope and From header)",
                                    "example": "test@example.com"})
    to = RecipientsField(required=True, metadata={
        "description": f"One recipient mailbox or a list of up to {MAX_RECIPIENTS}",
        "oneOf": [{"type": "string"},
                  {"type": "array", "items": {"type": "string"}, "maxItems": MAX_RECIPIENTS,
                   "minItems": 1}],
        "example": "recipient@example.com"})
    subject = ma.fields.String(load_default=DEFAULT_SUBJECT,
                               validate=[ma.validate.Length(max=MAX_SUBJECT), _no_line_breaks],
                               metadata={"example": DEFAULT_SUBJECT})
    body = ma.fields.String(load_default=DEFAULT_BODY, validate=ma.validate.Length(max=MAX_BODY),
                            metadata={"example": DEFAULT_BODY})


class SendTestResultSchema(ma.Schema):
    status = ma.fields.String(required=True, metadata={"example": "success"})
    message_id = ma.fields.String(required=True, metadata={"example": "msg-Xk3…"})
    message = ma.fields.String(required=True,
                               metadata={"example": "Test email queued successfully"})

"""Request and response shapes of ``POST /api/send-test`` (API.md §6)."""

from __future__ import annotations

from typing import Any

import marshmallow as ma

from .addresses import AddressError, Mailbox, check_header_text, parse_mailbox

MAX_RECIPIENTS = 50
MAX_MAILBOX = 512  # display name and address together
MAX_SUBJECT = 998  # RFC 5322 line limit
MAX_BODY = 512 * 1024
DEFAULT_SUBJECT = "Test Email"
DEFAULT_BODY = "This is a test email from Elemta."


# What the document promises about a mailbox, so that generated clients and fuzzers form ones
# the server can accept: 3..512 characters, an "@", no control character or line separator.
# The full syntax (RFC 5321 address, optional display name) is checked by parse_mailbox.
_NO_BREAK = "[^\\x00-\\x1f\\x7f\\x85\\u2028\\u2029]"
MAILBOX_DOC = {"type": "string", "minLength": 3, "maxLength": MAX_MAILBOX,
               "pattern": f"^{_NO_BREAK}*@{_NO_BREAK}*$"}
# The subject: one header line (see single_header_line).
SUBJECT_PATTERN = "^[^\\n\\r\\x0b\\x0c\\x1c-\\x1e\\x85\\u2028\\u2029]*$"


class MailboxField(ma.fields.String):
    """A mailbox (``a@b.c`` or ``Name <a@b.c>``) loaded as a ``Mailbox``; no CR/LF, no DNS."""

    # marshmallow types String as Field[str], output included; this one checks a string (and
    # stays a string in the OpenAPI document) but loads a Mailbox.
    def _deserialize(  # type: ignore[override]
        self, value: Any, attr: str | None, data: Any, **kwargs: Any
    ) -> Mailbox:
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
        errors: dict[int, str | list[Any] | dict[Any, Any]] = {}  # ValidationError.messages
        mailboxes = []
        for index, item in enumerate(items):
            try:
                mailboxes.append(inner.deserialize(item))
            except ma.ValidationError as exc:
                errors[index] = exc.messages
        if errors:
            if isinstance(value, list):
                raise ma.ValidationError(errors)
            raise ma.ValidationError(errors[0])
        return mailboxes


def single_header_line(value: str) -> None:
    """marshmallow validator of a field that becomes a header value (the subject)."""
    try:
        check_header_text(value)
    except AddressError as exc:
        raise ma.ValidationError(str(exc)) from None


class SendTestSchema(ma.Schema):
    """Body of ``POST /api/send-test``; unknown fields are refused."""

    sender = MailboxField(required=True, data_key="from",
                          metadata={**MAILBOX_DOC,
                                    "description": "Sender mailbox (envelope and From header)",
                                    "example": "test@example.com"})
    to = RecipientsField(required=True, metadata={
        "description": f"One recipient mailbox or a list of up to {MAX_RECIPIENTS}",
        "oneOf": [MAILBOX_DOC,
                  {"type": "array", "items": MAILBOX_DOC, "maxItems": MAX_RECIPIENTS,
                   "minItems": 1}],
        "example": "recipient@example.com"})
    subject = ma.fields.String(load_default=DEFAULT_SUBJECT,
                               validate=[ma.validate.Length(max=MAX_SUBJECT), single_header_line],
                               metadata={"example": DEFAULT_SUBJECT,
                                         "pattern": SUBJECT_PATTERN})
    body = ma.fields.String(load_default=DEFAULT_BODY, validate=ma.validate.Length(max=MAX_BODY),
                            metadata={"example": DEFAULT_BODY})


class SendTestResultSchema(ma.Schema):
    status = ma.fields.String(required=True, metadata={"example": "success"})
    message_id = ma.fields.String(required=True, metadata={"example": "msg-Xk3…"})
    message = ma.fields.String(required=True,
                               metadata={"example": "Test email queued successfully"})

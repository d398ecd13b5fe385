"""Delivery status notifications (RFC 3464) for recipients that failed permanently.

The DSN goes to the envelope sender from the null sender ``<>`` (so it can never bounce in
turn), as ``multipart/report; report-type=delivery-status`` with a human-readable part, the
machine-readable ``message/delivery-status`` part and the original's headers
(``text/rfc822-headers``).
"""

from __future__ import annotations

import datetime as dt
import email.utils
from collections.abc import Sequence
from dataclasses import dataclass
from email.charset import QP, Charset
from email.message import Message as MimePart
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import SMTP as WIRE_POLICY

from ..timeutil import rfc5322_date

_HEADER_END = (b"\r\n\r\n", b"\n\n")
_UTF8_QP = Charset("utf-8")
_UTF8_QP.body_encoding = QP  # readable in any mail client's "show source"


def _text(text: str, subtype: str) -> MIMEText:
    if text.isascii():
        return MIMEText(text, subtype, "us-ascii")
    # email.mime accepts a Charset object (its quoted-printable body encoding); typeshed says str.
    return MIMEText(text, subtype, _UTF8_QP)  # type: ignore[arg-type]


@dataclass(frozen=True)
class FailedRecipient:
    address: str
    status: str  # RFC 3463 code, e.g. 5.1.1
    diagnostic: str  # the remote reply or our reason
    remote_host: str | None
    smtp_code: int | None
    attempted_at: dt.datetime


def original_headers(raw: bytes) -> bytes:
    """The header block of a raw message (everything before the first empty line)."""
    ends = [raw.find(sep) for sep in _HEADER_END if raw.find(sep) >= 0]
    return raw[: min(ends)] if ends else raw


def dsn_status(enhanced_code: str | None, smtp_code: int | None, expired: bool) -> str:
    if expired:
        return "4.4.7"  # delivery time expired (RFC 3463); Action is still "failed"
    if enhanced_code and enhanced_code[0] == "5":
        return enhanced_code
    return "5.0.0"


def build_dsn(*, original_raw: bytes, original_sender: str, message_id: str,
              arrival: dt.datetime, failed: Sequence[FailedRecipient],
              reporting_mta: str) -> bytes:
    """The DSN message, CRLF line ends, ready to queue."""
    report = MIMEMultipart("report", report_type="delivery-status")
    report["From"] = f"Mail Delivery System <MAILER-DAEMON@{reporting_mta}>"
    report["To"] = original_sender
    report["Subject"] = "Undelivered Mail Returned to Sender"
    report["Date"] = rfc5322_date()
    report["Message-ID"] = email.utils.make_msgid(domain=reporting_mta)
    report["Auto-Submitted"] = "auto-replied"  # RFC 3834: automatic, do not answer

    lines = [
        f"This is the mail system at host {reporting_mta}.",
        "",
        "Your message could not be delivered to one or more recipients.",
        "It is attached below (headers only).",
        "",
    ]
    for r in failed:
        lines.append(f"<{r.address}>: {r.diagnostic}")
    report.attach(_text("\n".join(lines) + "\n", "plain"))

    status = MimePart()
    status["Content-Type"] = "message/delivery-status"
    per_message = MimePart()
    per_message["Reporting-MTA"] = f"dns; {reporting_mta}"
    per_message["X-Elemta-Queue-ID"] = message_id
    per_message["Arrival-Date"] = email.utils.format_datetime(arrival)
    blocks = [per_message]
    for r in failed:
        block = MimePart()
        block["Final-Recipient"] = f"rfc822; {r.address.encode('ascii', 'replace').decode()}"
        block["Action"] = "failed"
        block["Status"] = r.status
        if r.remote_host:
            block["Remote-MTA"] = f"dns; {r.remote_host}"
        diagnostic_type = "smtp" if r.smtp_code else "x-elemta"
        diagnostic = " ".join(r.diagnostic.split()).encode("ascii", "replace").decode()
        block["Diagnostic-Code"] = f"{diagnostic_type}; {diagnostic}"
        block["Last-Attempt-Date"] = email.utils.format_datetime(r.attempted_at)
        blocks.append(block)
    # message/delivery-status carries a list of header blocks; typeshed omits list payloads.
    status.set_payload(blocks)  # type: ignore[arg-type]
    report.attach(status)

    headers = original_headers(original_raw).decode("utf-8", "replace")
    report.attach(_text(headers.replace("\r\n", "\n") + "\n", "rfc822-headers"))
    return report.as_bytes(policy=WIRE_POLICY)

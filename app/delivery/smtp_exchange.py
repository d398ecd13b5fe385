"""The commands of one SMTP mail transaction and their replies, in lockstep or pipelined.

Without PIPELINING every command waits for its reply: MAIL, each RCPT, DATA and the content
are four round trips or more. With PIPELINING (RFC 2920), which the server advertises in its
EHLO answer, MAIL FROM, every RCPT TO and DATA go in one write and their replies are read in
order afterwards; the content follows once DATA got its 354: two round trips whatever the
number of recipients. smtplib has no pipelining: it is built on its public ``send`` and
``getreply``.

Either way the exchange only collects replies; what they mean for each recipient is the
client's (``smtp_client.SmtpClient._transaction``), the same for both.
"""

from __future__ import annotations

import re
import smtplib
from dataclasses import dataclass

Reply = tuple[int, bytes | str]  # smtplib's replies are bytes; SMTPDataError's may be a str

_LEADING_DOT = re.compile(rb"(?m)^\.")  # RFC 5321 4.5.2 dot-stuffing, as smtplib.data does
# An ASCII dot-atom address (RFC 5322 3.2.3): the envelope addresses of nearly every message.
# smtplib.quoteaddr gives exactly "<address>" for it, after parsing it with email.utils.parseaddr,
# which was a third of the client's CPU a message (docs/PERFORMANCE.md, "Delivery, SMTP
# PIPELINING"); anything else still goes through quoteaddr.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM_ADDRESS = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*",
                               re.ASCII)


class StaleConnection(Exception):
    """The connection was gone before the transaction began (nothing was sent)."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


@dataclass
class Replies:
    """The server's answers to one transaction.

    ``rcpt`` has one reply per address given, in order; ``data`` is the reply to the end of
    the content, or the refusal of DATA itself (``content_sent`` false), or ``None`` when
    DATA was not sent (lockstep, after a refused MAIL or with no recipient accepted). After a
    421 (the server closes the channel) nothing more is read: that reply stands for every
    answer still missing.
    """

    mail: Reply
    rcpt: list[Reply]
    data: Reply | None
    content_sent: bool


def exchange(smtp: smtplib.SMTP, sender: str, options: list[str], addresses: list[str],
             content: bytes) -> Replies:
    """Run the transaction, pipelined when the server offers PIPELINING.

    Raises ``StaleConnection`` when the connection turns out to be gone before MAIL got an
    answer (nothing of the transaction reached the server: it can run again on a fresh one).
    """
    if smtp.has_extn("pipelining"):
        return _pipelined(smtp, sender, options, addresses, content)
    return _lockstep(smtp, sender, options, addresses, content)


def _lockstep(smtp: smtplib.SMTP, sender: str, options: list[str], addresses: list[str],
              content: bytes) -> Replies:
    try:
        mail = smtp.mail(sender, options)
    except smtplib.SMTPServerDisconnected as exc:
        raise StaleConnection(exc) from exc
    if mail[0] >= 400:
        return Replies(mail, [], None, False)
    rcpt: list[Reply] = [smtp.rcpt(address) for address in addresses]
    if not any(_accepted(reply) for reply in rcpt):
        return Replies(mail, rcpt, None, False)
    try:
        return Replies(mail, rcpt, smtp.data(content), True)
    except smtplib.SMTPDataError as exc:  # DATA itself refused (no 354)
        return Replies(mail, rcpt, (exc.smtp_code, exc.smtp_error), False)


def _pipelined(smtp: smtplib.SMTP, sender: str, options: list[str], addresses: list[str],
               content: bytes) -> Replies:
    if any(option.lower() == "smtputf8" for option in options):
        smtp.command_encoding = "utf-8"  # what smtplib.SMTP.mail does for SMTPUTF8
    extra = "".join(f" {option}" for option in options)
    commands = [f"MAIL FROM:{_path(sender)}{extra}"]
    commands += [f"RCPT TO:{_path(address)}" for address in addresses]
    commands.append("DATA")
    batch = "".join(f"{command}\r\n" for command in commands)
    if batch.count("\n") != len(commands) or batch.count("\r") != len(commands):
        # As smtplib.SMTP.putcmd: an address must not smuggle in a command of its own.
        raise ValueError("command and arguments contain prohibited newline characters")
    try:
        smtp.send(batch)
        mail: Reply = smtp.getreply()
    except smtplib.SMTPServerDisconnected as exc:
        raise StaleConnection(exc) from exc
    # Every reply is read even after a refusal (the server answers each command, a refused
    # MAIL makes the RCPTs and DATA 503s): the connection stays in step for the next one.
    closing: Reply | None = mail if mail[0] == 421 else None
    rcpt: list[Reply] = []
    for _ in addresses:
        rcpt.append(closing or smtp.getreply())
        if closing is None and rcpt[-1][0] == 421:
            closing = rcpt[-1]
    data: Reply = closing or smtp.getreply()
    if data[0] != 354:
        return Replies(mail, rcpt, data, False)
    if mail[0] >= 400 or not any(_accepted(reply) for reply in rcpt):
        # DATA accepted with nobody to deliver to (a server not keeping RFC 2920 3.1):
        # RFC 2920 says to send a lone dot; the message is not sent.
        smtp.send(b".\r\n")
        smtp.getreply()
        return Replies(mail, rcpt, None, False)
    return Replies(mail, rcpt, _send_content(smtp, content), True)


def _path(address: str) -> str:
    """The address in angle brackets as smtplib.quoteaddr makes it (``<>`` for the null
    sender), without parsing the common case."""
    if not address:
        return "<>"
    if _DOT_ATOM_ADDRESS.fullmatch(address):
        return f"<{address}>"
    return smtplib.quoteaddr(address)


def _send_content(smtp: smtplib.SMTP, content: bytes) -> Reply:
    """After a 354: the content, dot-stuffed and ended with a lone dot, as smtplib.data."""
    stuffed = _LEADING_DOT.sub(b"..", content)
    if not stuffed.endswith(b"\r\n"):
        stuffed += b"\r\n"
    smtp.send(stuffed + b".\r\n")
    return smtp.getreply()


def _accepted(reply: Reply) -> bool:
    return 200 <= reply[0] < 300

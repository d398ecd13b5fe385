"""aiosmtpd's SMTP protocol with Elemta's session rules.

- Every refusal of MAIL, RCPT or DATA is recorded as a ``rejection`` event *before* the reply
  is sent (so whoever saw the reply also finds the event).
- A session that collects ``HARD_ERROR_LIMIT`` error replies is disconnected (as Postfix does).
- A connection is admitted or answered 421 and closed before the greeting (``admission.py``:
  the session cap, room kept for the relay networks, per-client count and rate); behind a
  PROXY header, once the header named the client (``handler.handle_PROXY``).
- The idle timeout also restarts on incoming DATA bytes: a large message on a slow link is not
  cut off because its upload takes longer than one idle period. Outside a mail transaction,
  while the listener is near its session cap, it is ``ELEMTA_SMTPD_STRESS_IDLE_TIMEOUT``.
"""

from __future__ import annotations

import collections
import logging
from typing import TYPE_CHECKING, Any, AnyStr

from aiosmtpd.smtp import SMTP, Envelope

from .admission import Refusal, Ticket
from .policy import IPAddress, client_ip
from .storage import record_refusal

if TYPE_CHECKING:
    from .server import Listener

log = logging.getLogger("elemta.smtpd")

# Error replies (4xx/5xx) tolerated per session before it is dropped (Postfix's default).
HARD_ERROR_LIMIT = 20
# Per-session caps of commands that never carry mail (aiosmtpd answers 421 beyond them).
COMMAND_CALL_LIMITS = {
    "*": 10**9,  # MAIL, RCPT, DATA, RSET, QUIT: one session may carry any number of messages
    "EHLO": 10, "HELO": 10, "STARTTLS": 2, "AUTH": 5, "NOOP": 100,
    "VRFY": 10, "EXPN": 10, "HELP": 10,
}
# MAIL carries SIZE= and SMTPUTF8 parameters beyond the 512 octets of RFC 5321 4.5.3.1.4.
MAIL_COMMAND_SIZE = SMTP.command_size_limit + 26 + 10


def same_help(base: Any) -> Any:
    """Keep aiosmtpd's HELP text (set by its ``@syntax``) on a command we override."""
    def decorate(method: Any) -> Any:
        for name in ("__smtp_syntax__", "__smtp_syntax_extended__", "__smtp_syntax_when__"):
            if hasattr(base, name):
                setattr(method, name, getattr(base, name))
        return method

    return decorate


class TransactionEnvelope(Envelope):
    def __init__(self) -> None:
        super().__init__()
        self.overflow_recorded = False  # one "too many recipients" event per transaction


class ElemtaSMTP(SMTP):
    def __init__(self, handler: Any, *, listener: Listener, **kwargs: Any) -> None:
        # aiosmtpd keeps these limits in a class-wide dict that every EHLO enlarges; ours are
        # per session and fixed (see reset_command_size_limits).
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        super().__init__(handler, command_call_limit=COMMAND_CALL_LIMITS, **kwargs)
        self.listener = listener
        self._command: str | None = None
        self._command_arg: str | None = None
        self._data_started = False
        self._errors = 0
        self._registered = False
        self._ticket: Ticket | None = None

    def _create_envelope(self) -> Envelope:
        return TransactionEnvelope()

    def reset_command_size_limits(self) -> None:
        self.command_size_limits["MAIL"] = MAIL_COMMAND_SIZE

    # ------------------------------------------------------------------ who is the client

    @property
    def client_ip(self) -> IPAddress | None:
        """The client's address: the PROXY header's source when one was received."""
        if self.session is None:
            return None
        proxy = self.session.proxy_data
        if proxy is not None and getattr(proxy, "src_addr", None) is not None:
            return client_ip(str(proxy.src_addr))
        return client_ip(self.session.peer)

    @property
    def over_tls(self) -> bool:
        return self._tls_protocol is not None

    @property
    def in_data(self) -> bool:
        """Receiving or queueing a message: shutdown waits for these sessions."""
        return self._command == "DATA"

    @property
    def in_transaction(self) -> bool:
        """Between an accepted MAIL FROM and the end of its DATA (or RSET)."""
        envelope = self.envelope
        return self.in_data or (envelope is not None and envelope.mail_from is not None)

    # ------------------------------------------------------------------ connection lifecycle

    def connection_made(self, transport: Any) -> None:
        first = self.transport is None  # STARTTLS calls this again with the TLS transport
        super().connection_made(transport)
        if first and not self._registered:
            self._registered = True
            self.listener.sessions.add(self)

    def connection_lost(self, error: Exception | None) -> None:
        self.listener.sessions.discard(self)
        if self._ticket is not None:
            self.listener.leave(self._ticket)
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        # Behind a proxy the client is known only from the PROXY header: handle_PROXY admits.
        if self.listener.settings.proxy_protocol or await self.admit():
            await super()._handle_client()

    async def admit(self) -> bool:
        """Take a session slot for this client, or refuse it (421) and close."""
        decision = await self.listener.admit(self)
        if isinstance(decision, Refusal):
            if self.transport is not None:
                await super().push(decision.reply)
                self.transport.close()
            return False
        if self.transport is None:  # gone already (the admission never waits, but be sure)
            self.listener.leave(decision)
            return False
        self._ticket = decision
        self._reset_timeout()  # the listener may just have come under stress
        return True

    def data_received(self, data: bytes) -> None:
        if self._command == "DATA" and self.transport is not None:
            self._reset_timeout()
        super().data_received(data)

    # ------------------------------------------------------------------ idle timeouts

    def _reset_timeout(self, duration: float | None = None) -> None:
        """aiosmtpd re-arms the idle timer at connect and at every command; near the session
        cap, a session outside a mail transaction gets the short (stress) timeout."""
        if duration is None and not self.in_transaction and self.listener.admission.stressed:
            duration = self.listener.settings.stress_idle_timeout
        super()._reset_timeout(duration)

    def shorten_idle_timer(self, seconds: float) -> None:
        """At most ``seconds`` more of idleness, unless a mail transaction is under way."""
        handle = self._timeout_handle
        if handle is None or self.transport is None or self.in_transaction:
            return
        if handle.when() - self.loop.time() > seconds:
            super()._reset_timeout(seconds)

    def _rearm_idle_timer(self) -> None:
        """The transaction state changed (MAIL accepted, DATA or RSET done): the idle time
        from now on is the one of the new state."""
        if self.transport is not None and not self.transport.is_closing():
            self._reset_timeout()

    def goodbye(self) -> None:
        """Close the session at shutdown, telling the client why."""
        if self.transport is not None and not self.transport.is_closing():
            self._writer.write(b"421 4.3.2 Service shutting down\r\n")
            self.transport.close()

    # ------------------------------------------------------------------ commands

    async def _in_command(self, name: str, arg: str | None, method: Any) -> None:
        self._command, self._command_arg, self._data_started = name, arg, False
        try:
            await method(arg)
        finally:
            self._command = self._command_arg = None

    @same_help(SMTP.smtp_MAIL)
    async def smtp_MAIL(self, arg: str | None) -> None:
        await self._in_command("MAIL", arg, super().smtp_MAIL)
        self._rearm_idle_timer()

    @same_help(SMTP.smtp_RCPT)
    async def smtp_RCPT(self, arg: str | None) -> None:
        await self._in_command("RCPT", arg, super().smtp_RCPT)

    @same_help(SMTP.smtp_DATA)
    async def smtp_DATA(self, arg: str) -> None:
        await self._in_command("DATA", arg, super().smtp_DATA)
        self._rearm_idle_timer()

    @same_help(SMTP.smtp_RSET)
    async def smtp_RSET(self, arg: str) -> None:
        await super().smtp_RSET(arg)
        self._rearm_idle_timer()

    # ------------------------------------------------------------------ replies

    async def push(self, status: AnyStr) -> None:
        text = status if isinstance(status, str) else status.decode("utf-8", errors="replace")
        if text.startswith("354"):
            self._data_started = True
        if self._is_refusal(text):
            await self._record_refusal(text)
        await super().push(status)
        if text[:1] in ("4", "5") and not text.startswith(("421", "452 4.5.3")):
            self._errors += 1
            if self._errors >= HARD_ERROR_LIMIT and self.transport is not None:
                log.warning("Dropping SMTP client %s after %d errors", self.client_ip,
                            self._errors)
                await super().push("421 4.7.0 Too many errors, closing connection")
                self.transport.close()

    def _is_refusal(self, text: str) -> bool:
        """A refusal worth an event: of an address, a recipient or a message's content."""
        if self._command is None or text.startswith("503"):  # 503: commands out of order
            return False
        if text.startswith("452 4.5.3") and self._command == "RCPT":
            envelope = self.envelope
            if isinstance(envelope, TransactionEnvelope) and not envelope.overflow_recorded:
                envelope.overflow_recorded = True
                return True
            return False
        if not text.startswith("5"):
            return False
        if self._command == "DATA":
            return self._data_started  # after 354: too large, line too long
        return True

    async def _record_refusal(self, reply: str) -> None:
        envelope = self.envelope
        sender = envelope.mail_from if envelope is not None else None
        recipient = None
        if self._command == "MAIL":
            sender = self._address_in(self._command_arg, "FROM:")
        elif self._command == "RCPT":
            recipient = self._address_in(self._command_arg, "TO:")
        elif self._command == "DATA" and envelope is not None:
            recipient = ", ".join(envelope.rcpt_tos)
        try:
            await self.listener.storage.run(
                record_refusal, stage=self._command or "", reply=reply,
                client_ip=str(self.client_ip or "unknown"),
                helo=str(self.session.host_name or "") if self.session else "",
                sender=None if sender is None else ("" if sender == "<>" else sender),
                recipient=recipient)
        except Exception:  # the refusal stands even when it cannot be recorded
            log.exception("Could not record an SMTP refusal (%s)", reply)

    def _address_in(self, arg: str | None, keyword: str) -> str | None:
        """The address of a MAIL/RCPT argument, or the raw argument when it does not parse."""
        if not arg:
            return None
        rest = self._strip_command_keyword(keyword, arg)
        if rest is None:
            return arg
        address, _params = self._getaddr(rest)
        return address if address else rest

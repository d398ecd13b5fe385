"""The aiosmtpd handler: envelope checks, relay policy, AUTH against API keys, acceptance.

Hooks return the SMTP reply; the protocol (``protocol.py``) records refusals as ``rejection``
events and counts errors. Database work goes through ``Storage`` (worker threads).
"""

from __future__ import annotations

import binascii
import logging
from base64 import b64decode
from typing import TYPE_CHECKING, Any

from aiosmtpd.smtp import MISSING, AuthResult, Envelope, Session

from ..auth.keys import SENDING_ROLES, verify_key
from .acceptor import Acceptor, Job
from .policy import RelayPolicy, address_problem
from .stamping import Trace
from .storage import Storage

if TYPE_CHECKING:
    from .protocol import ElemtaSMTP
    from .server import ListenerSettings

log = logging.getLogger("elemta.smtpd")

REPLY_QUEUED = "250 2.0.0 Ok: queued as {queue_id}"
REPLY_NOT_QUEUED = "451 4.3.0 Temporary failure, message not queued; try again later"
REPLY_RELAY_DENIED = "554 5.7.1 <{address}>: Relay access denied"
REPLY_TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
REPLY_AUTH_NEEDS_TLS = "538 5.7.11 Encryption required for requested authentication mechanism"
REPLY_AUTH_UNAVAILABLE = "454 4.7.0 Temporary authentication failure"
REPLY_AUTH_CANNOT_SEND = ("535 5.7.8 Authentication credentials invalid: a send or admin API key "
                          "is needed")
REPLY_INTERNAL = "451 4.3.0 Internal error; try again later"
# Postfix's answer when a lookup table fails: a temporary failure, so the client retries and
# neither a good recipient is refused nor a suppressed one let through.
REPLY_LOOKUP_FAILED = "451 4.3.0 <{address}>: Temporary lookup failure; try again later"


def _api_key_is_valid(session: Any, password: str) -> tuple[str, str] | None:
    """``(name, role)`` of a valid key, else None."""
    key = verify_key(session, password)
    return (key.name, key.role) if key is not None else None


class QueueHandler:
    """Takes mail from SMTP clients into the queue (API.md §11)."""

    def __init__(self, settings: ListenerSettings, storage: Storage, acceptor: Acceptor) -> None:
        self.settings = settings
        self.storage = storage
        self.acceptor = acceptor
        self.policy = RelayPolicy(tuple(settings.relay_networks))

    # ------------------------------------------------------------------ session

    async def handle_PROXY(self, server: ElemtaSMTP, session: Session, envelope: Envelope,
                           proxy_data: Any) -> bool:
        # Only called when ELEMTA_SMTPD_PROXY_PROTOCOL is on: the port is behind a proxy.
        # The header named the client: only now can its connection limits be applied.
        return bool(proxy_data.valid) and await server.admit()

    async def handle_EHLO(self, server: ElemtaSMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        server.reset_command_size_limits()
        # aiosmtpd reads pipelined commands correctly but does not say so.
        responses.insert(1, "250-PIPELINING")
        if not self.policy.auth_allowed(server.client_ip, server.over_tls):
            # Not offered where the key would cross the wire in clear text.
            responses = [line for line in responses if not line[4:].startswith("AUTH")]
        return responses

    async def handle_AUTH(self, server: ElemtaSMTP, session: Session, envelope: Envelope,
                          args: list[str]) -> Any:
        if not self.policy.auth_allowed(server.client_ip, server.over_tls):
            return REPLY_AUTH_NEEDS_TLS
        return MISSING

    # AUTH mechanisms: aiosmtpd's built-in ones check credentials synchronously, on the event
    # loop; these do the same exchange and check the API key in a worker thread.

    async def auth_PLAIN(self, server: ElemtaSMTP, args: list[str]) -> AuthResult:
        if len(args) == 1:
            blob = await server.challenge_auth("")
            if blob is MISSING:
                return AuthResult(success=False, handled=True)
        else:
            try:
                blob = b64decode(args[1].encode(), validate=True)
            except (binascii.Error, ValueError):
                await server.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        parts = blob.split(b"\x00")
        if len(parts) != 3:
            await server.push("501 5.5.2 Can't split auth value")
            return AuthResult(success=False, handled=True)
        return await self._check_key(server, "PLAIN", parts[1], parts[2])

    async def auth_LOGIN(self, server: ElemtaSMTP, args: list[str]) -> AuthResult:
        if len(args) == 1:
            login = await server.challenge_auth(server.AuthLoginUsernameChallenge)
            if login is MISSING:
                return AuthResult(success=False, handled=True)
        else:
            try:
                login = b64decode(args[1].encode(), validate=True)
            except (binascii.Error, ValueError):
                await server.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        password = await server.challenge_auth(server.AuthLoginPasswordChallenge)
        if password is MISSING:
            return AuthResult(success=False, handled=True)
        return await self._check_key(server, "LOGIN", login, password)

    async def _check_key(self, server: ElemtaSMTP, mechanism: str, login: bytes,
                         password: bytes) -> AuthResult:
        """The user name is free (shown in logs); the password must be a valid API key."""
        user = login.decode("utf-8", errors="replace")[:100]
        try:
            key = await self.storage.run(_api_key_is_valid,
                                         password.decode("utf-8", errors="replace"))
        except Exception:
            log.exception("AUTH %s from %s: key check failed", mechanism, server.client_ip)
            return AuthResult(success=False, handled=False, message=REPLY_AUTH_UNAVAILABLE)
        if key is None:
            log.warning("AUTH %s from %s as %r: invalid API key", mechanism, server.client_ip,
                        user)
            return AuthResult(success=False, handled=False)
        key_name, role = key
        if role not in SENDING_ROLES:
            # A send key (an application's) or an admin key (API.md §8): a dashboard's read key
            # must not become a way to send mail.
            log.warning("AUTH %s from %s: API key %s has the role %s, which cannot send",
                        mechanism, server.client_ip, key_name, role)
            return AuthResult(success=False, handled=False, message=REPLY_AUTH_CANNOT_SEND)
        log.info("AUTH %s from %s: API key %s", mechanism, server.client_ip, key_name)
        return AuthResult(success=True, auth_data=key_name)

    # ------------------------------------------------------------------ envelope

    async def handle_MAIL(self, server: ElemtaSMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        sender = "" if address == "<>" else address
        problem = address_problem(sender, is_sender=True, smtputf8=envelope.smtp_utf8)
        if problem:
            return problem
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server: ElemtaSMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        problem = address_problem(address, is_sender=False, smtputf8=envelope.smtp_utf8)
        if problem:
            return problem
        if not self.policy.may_relay(server.client_ip, bool(session.authenticated)):
            return REPLY_RELAY_DENIED.format(address=address)
        if len(envelope.rcpt_tos) >= self.settings.max_recipients:
            return REPLY_TOO_MANY_RECIPIENTS
        # Suppressed addresses and bounce rules (docs/DELIVERY.md): refused before queueing.
        sender = "" if envelope.mail_from in (None, "<>") else str(envelope.mail_from)
        try:
            refused = await self.storage.recipient_checks.refusal(sender, address)
        except Exception:
            # The database is what fails. Accepting unchecked would queue mail to a suppressed
            # address should the fault pass before DATA; refusing would bounce a good one.
            log.warning("Checking recipient %s against suppressions and rules failed; "
                        "answered 451", address, exc_info=True)
            return REPLY_LOOKUP_FAILED.format(address=address)
        if refused:
            return refused
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: ElemtaSMTP, session: Session, envelope: Envelope) -> str:
        """Queue the message; 250 only once it is committed, 451 on any failure."""
        assert isinstance(envelope.original_content, bytes)
        sender = "" if envelope.mail_from == "<>" else str(envelope.mail_from)
        trace = Trace(
            helo=str(session.host_name or ""),
            client_ip=str(server.client_ip or "unknown"),
            hostname=server.hostname,
            esmtp=bool(session.extended_smtp),
            tls=server.over_tls,
            authenticated=bool(session.authenticated),
            smtputf8=bool(envelope.smtp_utf8),
            recipients=tuple(envelope.rcpt_tos),
        )
        try:
            queue_id = await self.acceptor.submit(Job(sender, tuple(envelope.rcpt_tos),
                                                      envelope.original_content, trace))
        except Exception:
            log.exception("Message from %s (%s, %d recipients) not queued", trace.client_ip,
                          sender or "<>", len(envelope.rcpt_tos))
            return REPLY_NOT_QUEUED
        log.info("Queued %s from %s: %s -> %d recipient(s), %d bytes received", queue_id,
                 trace.client_ip, sender or "<>", len(envelope.rcpt_tos),
                 len(envelope.original_content))
        return REPLY_QUEUED.format(queue_id=queue_id)

    async def handle_exception(self, error: Exception) -> str:
        # aiosmtpd would answer "500 Error: (Type) text", leaking internals and telling the
        # client to give up; a temporary failure makes it try again.
        log.error("SMTP session error: %s: %s", type(error).__name__, error, exc_info=error)
        return REPLY_INTERNAL

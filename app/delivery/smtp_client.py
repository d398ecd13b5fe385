"""SMTP out: one transaction per (message, destination), connections pooled for reuse.

Per recipient the result comes from its RCPT reply, and for the recipients RCPT accepted, from
the reply to the end of DATA. Connection failures, timeouts and lost connections are temporary
failures for every recipient of the transaction. The SMTP code, enhanced status code
(RFC 3463), remote host and IP are kept for the events. The commands go pipelined (RFC 2920)
when the server offers it (``smtp_exchange``).

Internationalised mail (RFC 6531): ``MAIL FROM ... SMTPUTF8`` when an envelope address or the
header section is not ASCII and the server offers SMTPUTF8. A server without it still gets
what plain SMTP can carry (a non-ASCII domain as IDNA A-labels); a non-ASCII local part fails
permanently with 5.6.7 (that recipient, or every recipient for the sender's), and so does a
message received with SMTPUTF8 whose headers are UTF-8.
"""

from __future__ import annotations

import re
import smtplib
import socket
import ssl
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Any, Protocol

from .routing import Hop, Route
from .smtp_exchange import StaleConnection, exchange

ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})\b", re.ASCII)
_LINE_END = re.compile(rb"\r?\n")
# The Received header the listener puts on top of a message it accepted with SMTPUTF8
# (app/smtpd/stamping.py), below our DKIM signatures (app/dkim/signing.py): the only record of
# how the message arrived.
_RECEIVED_WITH_SMTPUTF8 = re.compile(rb"\A(?:DKIM-Signature:[^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*)*"
                                     rb"Received: [^\r\n]*\r\n\tby [^ \r\n]+ \(Elemta\) "
                                     rb"with UTF8SMTP")
# Control characters (C0 but TAB, DEL, C1) and lone surrogates: PostgreSQL text refuses NUL
# and surrogates, and none of them belongs in an event or an API answer.
_UNSAFE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\ud800-\udfff]")
TEXT_LIMIT = 2000  # a remote may answer with any number of reply lines


def clean_remote(text: str | None, limit: int = TEXT_LIMIT) -> str | None:
    """A text that came from elsewhere (a reply, a host name, an error) made safe to store."""
    if text is None:
        return None
    # The common case (a one-line reply, a host name) has none of them: ``isprintable`` is
    # false for every character _UNSAFE matches (controls, C1, surrogates) and for CR, LF
    # and tab, so such a text is kept as it is without three copies of it.
    if not text.isprintable():
        text = _UNSAFE.sub("?", text.replace("\r\n", " ").replace("\t", " "))
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class RecipientResult:
    """The outcome of one recipient in one attempt."""

    recipient_id: int
    address: str
    kind: str  # delivered | tempfail | rejection
    text: str
    smtp_code: int | None = None
    enhanced_code: str | None = None
    remote_host: str | None = None
    remote_ip: str | None = None

    def __post_init__(self) -> None:
        # Every remote text reaches events and last_error through here: sanitise it once.
        self.text = clean_remote(self.text) or ""
        self.remote_host = clean_remote(self.remote_host, 255)
        self.remote_ip = clean_remote(self.remote_ip, 64)


def kind_of(code: int) -> str:
    if 200 <= code < 300:
        return "delivered"
    return "rejection" if code >= 500 else "tempfail"


def reply_text(code: int, response: bytes | str) -> str:
    text = response.decode("utf-8", "replace") if isinstance(response, bytes) else response
    return f"{code} {' '.join(text.split())}".strip()


def enhanced_of(response: bytes | str, code: int | None) -> str | None:
    text = response.decode("utf-8", "replace") if isinstance(response, bytes) else response
    match = ENHANCED.match(text.strip())
    if match and code and match.group(1)[0] == str(code)[0]:
        return match.group(1)
    return None


class DestinationLimits(Protocol):
    """What ``deliver`` applies of a destination policy (``control.policies.Limits``)."""

    # Read-only: the worker's limits are a frozen dataclass.
    @property
    def key(self) -> str: ...
    @property
    def max_connections(self) -> int: ...
    @property
    def messages_per_connection(self) -> int | None: ...
    @property
    def require_tls(self) -> bool: ...
    @property
    def shared(self) -> bool: ...


class Connection:
    """An open SMTP session with the server it reached."""

    def __init__(self, smtp: smtplib.SMTP, hop: Hop, tls: bool) -> None:
        self.smtp = smtp
        self.hop = hop
        self.tls = tls
        self.ip = _peer_ip(smtp) or hop.address
        self.idle_since = time.monotonic()
        self.transactions = 0

    def close(self) -> None:
        try:
            self.smtp.quit()
        except (smtplib.SMTPException, OSError):
            pass
        finally:
            self.smtp.close()


def _peer_ip(smtp: smtplib.SMTP) -> str | None:
    try:
        return str(smtp.sock.getpeername()[0]) if smtp.sock else None
    except OSError:
        return None


class NoConnectionSlot(Exception):
    """Every connection slot of the destination is taken and none of ours will free soon."""


class SlotKeeper(Protocol):
    """Shared connection slots (``control.gate.DeliveryControl``)."""

    def take_slot(self, key: str, limit: int) -> int | None: ...

    def give_slot(self, key: str, slot: int) -> None: ...


class ConnectionPool:
    """Idle connections per destination, and at most ``limit`` open at once per destination.

    With ``slots`` and a ``slot_key``, opening a connection also needs one of the
    destination's shared slots (held by the database across every worker); without a free
    one, a job waits for a connection of this worker to the destination when there is one
    (and few others wait already), else ``acquire`` raises ``NoConnectionSlot``.
    """

    def __init__(self, limit: int, idle_seconds: float = 30.0,
                 slots: SlotKeeper | None = None) -> None:
        self.limit = max(1, limit)
        self.idle_seconds = idle_seconds
        self.slots = slots
        self._cond = threading.Condition()
        self._idle: dict[str, list[Connection]] = defaultdict(list)
        self._open: dict[str, int] = defaultdict(int)
        self._waiting: dict[str, int] = defaultdict(int)
        self._held: dict[str, list[tuple[str, int]]] = defaultdict(list)  # shared slots
        self._full_until: dict[str, float] = {}

    def acquire(self, destination: str, limit: int | None = None,
                slot_key: str | None = None) -> Connection | None:
        """An idle connection, or ``None`` with a slot reserved to open one (waits at the limit)."""
        limit = max(1, limit or self.limit)
        shared = slot_key is not None and self.slots is not None
        while True:
            with self._cond:
                while True:
                    if self._idle[destination]:
                        return self._idle[destination].pop()
                    full = shared and time.monotonic() < self._full_until.get(destination, 0)
                    if self._open[destination] < limit and not full:
                        self._open[destination] += 1
                        break
                    if shared and (self._open[destination] == 0 or self._waiting[destination]
                                   >= self._open[destination]):
                        raise NoConnectionSlot(destination)
                    self._waiting[destination] += 1
                    self._cond.wait(1.0)
                    self._waiting[destination] -= 1
            if not shared:
                return None
            assert self.slots is not None and slot_key is not None
            try:
                slot = self.slots.take_slot(slot_key, limit)
            except BaseException:
                self._unreserve(destination)
                raise
            if slot is not None:
                with self._cond:
                    self._held[destination].append((slot_key, slot))
                return None
            self._unreserve(destination, full_for=0.5)

    def _unreserve(self, destination: str, full_for: float = 0.0) -> None:
        with self._cond:
            self._open[destination] -= 1
            if full_for:
                self._full_until[destination] = time.monotonic() + full_for
            self._cond.notify_all()

    def release(self, destination: str, conn: Connection | None) -> None:
        """Give back a reusable connection, or ``None`` to free the slot (it was closed)."""
        freed: list[tuple[str, int]] = []
        with self._cond:
            if conn is None:
                self._open[destination] -= 1
                freed = self._free_slots(destination, 1)
            else:
                conn.idle_since = time.monotonic()
                self._idle[destination].append(conn)
            self._cond.notify_all()
        self._give(freed)

    def _free_slots(self, destination: str, count: int) -> list[tuple[str, int]]:
        held = self._held[destination]
        freed = held[-count:] if count else []
        del held[len(held) - len(freed):]
        return freed

    def _give(self, freed: list[tuple[str, int]]) -> None:
        if self.slots is not None:
            for key, slot in freed:
                self.slots.give_slot(key, slot)

    def close_idle(self, older_than: float | None = None) -> int:
        """Close idle connections (all, or those idle longer than ``older_than`` seconds)."""
        limit = self.idle_seconds if older_than is None else older_than
        now = time.monotonic()
        closing: list[Connection] = []
        freed: list[tuple[str, int]] = []
        with self._cond:
            for destination, conns in self._idle.items():
                keep = [c for c in conns if now - c.idle_since < limit]
                gone = [c for c in conns if now - c.idle_since >= limit]
                self._idle[destination] = keep
                self._open[destination] -= len(gone)
                freed.extend(self._free_slots(destination, len(gone)))
                closing.extend(gone)
            if closing:
                self._cond.notify_all()
        for conn in closing:
            conn.close()
        self._give(freed)
        return len(closing)


class ConnectFailed(Exception):
    def __init__(self, message: str, enhanced_code: str | None = None) -> None:
        super().__init__(message)
        self.enhanced_code = enhanced_code


class SmtpClient:
    """Delivers one message's recipients to one destination."""

    def __init__(self, pool: ConnectionPool, *, local_hostname: str, timeout: float,
                 ca_file: str = "") -> None:
        self.pool = pool
        self.local_hostname = local_hostname
        self.timeout = timeout
        self.ca_file = ca_file  # ELEMTA_RELAY_TLS_CA_FILE: a private CA for the relay

    def deliver(self, route: Route, sender: str, recipients: list[tuple[int, str]],
                raw: bytes, limits: DestinationLimits | None = None) -> list[RecipientResult]:
        """Deliver over a pooled connection; with ``limits`` (a destination policy), within its
        connection count (``NoConnectionSlot`` when none can be had), messages per connection
        and TLS requirement."""
        # Stored messages are CRLF already (the listener's stamp): two counts in C tell, where
        # the regex would copy the whole message for every attempt.
        data = raw if raw.count(b"\n") == raw.count(b"\r\n") else _LINE_END.sub(b"\r\n", raw)
        per_connection = None
        if limits is not None:
            per_connection = limits.messages_per_connection
            if limits.require_tls and route.tls == "opportunistic":
                route = replace(route, tls="required")
            conn = self.pool.acquire(route.destination, limits.max_connections,
                                     limits.key if limits.shared else None)
        else:
            conn = self.pool.acquire(route.destination)
        keep: Connection | None = None
        try:
            for attempt in range(2):
                reused = conn is not None
                if conn is None:
                    try:
                        conn = self._connect(route)
                    except ConnectFailed as exc:
                        return self._all(recipients, "tempfail", str(exc), None,
                                         exc.enhanced_code)
                try:
                    results = self._transaction(conn, sender, recipients, data)
                except StaleConnection as exc:
                    conn.smtp.close()
                    failed, conn = conn, None
                    if reused and attempt == 0:
                        continue  # the server closed an idle connection: once more, fresh
                    return self._all(recipients, "tempfail",
                                     f"Connection to {_where(failed)} lost: {_short(exc.cause)}",
                                     None, None, failed)
                except smtplib.SMTPServerDisconnected as exc:
                    conn.smtp.close()
                    failed, conn = conn, None
                    return self._all(recipients, "tempfail",
                                     f"Connection to {_where(failed)} lost: {_short(exc)}",
                                     None, None, failed)
                except (smtplib.SMTPException, OSError) as exc:
                    conn.smtp.close()
                    failed, conn = conn, None
                    return self._all(recipients, "tempfail",
                                     f"SMTP error with {_where(failed)}: {_short(exc)}",
                                     None, None, failed)
                except Exception:
                    # A bug mid-transaction leaves the session in an unknown state: never
                    # reuse it (the worker records the recipients as a temporary failure).
                    conn.smtp.close()
                    raise
                conn.transactions += 1
                spent = per_connection is not None and conn.transactions >= per_connection
                if (conn.smtp.sock is not None and not spent
                        and not any(r.smtp_code == 421 for r in results)):
                    keep = conn
                else:
                    conn.close()
                return results
            return []  # pragma: no cover - the loop always returns
        finally:
            self.pool.release(route.destination, keep)

    # ----------------------------------------------------------------- connecting

    def _connect(self, route: Route) -> Connection:
        problems = []
        tls_failures = []
        for hop in route.hops:
            try:
                return self._open(route, hop)
            except ssl.SSLError as exc:  # reached, but TLS failed (OSError's subclass)
                tls_failures.append(f"{hop.hostname}[{hop.address}]:{hop.port}: "
                                    f"{_tls_reason(exc)}")
            except (smtplib.SMTPException, OSError) as exc:
                problems.append(f"{hop.hostname}[{hop.address}]:{hop.port}: {_short(exc)}")
        if tls_failures:
            # Not "could not connect": the server answered and TLS is what failed; X.7.5 is
            # RFC 3463's cryptographic failure, as Postfix reports it.
            raise ConnectFailed(f"TLS failure with {route.destination}: "
                                f"{'; '.join(tls_failures + problems)}", "4.7.5")
        raise ConnectFailed("Could not connect to any server for "
                            f"{route.destination}: {'; '.join(problems) or 'no server'}")

    def _open(self, route: Route, hop: Hop, allow_starttls: bool = True) -> Connection:
        smtp: smtplib.SMTP
        if route.tls == "tls":
            smtp = smtplib.SMTP_SSL(hop.address, hop.port, local_hostname=self.local_hostname,
                                    timeout=self.timeout,
                                    context=_verified_context(self.ca_file))
        else:
            smtp = smtplib.SMTP(hop.address, hop.port, local_hostname=self.local_hostname,
                                timeout=self.timeout)
        tls = route.tls == "tls"
        try:
            smtp.ehlo_or_helo_if_needed()
            if route.tls == "starttls":
                if not smtp.has_extn("starttls"):
                    raise smtplib.SMTPNotSupportedError(
                        "STARTTLS required (ELEMTA_RELAY_TLS=starttls) but not offered")
                smtp.starttls(context=_verified_context(self.ca_file))
                smtp.ehlo()
                tls = True
            elif route.tls == "required":
                # A destination policy requires encryption; like opportunistic TLS the
                # certificate is not verified (MX hosts rarely have one for their name).
                if not smtp.has_extn("starttls"):
                    raise smtplib.SMTPNotSupportedError(
                        "TLS required by the destination policy but STARTTLS not offered")
                smtp.starttls(context=_opportunistic_context())
                smtp.ehlo()
                tls = True
            elif route.tls == "opportunistic" and allow_starttls and smtp.has_extn("starttls"):
                try:
                    # Opportunistic TLS (RFC 7435): encrypt when offered, without verification.
                    smtp.starttls(context=_opportunistic_context())
                    smtp.ehlo()
                    tls = True
                except (smtplib.SMTPException, ssl.SSLError, OSError):
                    smtp.close()
                    return self._open(route, hop, allow_starttls=False)
            if route.username:
                _login(smtp, route.username, route.password)
        except BaseException:
            smtp.close()
            raise
        return Connection(smtp, hop, tls)

    # ----------------------------------------------------------------- the transaction

    def _transaction(self, conn: Connection, sender: str, recipients: list[tuple[int, str]],
                     data: bytes) -> list[RecipientResult]:
        smtp = conn.smtp
        # smtplib leaves a connection in UTF-8 after an SMTPUTF8 transaction until RSET: each
        # transaction starts from ASCII (MAIL switches it back on with SMTPUTF8).
        smtp.command_encoding = "ascii"
        options = []
        if smtp.has_extn("size"):
            options.append(f"SIZE={len(data)}")
        # RFC 6152 wants 8-bit data converted for a server without 8BITMIME; like sendmail's
        # default (pass8) it is sent unchanged: practically every server takes it.
        if smtp.has_extn("8bitmime") and not data.isascii():
            options.append("BODY=8BITMIME")
        refused: dict[int, RecipientResult] = {}
        wire: list[tuple[int, str, str]] = []  # (id, address, as sent in RCPT)
        utf8_headers = not _header_section(data).isascii()
        if smtp.has_extn("smtputf8"):
            if utf8_headers or not _ascii(sender, *(a for _, a in recipients)):
                options.append("SMTPUTF8")
            wire = [(rid, address, address) for rid, address in recipients]
        else:
            mail_from = _plain_address(sender)
            if mail_from is None:
                return self._all(recipients, "rejection",
                                 f"SMTPUTF8 required (non-ASCII sender address) but not "
                                 f"offered by {_where(conn)} (RFC 6531)", None, "5.6.7", conn)
            if utf8_headers and _RECEIVED_WITH_SMTPUTF8.match(data):
                return self._all(recipients, "rejection",
                                 f"SMTPUTF8 required (message received with SMTPUTF8, UTF-8 "
                                 f"headers) but not offered by {_where(conn)} (RFC 6531)",
                                 None, "5.6.7", conn)
            sender = mail_from
            for rid, address in recipients:
                plain = _plain_address(address)
                if plain is None:
                    refused[rid] = RecipientResult(
                        rid, address, "rejection",
                        f"Non-ASCII address not permitted for that recipient: "
                        f"{_where(conn)} does not offer SMTPUTF8 (RFC 6531)",
                        None, "5.6.7", conn.hop.hostname, conn.ip)
                else:
                    wire.append((rid, address, plain))
            if not wire:
                return [refused[rid] for rid, _ in recipients]
        replies = exchange(smtp, sender, options, [sent_as for _, _, sent_as in wire], data)
        code, response = replies.mail
        if code >= 400:
            self._reset(smtp, code)
            return self._all(recipients, kind_of(code), reply_text(code, response), code,
                             enhanced_of(response, code), conn)
        results: dict[int, RecipientResult] = dict(refused)
        accepted: list[tuple[int, str]] = []
        for (recipient_id, address, _), (code, response) in zip(wire, replies.rcpt, strict=True):
            if 200 <= code < 300:
                accepted.append((recipient_id, address))
            else:
                results[recipient_id] = self._result(recipient_id, address, code, response, conn)
        if not accepted:
            self._reset(smtp, max((r.smtp_code or 0) for r in results.values()))
        else:
            assert replies.data is not None  # DATA is sent whenever a recipient was accepted
            code, response = replies.data
            if not replies.content_sent:  # DATA itself refused (no 354)
                self._reset(smtp, code)
            for recipient_id, address in accepted:
                results[recipient_id] = self._result(recipient_id, address, code, response, conn)
        return [results[recipient_id] for recipient_id, _ in recipients]

    @staticmethod
    def _reset(smtp: smtplib.SMTP, code: int) -> None:
        if code == 421:  # the server is closing the channel
            smtp.close()
            return
        try:
            smtp.rset()
        except (smtplib.SMTPException, OSError):
            smtp.close()

    @staticmethod
    def _result(recipient_id: int, address: str, code: int, response: Any,
                conn: Connection) -> RecipientResult:
        return RecipientResult(recipient_id, address, kind_of(code), reply_text(code, response),
                               code, enhanced_of(response, code), conn.hop.hostname, conn.ip)

    @staticmethod
    def _all(recipients: list[tuple[int, str]], kind: str, text: str, code: int | None,
             enhanced: str | None, conn: Connection | None = None) -> list[RecipientResult]:
        host = conn.hop.hostname if conn else None
        ip = conn.ip if conn else None
        return [RecipientResult(rid, address, kind, text, code, enhanced, host, ip)
                for rid, address in recipients]


def _login(smtp: smtplib.SMTP, username: str, password: str) -> None:
    """AUTH with the first mechanism offered of PLAIN, LOGIN, CRAM-MD5; raises on refusal.

    One mechanism only: a wrong password must not be tried again with every other one.
    """
    offered = smtp.esmtp_features.get("auth", "").upper().split()
    smtp.user, smtp.password = username, password
    for mechanism, respond in (("PLAIN", smtp.auth_plain), ("LOGIN", smtp.auth_login),
                               ("CRAM-MD5", smtp.auth_cram_md5)):
        if mechanism in offered:
            smtp.auth(mechanism, respond)
            return
    raise smtplib.SMTPNotSupportedError("the relay offers no AUTH mechanism Elemta supports "
                                        "(PLAIN, LOGIN, CRAM-MD5)")


def _where(conn: Connection) -> str:
    return f"{conn.hop.hostname}[{conn.ip}]:{conn.hop.port}"


def _short(exc: BaseException) -> str:
    if isinstance(exc, smtplib.SMTPResponseException):
        return reply_text(exc.smtp_code, exc.smtp_error)
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timed out"
    return str(exc) or type(exc).__name__


def _ascii(*texts: str) -> bool:
    return all(text.isascii() for text in texts)


def _header_section(data: bytes) -> bytes:
    end = data.find(b"\r\n\r\n")
    return data if end < 0 else data[:end]


def _plain_address(address: str) -> str | None:
    """The address as SMTP without SMTPUTF8 can carry it, or ``None``.

    A non-ASCII domain becomes its IDNA A-labels (RFC 6531 section 3.2 allows this
    conversion); a non-ASCII local part cannot be converted.
    """
    if address.isascii():
        return address
    local, at, domain = address.rpartition("@")
    if not at or not local.isascii():
        return None
    import dns.exception  # here, not at import: the worker's start needs no dnspython
    import dns.name

    try:
        return f"{local}@{dns.name.from_unicode(domain).to_text(omit_final_dot=True)}"
    except (dns.exception.DNSException, UnicodeError, ValueError):
        return None


def _tls_reason(exc: ssl.SSLError) -> str:
    """Why TLS failed, in words: the certificate problem, or the handshake alert."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verification failed: {exc.verify_message}"
    return f"TLS handshake failed: {exc.reason or exc}"


def _verified_context(ca_file: str = "") -> ssl.SSLContext:
    """Certificate and host name verified, against ``ca_file`` when one is given."""
    return ssl.create_default_context(cafile=ca_file or None)


def _opportunistic_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context

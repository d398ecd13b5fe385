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
- The message data is read in large chunks up to the end-of-data line (``read_data``), not line
  by line as aiosmtpd does (~92 000 awaits for a 7 MB message); the result, the replies (500
  for a line over 1000 octets, 552 over the size limit, both after the whole data was read)
  and the dot-unstuffing (RFC 5321 4.5.2) are aiosmtpd's.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import re
import ssl
import weakref
from dataclasses import dataclass
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError
from typing import TYPE_CHECKING, Any, AnyStr
from warnings import warn

import aiosmtpd.smtp as aiosmtpd_smtp
from aiosmtpd.smtp import MISSING, SMTP, Envelope

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
# The end of the message data: the CRLF of its last line, then a line of a single dot.
END_OF_DATA = b"\r\n.\r\n"
# How much DATA is taken from the stream at once (the reader's limit while DATA is read;
# aiosmtpd's is one line, 1001 octets, for commands).
DATA_CHUNK = 256 * 1024
# A path as nearly every client writes it: <dot-atom@host.name>, then parameters (no comments).
# For these the result of the e-mail header parser (~30 us a call) is known: the address, and
# the rest without its leading blanks.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_SIMPLE_PATH = re.compile(rf"<({_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>"
                          r"([^(\r\n]*)\Z")
REPLY_LINE_TOO_LONG = "500 Line too long (see RFC5321 4.5.3.1.6)"
REPLY_TOO_MUCH_DATA = "552 Error: Too much mail data"


_LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
               "error": logging.ERROR, "exception": logging.ERROR,
               "critical": logging.CRITICAL}
_aiosmtpd_sanitized_log = aiosmtpd_smtp.sanitized_log


def sanitized_log(func: Any, msg: Any, *args: Any, **kwargs: Any) -> None:
    """aiosmtpd's ``sanitized_log``, which its command loop calls twice for every command
    line (``mail.log`` debug and info) and which masks AUTH data with a regular expression
    in each argument before the logger looks at its level: here the level is looked at
    first, so a line that would not be logged costs nothing more (the listener keeps
    ``mail.log`` at ERROR, server.AIOSMTPD_LOG_LEVEL). A line that is logged goes through
    aiosmtpd's own, masked as before."""
    logger = getattr(func, "__self__", None)
    level = _LOG_LEVELS.get(getattr(func, "__name__", ""))
    if isinstance(logger, logging.Logger) and level is not None and (
            not logger.isEnabledFor(level)):
        return
    _aiosmtpd_sanitized_log(func, msg, *args, **kwargs)


# aiosmtpd's command loop finds it as a global of its module.
aiosmtpd_smtp.sanitized_log = sanitized_log


class DataTooLong(Exception):
    """A line of the data is longer than 1000 octets with its CRLF."""


class DataTooMuch(Exception):
    """The data is larger than the size limit."""


async def read_data(reader: asyncio.StreamReader, max_bytes: int | None,
                    line_limit: int) -> bytes:
    """The message data up to and without the end-of-data line, dot-unstuffed.

    Raises ``DataTooLong`` or ``DataTooMuch`` once the whole data has been read (RFC 5321
    4.2.5: the reply comes after the end of data), keeping at most ``max_bytes`` meanwhile.
    Reads no byte beyond the end-of-data line: pipelined commands stay in ``reader``.

    ``readuntil(END_OF_DATA)`` finds the end only when all of it is still in the reader: so
    whenever the bytes taken so far end with the beginning of an end-of-data line (a CRLF, a
    CRLF and a dot, ...; at the very start the data begins after the CRLF of the DATA command)
    the few bytes that would complete it are read and looked at first.
    """
    parts: list[bytes] = []
    taken = 0  # octets taken from the stream so far
    kept = True  # False once over the size limit: the rest is read and dropped
    too_long = False
    tail = b"\r\n"  # the last octets taken (the DATA command's CRLF at first)
    while True:
        overlap = _end_prefix(tail)
        if overlap:
            more = await reader.readexactly(len(END_OF_DATA) - overlap)
            if tail[len(tail) - overlap:] + more == END_OF_DATA:
                chunk, done = more, True
            else:
                chunk, done = more, False
        else:
            try:
                chunk = await reader.readuntil(END_OF_DATA)
                done = True
            except asyncio.LimitOverrunError as exc:
                chunk, done = await reader.read(exc.consumed), False
        taken += len(chunk)
        if kept:
            parts.append(chunk)
            # Until the end is found, at most ".\r" of the end-of-data line can be among the
            # octets taken, so the data has at least taken - 2.
            if max_bytes and taken - (3 if done else 2) > max_bytes:
                kept = False
                # aiosmtpd replies 500 rather than 552 when a too long line came first.
                too_long = _has_long_line(b"".join(parts), line_limit)
                parts = []
        tail = (tail + chunk)[-4:]
        if done:
            break
    if not kept:
        raise DataTooLong() if too_long else DataTooMuch()
    _drop_end(parts, 3)  # the end-of-data line's ".\r\n"
    data = b"".join(parts)
    if _has_long_line(data, line_limit):
        raise DataTooLong()
    if b"\r\n." in data or data.startswith(b"."):
        data = (b"\r\n" + data).replace(b"\r\n.", b"\r\n")[2:]
    return data


def _end_prefix(tail: bytes) -> int:
    """Length of the longest end of ``tail`` that begins END_OF_DATA (0: none)."""
    for size in range(len(END_OF_DATA) - 1, 0, -1):
        if tail.endswith(END_OF_DATA[:size]):
            return size
    return 0


def _drop_end(parts: list[bytes], count: int) -> None:
    """Drop the last ``count`` octets of ``parts`` (without copying the others)."""
    while count:
        last = parts.pop()
        if len(last) > count:
            parts.append(last[:-count])
            return
        count -= len(last)


def _has_long_line(data: bytes, line_limit: int) -> bool:
    """A line (CRLF-delimited, as aiosmtpd reads them) over ``line_limit`` with its CRLF.

    A line of ``line_limit - 1`` octets or more without its CRLF covers a whole window of
    ``half`` octets starting at a multiple of ``half``: only windows without a CRLF are looked
    at closer (a 7 MB message has ~15 000 windows and ~92 000 lines; splitting it into lines
    cost 20 ms)."""
    longest = line_limit - 2  # octets before the CRLF
    half = longest // 2
    start = 0
    while start < len(data):
        if data.find(b"\r\n", start, start + half + 1) >= 0:
            start += half
            continue
        before = data.rfind(b"\r\n", 0, start + 1)
        begin = before + 2 if before >= 0 else 0
        end = data.find(b"\r\n", start)
        if (len(data) if end < 0 else end) - begin > longest:
            return True
        if end < 0:
            return False
        start = end + 2
    return False


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


@dataclass(frozen=True)
class _Lookups:
    """What aiosmtpd's constructor finds by name on the protocol and the handler (with
    ``inspect.getmembers`` and ``dir``: ~0.6 ms a connection), kept per pair of classes."""

    auth: tuple[tuple[str, bool, str], ...]  # (mechanism, a method of the protocol, attribute)
    hooks: tuple[tuple[str, str], ...]  # (hook, the handler's handle_* attribute)
    ehlo_hook_ver: str | None
    commands: tuple[tuple[str, str], ...]  # (command, the protocol's smtp_* attribute)

    @property
    def auth_on_handler(self) -> bool:
        """Every AUTH mechanism is a method of the handler: the mapping can be shared by
        every session of that handler."""
        return not any(on_protocol for _mechanism, on_protocol, _name in self.auth)


_LOOKUPS: dict[tuple[type, type], _Lookups] = {}
_PREFIXES = ("auth_", "handle_", "smtp_")


def _lookups(protocol: type, handler: Any) -> _Lookups | None:
    """The lookups for this protocol class and ``handler``, or None when they cannot be kept
    per class: the handler has such attributes of its own (not of its class), or an EHLO hook
    aiosmtpd would warn about or refuse (its constructor then says so itself)."""
    if any(name.startswith(_PREFIXES) for name in getattr(handler, "__dict__", ())):
        return None
    key = (protocol, type(handler))
    found = _LOOKUPS.get(key)
    if found is not None:
        return found
    auth: dict[str, tuple[bool, str]] = {}
    for on_protocol, cls in ((True, protocol), (False, type(handler))):
        for name in sorted(dir(cls)):  # the order of inspect.getmembers
            if name.startswith("auth_"):
                method = getattr(cls, name)
                mechanism = getattr(method, "__auth_mechanism_name__",
                                    name.replace("auth_", "").replace("__", "-"))
                auth[mechanism] = (on_protocol, name)
    hooks = tuple(name for name in dir(handler) if name.startswith("handle_"))
    ehlo_hook_ver = None
    if "handle_EHLO" in hooks:
        if len(inspect.signature(handler.handle_EHLO).parameters) != 5:
            return None
        ehlo_hook_ver = "new"
    found = _Lookups(
        auth=tuple((mechanism, on_protocol, name)
                   for mechanism, (on_protocol, name) in auth.items()),
        hooks=tuple((name.replace("handle_", ""), name) for name in hooks),
        ehlo_hook_ver=ehlo_hook_ver,
        commands=tuple((name.replace("smtp_", ""), name) for name in dir(protocol)
                       if name.startswith("smtp_")))
    _LOOKUPS[key] = found
    return found


@dataclass(frozen=True)
class _Shared:
    """What aiosmtpd's constructor binds to the handler, the same for all its sessions."""

    auth_methods: dict[str, Any]
    handle_hooks: dict[str, Any]


_SHARED: weakref.WeakKeyDictionary[Any, _Shared] = weakref.WeakKeyDictionary()


def _shared_of(handler: Any, lookups: _Lookups) -> _Shared | None:
    """The handler's bound hooks and AUTH methods, made once per handler (None when an AUTH
    mechanism is the protocol's own: bound to each session, or when the handler cannot be a
    weak key)."""
    if not lookups.auth_on_handler:
        return None
    try:
        shared = _SHARED.get(handler)
    except TypeError:  # not hashable or not weakly referenceable
        return None
    if shared is None:
        shared = _Shared(
            auth_methods={mechanism: aiosmtpd_smtp._AuthMechAttr(getattr(handler, name), False)
                          for mechanism, _on_protocol, name in lookups.auth},
            handle_hooks={hook: getattr(handler, name) for hook, name in lookups.hooks})
        try:
            _SHARED[handler] = shared
        except TypeError:
            return None
    return shared


class ElemtaSMTP(SMTP):
    def __init__(self, handler: Any, *, listener: Listener, **kwargs: Any) -> None:
        # aiosmtpd keeps these limits in a class-wide dict that every EHLO enlarges; ours are
        # per session and fixed (see reset_command_size_limits).
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        lookups = _lookups(type(self), handler)
        if lookups is None:
            super().__init__(handler, command_call_limit=COMMAND_CALL_LIMITS, **kwargs)
        else:
            self._init_as_aiosmtpd(handler, lookups, command_call_limit=COMMAND_CALL_LIMITS,
                                   **kwargs)
        self.listener = listener
        # (session, its proxy_data, the client's address parsed from them): see client_ip.
        self._client_ip_of: tuple[Any, Any, IPAddress | None] | None = None
        self._command: str | None = None
        self._command_arg: str | None = None
        self._data_started = False
        self._errors = 0
        self._registered = False
        self._ticket: Ticket | None = None
        self._idle_deadline = 0.0  # loop time after which an idle session is closed
        self._idle_timer_live = False  # _timeout_handle is scheduled and not yet run

    def _init_as_aiosmtpd(
            self, handler: Any, lookups: _Lookups, *,
            data_size_limit: int | None = aiosmtpd_smtp.DATA_SIZE_DEFAULT,
            enable_SMTPUTF8: bool = False, decode_data: bool = False,
            hostname: str | None = None, ident: str | None = None,
            tls_context: ssl.SSLContext | None = None, require_starttls: bool = False,
            timeout: float = 300, auth_required: bool = False, auth_require_tls: bool = True,
            auth_exclude_mechanism: Any = None, auth_callback: Any = None,
            command_call_limit: int | dict[str, int] | None = None, authenticator: Any = None,
            proxy_protocol_timeout: float | None = None,
            loop: asyncio.AbstractEventLoop | None = None) -> None:
        """aiosmtpd 1.4.6's ``SMTP.__init__``, statement for statement, with the methods and
        hooks it looks up by name taken from ``lookups`` instead of ``inspect.getmembers`` and
        ``dir`` on every connection (tests/test_smtpd.py compares the two constructions)."""
        self.__ident__ = ident or aiosmtpd_smtp.__ident__
        self.loop = loop if loop else aiosmtpd_smtp.make_loop()
        asyncio.StreamReaderProtocol.__init__(
            self, asyncio.StreamReader(loop=self.loop, limit=self.line_length_limit),
            client_connected_cb=self._cb_client_connected, loop=self.loop)
        self.event_handler = handler
        assert data_size_limit is None or isinstance(data_size_limit, int)
        self.data_size_limit = data_size_limit
        self.enable_SMTPUTF8 = enable_SMTPUTF8
        self._decode_data = decode_data
        self.command_size_limits.clear()
        self.hostname = hostname if hostname else aiosmtpd_smtp.socket.getfqdn()
        self.tls_context = tls_context
        mail_log = aiosmtpd_smtp.log
        if tls_context:
            if tls_context.verify_mode not in {ssl.CERT_NONE, ssl.CERT_OPTIONAL}:
                mail_log.warning("tls_context.verify_mode not in {CERT_NONE, CERT_OPTIONAL}; "
                                 "this might cause client connection problems")
            elif tls_context.check_hostname:
                mail_log.warning("tls_context.check_hostname == True; "
                                 "this might cause client connection problems")
        self.require_starttls = tls_context and require_starttls
        self._timeout_duration = timeout
        self._timeout_handle = None
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine = None
        if not auth_require_tls and auth_required:
            warn("Requiring AUTH while not requiring TLS can lead to security vulnerabilities!",
                 stacklevel=1)
            mail_log.warning("auth_required == True but auth_require_tls == False")
        self._auth_require_tls = auth_require_tls
        if proxy_protocol_timeout is not None:
            if proxy_protocol_timeout <= 0:
                raise ValueError("proxy_protocol_timeout must be > 0")
            elif proxy_protocol_timeout < 3.0:
                mail_log.warning("proxy_protocol_timeout < 3.0")
        self._proxy_timeout = proxy_protocol_timeout
        if authenticator is not None:
            self._authenticator = authenticator
            self._auth_callback = None
        else:
            self._auth_callback = auth_callback or aiosmtpd_smtp.login_always_fail
            self._authenticator = None
        self._auth_required = auth_required
        shared = _shared_of(handler, lookups)
        if shared is not None and not auth_exclude_mechanism:
            # The handler's methods, bound once for all its sessions (aiosmtpd only reads
            # these two mappings after its constructor).
            self._auth_methods = shared.auth_methods
        else:
            self._auth_methods = {
                mechanism: aiosmtpd_smtp._AuthMechAttr(
                    getattr(self if on_protocol else handler, name), on_protocol)
                for mechanism, on_protocol, name in lookups.auth}
        for mechanism in (auth_exclude_mechanism or []):
            self._auth_methods.pop(mechanism, None)
        if mail_log.isEnabledFor(logging.INFO):
            mail_log.info("Available AUTH mechanisms: " + " ".join(
                m + "(builtin)" if impl.is_builtin else m
                for m, impl in sorted(self._auth_methods.items())))
        self._handle_hooks = (shared.handle_hooks if shared is not None else
                              {hook: getattr(handler, name) for hook, name in lookups.hooks})
        self._ehlo_hook_ver = lookups.ehlo_hook_ver
        self._smtp_methods = {command: getattr(self, name) for command, name in lookups.commands}
        if command_call_limit is None:
            self._enforce_call_limit = False
        else:
            self._enforce_call_limit = True
            if isinstance(command_call_limit, int):
                self._call_limit_base = {}
                self._call_limit_default = command_call_limit
            elif isinstance(command_call_limit, dict):
                if command_call_limit is not COMMAND_CALL_LIMITS and not all(
                        map(aiosmtpd_smtp.is_int, command_call_limit.values())):
                    raise TypeError("All command_call_limit values must be int")
                self._call_limit_base = command_call_limit
                self._call_limit_default = command_call_limit.get(
                    "*", aiosmtpd_smtp.CALL_LIMIT_DEFAULT)
            else:
                raise TypeError("command_call_limit must be int or Dict[str, int]")

    def _create_envelope(self) -> Envelope:
        return TransactionEnvelope()

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's ``_getaddr`` (the path of MAIL FROM / RCPT TO and the rest), without
        the ``typing.Protocol`` class it defines on every call (60 of its 90 us), and with the
        header parser skipped for a plain ``<local@domain>``."""
        if not arg:
            return "", ""
        simple = _SIMPLE_PATH.match(arg)
        if simple is not None:
            addr, rest = simple.group(1), simple.group(2).lstrip(" \t")
        else:
            try:
                address, rest = (get_angle_addr(arg) if arg.lstrip().startswith("<")
                                 else get_addr_spec(arg))
            except HeaderParseError:
                return None, None
            addr = address.addr_spec
        if self.local_part_limit and len(addr.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return addr, rest

    def reset_command_size_limits(self) -> None:
        self.command_size_limits["MAIL"] = MAIL_COMMAND_SIZE

    # ------------------------------------------------------------------ who is the client

    @property
    def client_ip(self) -> IPAddress | None:
        """The client's address: the PROXY header's source when one was received.

        Parsed once per session and PROXY header (it is asked for at every RCPT and DATA);
        STARTTLS starts a new session, a PROXY header sets ``proxy_data``: both parse again."""
        session = self.session
        if session is None:
            return None
        proxy = session.proxy_data
        known = self._client_ip_of
        if known is not None and known[0] is session and known[1] is proxy:
            return known[2]
        if proxy is not None and getattr(proxy, "src_addr", None) is not None:
            ip = client_ip(str(proxy.src_addr))
        else:
            ip = client_ip(session.peer)
        self._client_ip_of = (session, proxy, ip)
        return ip

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
        # aiosmtpd starts a new session for the TLS transport, and with it would forget the
        # PROXY header read before STARTTLS: the client would become the proxy's address (a
        # relay network by default), an open relay for anyone who says STARTTLS.
        proxy_data = None if first or self.session is None else self.session.proxy_data
        super().connection_made(transport)
        if proxy_data is not None and self.session is not None:
            self.session.proxy_data = proxy_data
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
        cap, a session outside a mail transaction gets the short (stress) timeout.

        Re-arming moves a deadline; the timer itself is replaced only when the new deadline
        comes before it (aiosmtpd cancels and schedules a timer for every command, and
        ``data_received`` resets it for every chunk of DATA). When it fires before the
        deadline (``_idle_check``), it waits on until the deadline."""
        if duration is None and not self.in_transaction and self.listener.admission.stressed:
            duration = self.listener.settings.stress_idle_timeout
        deadline = self.loop.time() + (duration or self._timeout_duration)
        self._idle_deadline = deadline
        handle = self._timeout_handle
        if handle is not None and self._idle_timer_live and handle.when() <= deadline:
            return
        if handle is not None:
            handle.cancel()
        self._timeout_handle = self.loop.call_at(deadline, self._idle_check)
        self._idle_timer_live = True

    def _idle_check(self) -> None:
        if self.loop.time() < self._idle_deadline:
            self._timeout_handle = self.loop.call_at(self._idle_deadline, self._idle_check)
            return
        self._idle_timer_live = False
        self._timeout_cb()

    def shorten_idle_timer(self, seconds: float) -> None:
        """At most ``seconds`` more of idleness, unless a mail transaction is under way."""
        if self._timeout_handle is None or self.transport is None or self.in_transaction:
            return
        if self._idle_deadline - self.loop.time() > seconds:
            self._reset_timeout(seconds)

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
        await self._in_command("DATA", arg, self._data)
        self._rearm_idle_timer()

    async def _data(self, arg: str) -> None:
        """aiosmtpd's ``smtp_DATA`` with the data read by ``read_data``."""
        if self._decode_data:  # not the listener's setting; aiosmtpd's own loop then
            await super().smtp_DATA(arg)
            return
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        reader: Any = self._reader  # its limit is private: asyncio has no setter
        limit = reader._limit
        reader._limit = DATA_CHUNK
        try:
            content = await read_data(reader, self.data_size_limit, self.line_length_limit)
        except (DataTooLong, DataTooMuch) as exc:
            await self.push(REPLY_LINE_TOO_LONG if isinstance(exc, DataTooLong)
                            else REPLY_TOO_MUCH_DATA)
            self._set_post_data_state()
            return
        except asyncio.CancelledError:
            logging.getLogger("mail.log").info("Connection lost during DATA")  # as aiosmtpd
            self._writer.close()
            raise
        except asyncio.IncompleteReadError:  # the client closed before the end of the data
            logging.getLogger("mail.log").info("Connection lost during DATA")
            self._writer.close()
            return
        finally:
            reader._limit = limit
        self.envelope.content = content
        self.envelope.original_content = content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push("250 OK" if status is MISSING else status)

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
            storage = self.listener.storage
            if storage is None:
                raise RuntimeError("the listener's storage is not started")
            await storage.run(
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

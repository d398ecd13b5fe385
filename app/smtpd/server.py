"""The listener's lifecycle: settings from the config, the asyncio server, graceful stop.

``serve`` runs it in the foreground (``flask smtpd``: SIGTERM/SIGINT stop it): one process, or
with ``ELEMTA_SMTPD_PROCESSES`` above 1 a parent and that many listener processes sharing the
port (``processes.py``). ``ListenerThread`` runs one on a background thread (tests and the
benchmark).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from flask import Flask

from ..logging_setup import stdout_on_own_thread
from .acceptor import Acceptor
from .admission import (
    REPLY_SHUTTING_DOWN,
    Admission,
    AdmissionLimits,
    Refusal,
    RefusalThrottle,
    Ticket,
)
from .handler import QueueHandler
from .policy import IPNetwork, RelayPolicy
from .protocol import ElemtaSMTP
from .storage import Storage, record_refusal

if TYPE_CHECKING:
    from .processes import AdmissionClient

log = logging.getLogger("elemta.smtpd")

# Threads doing database work (acceptance, AUTH, refusal events) for all sessions.
DB_THREADS = 8
# At shutdown, how long transactions under way may take to finish.
SHUTDOWN_GRACE_SECONDS = 30.0
# aiosmtpd logs every command at INFO on "mail.log": far too chatty for the log table.
AIOSMTPD_LOG_LEVEL = logging.ERROR


class ListenerConfigError(ValueError):
    """A listener setting that cannot be used (bad address, unreadable certificate, ...)."""


def parse_listen(text: str) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or ``:port`` (all interfaces) -> (host, port)."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ListenerConfigError(f"ELEMTA_SMTP_LISTEN must be host:port, got {text!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


# ELEMTA_SMTPD_PROCESSES=auto: one listener process per two CPUs (the other half for the
# database and the worker, which share the host in the usual set-up), at most this many (each
# holds up to 10 pooled database connections and, on PostgreSQL, one per storage thread for
# the RCPT checks); docs/SMTPD.md, "Listener processes".
AUTO_PROCESSES_MAX = 4


def resolve_processes(value: int | str) -> int:
    """``auto``: half the CPUs this process may run on (its affinity, not the machine's count),
    at least 1, at most AUTO_PROCESSES_MAX; a number as it is."""
    if value != "auto":
        return max(1, int(value))
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus // 2, AUTO_PROCESSES_MAX))


def default_trusted_reserve(max_sessions: int) -> int:
    """A fifth of the sessions stays for the relay networks (20 of the default 100)."""
    return max_sessions // 5


def default_client_count_limit(max_sessions: int) -> int:
    """Half the sessions per untrusted client, as Postfix's 50 is half its default 100
    processes."""
    return max(1, max_sessions // 2)


@dataclass(frozen=True)
class ListenerSettings:
    host: str
    port: int
    hostname: str
    max_message_bytes: int
    max_recipients: int
    max_sessions: int
    timeout: int
    relay_networks: Sequence[IPNetwork]
    tls_cert: str = ""
    tls_key: str = ""
    proxy_protocol: bool = False
    # Connection limits (admission.py); the defaults follow Postfix's (docs/SMTPD.md).
    trusted_reserve: int = 0
    client_count_limit: int = 0
    client_rate_limit: int = 0
    stress_timeout: int = 10
    processes: int = 1  # listener processes on the port (processes.py when above 1)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides: Any) -> ListenerSettings:
        host, port = parse_listen(str(config["SMTP_LISTEN"]))
        max_sessions = max(1, int(config["SMTPD_MAX_SESSIONS"]))
        settings = cls(
            host=host,
            port=port,
            hostname=str(config.get("SMTP_HOSTNAME") or socket.getfqdn()),
            max_message_bytes=int(config["MAX_MESSAGE_BYTES"]),
            max_recipients=max(1, int(config["MAX_RECIPIENTS"])),
            max_sessions=max_sessions,
            timeout=max(1, int(config["SMTPD_IDLE_TIMEOUT"])),
            relay_networks=tuple(config["RELAY_NETWORKS"]),
            tls_cert=str(config.get("TLS_CERT") or ""),
            tls_key=str(config.get("TLS_KEY") or ""),
            proxy_protocol=bool(config["SMTPD_PROXY_PROTOCOL"]),
            trusted_reserve=int(config.get("SMTPD_TRUSTED_RESERVE",
                                           default_trusted_reserve(max_sessions))),
            client_count_limit=int(config.get("SMTPD_CLIENT_CONNECTION_COUNT_LIMIT",
                                              default_client_count_limit(max_sessions))),
            client_rate_limit=int(config["SMTPD_CLIENT_CONNECTION_RATE_LIMIT"]),
            stress_timeout=max(1, int(config["SMTPD_STRESS_IDLE_TIMEOUT"])),
            processes=resolve_processes(config.get("SMTPD_PROCESSES", 1)),
        )
        return replace(settings, **overrides)

    @property
    def limits(self) -> AdmissionLimits:
        return AdmissionLimits(
            max_sessions=self.max_sessions,
            trusted_reserve=min(self.trusted_reserve, self.max_sessions - 1),
            client_count_limit=self.client_count_limit,
            client_rate_limit=self.client_rate_limit,
        )

    @property
    def stress_idle_timeout(self) -> int:
        return min(self.stress_timeout, self.timeout)

    def tls_context(self) -> ssl.SSLContext | None:
        if not self.tls_cert and not self.tls_key:
            return None
        if not (self.tls_cert and self.tls_key):
            raise ListenerConfigError("STARTTLS needs both ELEMTA_TLS_CERT and ELEMTA_TLS_KEY")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(self.tls_cert, self.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ListenerConfigError(f"Cannot load the TLS certificate or key: {exc}") from None
        return context


class Listener:
    """One asyncio SMTP server and its sessions; start and stop inside a running loop.

    Alone, it binds the port and decides admissions itself. As one of several listener
    processes (``processes.py``) it is given the parent's listening ``sockets`` and asks the
    parent for every admission (``remote``), so the limits count the sessions of all of them.
    """

    def __init__(self, app: Flask, settings: ListenerSettings, *,
                 sockets: Sequence[socket.socket] = (),
                 remote: AdmissionClient | None = None, name: str = "") -> None:
        self.app = app
        self.settings = settings
        self.sessions: set[ElemtaSMTP] = set()
        self.closing = False
        self.storage: Storage | None = None
        self.acceptor: Acceptor | None = None
        self.remote = remote
        self.admission: Admission | AdmissionClient = (
            remote if remote is not None else Admission(settings.limits))
        self.name = name  # "process 2 of 2" when one of several
        self._sockets = tuple(sockets)
        self._accepting = False
        self.policy = RelayPolicy(tuple(settings.relay_networks))
        self._refusals = RefusalThrottle()
        self._server: asyncio.AbstractServer | None = None
        self._tls = settings.tls_context()  # fail at start, not at the first STARTTLS

    async def start(self) -> None:
        logging.getLogger("mail.log").setLevel(AIOSMTPD_LOG_LEVEL)
        loop = asyncio.get_running_loop()
        self.storage = Storage(self.app, DB_THREADS)
        self.acceptor = Acceptor(self.app, self.storage)
        self.acceptor.start()
        handler = QueueHandler(self.settings, self.storage, self.acceptor)
        size_limit = self.settings.max_message_bytes or None

        def new_session() -> ElemtaSMTP:
            return ElemtaSMTP(
                handler,
                listener=self,
                loop=loop,
                hostname=self.settings.hostname,
                ident="Elemta ESMTP",
                data_size_limit=size_limit,
                enable_SMTPUTF8=True,
                decode_data=False,
                tls_context=self._tls,
                timeout=self.settings.timeout,
                auth_require_tls=False,  # the handler allows AUTH over TLS or from loopback
                proxy_protocol_timeout=30 if self.settings.proxy_protocol else None,
            )

        if self._sockets:  # one of several processes: the parent bound the port
            self._new_session = new_session
            for sock in self._sockets:
                loop.add_reader(sock.fileno(), self._accept_one, sock)
            self._accepting = True
            log.info("SMTP listener %s (pid %d) on %s:%d", self.name, os.getpid(),
                     self.settings.host, self.settings.port)
            return
        try:
            self._server = await loop.create_server(new_session, self.settings.host,
                                                    self.settings.port, reuse_address=True)
        except OSError as exc:
            await self.acceptor.stop()
            self.storage.close()
            raise ListenerConfigError(
                f"Cannot listen on {self.settings.host}:{self.settings.port}: {exc.strerror}"
            ) from None
        limits = self.settings.limits
        log.info("SMTP listener on %s:%d (max %d sessions, %d kept for the relay networks; "
                 "per untrusted client %s at once, %s per minute; %s)", self.settings.host,
                 self.settings.port, limits.max_sessions, limits.trusted_reserve,
                 limits.client_count_limit or "any number",
                 limits.client_rate_limit or "any number",
                 "STARTTLS" if self._tls else "no TLS")

    def _accept_one(self, sock: socket.socket) -> None:
        """One connection per wake-up: the listener processes share the socket, and the one
        whose event loop comes round first takes the next connection, so a busy process takes
        fewer (asyncio's own server accepts up to 100 at a time). Standing back for a moment
        after each accept, by the sessions held, spread a burst better (8/8 instead of 10/6
        of 16) but cost ~1.5 ms of CPU a connection (timers, the reader removed and added
        again): not kept (docs/PERFORMANCE.md)."""
        loop = asyncio.get_running_loop()
        try:
            conn, _ = sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return  # another process took it
        except OSError as exc:  # out of file descriptors, ...: wait a second, as asyncio does
            log.error("SMTP listener cannot accept a connection: %s", exc)
            loop.remove_reader(sock.fileno())
            loop.call_later(1.0, self._resume_accepting, sock)
            return
        conn.setblocking(False)
        loop.create_task(self._connect(conn))

    def _resume_accepting(self, sock: socket.socket) -> None:
        if self._accepting:
            asyncio.get_running_loop().add_reader(sock.fileno(), self._accept_one, sock)

    async def _connect(self, conn: socket.socket) -> None:
        try:
            await asyncio.get_running_loop().connect_accepted_socket(self._new_session, conn)
        except Exception:  # the client went away before the transport was set up
            conn.close()

    # ------------------------------------------------------------------ admission

    async def admit(self, session: ElemtaSMTP) -> Ticket | Refusal:
        """A ticket for a new session, or the refusal to answer (already logged/recorded)."""
        ip = session.client_ip
        silenced: int | None
        if self.closing:
            refusal = Refusal("shutting-down", REPLY_SHUTTING_DOWN, str(ip))
            silenced = self._refusals.due(refusal)
        elif self.remote is not None:  # the parent counts for every listener process
            decision, silenced = await self.remote.admit(ip, self.policy.trusted(ip))
            if isinstance(decision, Ticket):
                return decision
            refusal = decision
        else:
            admission = self.admission
            assert isinstance(admission, Admission)
            was_stressed = admission.stressed
            decision = admission.admit(ip, self.policy.trusted(ip))
            if isinstance(decision, Ticket):
                if not was_stressed and admission.stressed:
                    self._enter_stress()
                return decision
            refusal = decision
            silenced = self._refusals.due(refusal)
        await self._report_refusal(refusal, ip, silenced)
        return refusal

    def leave(self, ticket: Ticket) -> None:
        self.admission.leave(ticket)

    def _enter_stress(self) -> None:
        """Near the cap, idle sessions outside a mail transaction get the short timeout:
        those connected before keep a long timer otherwise, so shorten theirs now."""
        log.warning("SMTP listener near its session limit (%d of %d): idle timeout before "
                    "MAIL FROM is now %d s", self.admission.sessions,
                    self.settings.max_sessions, self.settings.stress_idle_timeout)
        self.shorten_idle_timers()

    def shorten_idle_timers(self) -> None:
        seconds = self.settings.stress_idle_timeout
        for session in self.sessions:
            session.shorten_idle_timer(seconds)

    async def _report_refusal(self, refusal: Refusal, ip: object, silenced: int | None) -> None:
        """Log and record a refused connection (throttled: admission.RefusalThrottle, whose
        verdict is ``silenced``), then refuse it; as for refused commands, the event is
        written before the reply."""
        if silenced is None:
            return
        more = f" ({silenced} more refused since the last report)" if silenced else ""
        log.warning("Refused SMTP connection from %s: %s%s", ip or "unknown", refusal.reply,
                    more)
        if self.storage is None or refusal.reason == "shutting-down":
            return
        try:
            await self.storage.run(record_refusal, stage="CONNECT", reply=refusal.reply + more,
                                   client_ip=str(ip or "unknown"), helo="", sender=None,
                                   recipient=None)
        except Exception:  # the refusal stands even when it cannot be recorded
            log.exception("Could not record a refused SMTP connection (%s)", refusal.reply)

    async def stop(self, grace: float = SHUTDOWN_GRACE_SECONDS) -> None:
        """Stop accepting, let messages under way finish (up to ``grace``), close the rest."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        if self._accepting:
            self._accepting = False
            loop = asyncio.get_running_loop()
            for sock in self._sockets:
                loop.remove_reader(sock.fileno())
                sock.close()
        deadline = time.monotonic() + grace
        while any(s.in_data for s in self.sessions) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for session in list(self.sessions):
            session.goodbye()
        while self.sessions and time.monotonic() < deadline + 1:
            await asyncio.sleep(0.01)  # connection_lost callbacks
        if self._server is not None:
            await self._server.wait_closed()
        if self.acceptor is not None:
            await self.acceptor.stop()
        if self.storage is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.storage.close)
        log.info("SMTP listener stopped")


def freeze_start_up_heap() -> None:
    """Once the listener has started: the objects made so far (modules, the app, its mappers
    and caches, the pools) go to the garbage collector's permanent generation, so its full
    collections no longer walk them. Each full collection of the listener took ~50 ms of CPU,
    during which the event loop stood still; with the start-up heap frozen ~7 ms
    (docs/PERFORMANCE.md, "Intake, the new connection's costs"). Those objects live as long
    as the process anyway; a cycle among them is never collected, as before in practice."""
    gc.freeze()


def serve(app: Flask, settings: ListenerSettings,
          on_listening: Callable[[], None] | None = None) -> None:
    """Run in the foreground until SIGTERM or SIGINT; ``on_listening`` once the port is bound.
    This process alone: several processes are ``processes.serve_port``'s."""

    async def main() -> None:
        listener = Listener(app, settings)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await listener.start()
        freeze_start_up_heap()
        if on_listening:
            on_listening()
        await stop.wait()
        log.info("SMTP listener stopping")
        await listener.stop()

    # The event loop queues its log lines, a thread writes them (docs/OPERATIONS.md, Logs).
    with stdout_on_own_thread():
        asyncio.run(main())


class ListenerThread:
    """The listener on a background thread: ``with ListenerThread(app, settings): ...``."""

    def __init__(self, app: Flask, settings: ListenerSettings) -> None:
        self.app = app
        self.settings = settings
        self.listener: Listener | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="smtpd", daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported to start()
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.listener = Listener(self.app, self.settings)
        await self.listener.start()
        self._ready.set()
        await self._stop.wait()
        await self.listener.stop(grace=5.0)

    def start(self) -> ListenerThread:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join()

    def __enter__(self) -> ListenerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

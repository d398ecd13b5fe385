"""Several listener processes on one port (``ELEMTA_SMTPD_PROCESSES`` above 1; docs/SMTPD.md,
"Listener processes").

One Python process spends ~2.5 ms of CPU on a message with the GIL held: one core's worth of
intake. As Postfix's master does for its smtpd processes, a parent (``Supervisor``) binds the
port, then forks the listener processes, which all accept from that one listening socket;
each has its own event loop, storage threads and group commit, so a 250 still follows its own
commit. The parent keeps the connection limits: every listener process asks it before greeting
a client (``AdmissionClient``) and tells it when the session ends, and the parent's one
``Admission`` decides, so ``ELEMTA_SMTPD_MAX_SESSIONS``, the trusted reserve and the per-client
limits count the sessions of the whole port, exactly, as they do with one process. A listener
process that dies is replaced (and its sessions released); SIGTERM or SIGINT to the parent
stops them all, each finishing the messages under way.

The parent and each child talk over a ``SOCK_SEQPACKET`` socket pair, one ASCII line a packet:

- child to parent: ``R`` (serving), ``A <seq> <ip or -> <trusted 0/1>`` (admit),
  ``L <ticket>`` (the session ended);
- parent to child: ``T <seq> <ticket> <stressed 0/1>`` (admitted),
  ``X <seq> <silenced or -1> <reason> <client>\\t<reply>`` (refused; -1: the refusal throttle
  says stay quiet), ``S <0/1>`` (the port came under stress, or left it).

The parent's end of the pair reaching end of file tells a child its parent is gone: it stops
as on SIGTERM, and the port is free once the last one has finished.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from flask import Flask

from ..logging_setup import stdout_on_own_thread
from .admission import (
    REPLY_SHUTTING_DOWN,
    Admission,
    Refusal,
    RefusalThrottle,
    Ticket,
)
from .policy import IPAddress
from .server import (
    SHUTDOWN_GRACE_SECONDS,
    Listener,
    ListenerConfigError,
    ListenerSettings,
    freeze_start_up_heap,
    serve,
)

log = logging.getLogger("elemta.smtpd")

# The listening socket's queue, as asyncio's create_server sets it for one process.
BACKLOG = 100
# A listener process that dies sooner than this after its start is replaced after this long.
RESTART_DELAY_SECONDS = 1.0
# After the grace for messages under way, how long the parent waits before SIGKILL.
KILL_AFTER_GRACE_SECONDS = 5.0
PACKET = 1024


def _receive_now(control: socket.socket) -> bytes | None:
    """One packet from a control socket without waiting: ``None`` when none is there, ``b""``
    when the other side is gone (closed, or the socket failed)."""
    try:
        return control.recv(PACKET, socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""


def bind_sockets(host: str, port: int) -> list[socket.socket]:
    """The listening sockets for ``host:port``, bound as asyncio's ``create_server`` binds them
    for one process (every address the name resolves to, SO_REUSEADDR, IPv6 only on IPv6)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenerConfigError(f"Cannot listen on {host}:{port}: {exc.strerror}") from None
    sockets: list[socket.socket] = []
    seen: set[tuple[Any, ...]] = set()
    try:
        for family, kind, proto, _, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise ListenerConfigError(f"Cannot listen on {host}:{port}: {exc.strerror}") from None
    return sockets


# ---------------------------------------------------------------------------- the child side


class AdmissionClient:
    """A listener process's admissions, decided by the parent (stands in for ``Admission``)."""

    def __init__(self, control: socket.socket, loop: asyncio.AbstractEventLoop,
                 on_parent_gone: Callable[[], None]) -> None:
        self.control = control
        self.loop = loop
        self.on_parent_gone = on_parent_gone
        self.on_stress: Callable[[], None] = lambda: None
        self.stressed = False  # as the parent said last
        self.sessions = 0  # not known here: the parent logs the stress warning
        self.parent_gone = False
        self._seq = 0
        self._pending: dict[int, asyncio.Future[tuple[Ticket | Refusal, int | None]]] = {}
        loop.add_reader(control.fileno(), self._readable)

    async def admit(self, ip: IPAddress | None,
                    trusted: bool) -> tuple[Ticket | Refusal, int | None]:
        """The parent's decision, and the refusal throttle's verdict (None: stay quiet)."""
        if self.parent_gone:
            return Refusal("shutting-down", REPLY_SHUTTING_DOWN, str(ip)), None
        self._seq += 1
        seq = self._seq
        future = self.loop.create_future()
        self._pending[seq] = future
        self._send(f"A {seq} {ip if ip is not None else '-'} {int(trusted)}")
        return await future

    def leave(self, ticket: Ticket) -> None:
        if ticket.left:
            return
        ticket.left = True
        if not self.parent_gone:
            self._send(f"L {ticket.number}")

    def ready(self) -> None:
        self._send("R")

    def close(self) -> None:
        self.loop.remove_reader(self.control.fileno())
        self.control.close()

    def _send(self, text: str) -> None:
        try:
            self.control.send(text.encode())  # blocking: the parent reads all the time
        except OSError:
            self._gone()

    def _readable(self) -> None:
        while True:
            data = _receive_now(self.control)
            if data is None:
                return
            if not data:
                self._gone()
                return
            self._handle(data.decode())

    def _handle(self, text: str) -> None:
        kind = text[0]
        if kind == "S":
            self._set_stressed(text[2] == "1")
            return
        if kind == "T":
            _, seq, number, stressed = text.split(" ")
            self._set_stressed(stressed == "1")
            decision: Ticket | Refusal = Ticket("", trusted=False, number=int(number))
            silenced: int | None = None
        else:  # X
            head, reply = text.split("\t", 1)
            _, seq, quiet, reason, client = head.split(" ")
            decision = Refusal(reason, reply, client)
            silenced = None if quiet == "-1" else int(quiet)
        future = self._pending.pop(int(seq), None)
        if future is not None and not future.done():
            future.set_result((decision, silenced))

    def _set_stressed(self, stressed: bool) -> None:
        was, self.stressed = self.stressed, stressed
        if stressed and not was:
            self.on_stress()

    def _gone(self) -> None:
        if self.parent_gone:
            return
        self.parent_gone = True
        try:
            self.loop.remove_reader(self.control.fileno())
        except (OSError, ValueError):
            pass
        for future in self._pending.values():
            if not future.done():
                future.set_result((Refusal("shutting-down", REPLY_SHUTTING_DOWN, ""), None))
        self._pending.clear()
        self.on_parent_gone()


def _run_child(app: Flask, settings: ListenerSettings, sockets: Sequence[socket.socket],
               control: socket.socket, name: str) -> None:
    """A listener process, forked by the parent: serve until SIGTERM or the parent's end."""
    from ..extensions import db

    with app.app_context():  # the parent's pool, if it holds any connection, is not ours
        db.engine.dispose(close=False)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        client = AdmissionClient(control, loop, on_parent_gone=stop.set)
        listener = Listener(app, settings, sockets=sockets, remote=client, name=name)
        client.on_stress = listener.shorten_idle_timers
        await listener.start()
        freeze_start_up_heap()
        client.ready()
        await stop.wait()
        log.info("SMTP listener %s stopping", name)
        await listener.stop()
        client.close()

    # As with one process (server.serve). Here, in each listener process, not in the parent,
    # which forks: a writer thread of the parent could hold stdout's lock at the fork.
    with stdout_on_own_thread():
        asyncio.run(main())


# --------------------------------------------------------------------------- the parent side


@dataclass(eq=False)
class _Child:
    index: int
    pid: int
    control: socket.socket
    started: float
    ready: bool = False
    tickets: dict[int, Ticket] = field(default_factory=dict)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            return f"was killed by signal {number} ({signal.Signals(number).name})"
        except ValueError:
            return f"was killed by signal {number}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


class Supervisor:
    """The parent of the listener processes: binds the port, forks them, admits for them,
    replaces the ones that die, stops them on SIGTERM/SIGINT."""

    def __init__(self, app: Flask, settings: ListenerSettings,
                 on_listening: Callable[[], None] | None = None) -> None:
        self.app = app
        self.settings = settings
        self.on_listening = on_listening
        self.processes = settings.processes
        self.admission = Admission(settings.limits)
        self.refusals = RefusalThrottle()
        self.children: dict[int, _Child] = {}  # by pid
        self.restart_at: dict[int, float] = {}  # slot -> monotonic time
        self.stopping = False
        self.announced = False
        self._signalled = False
        self._exited = False  # SIGCHLD, or a child's socket at its end: reap
        self._next_ticket = 0
        self._sockets: list[socket.socket] = []
        self._selector: selectors.BaseSelector | None = None
        self._wake: tuple[socket.socket, socket.socket] | None = None
        self._kill_at = 0.0

    # ------------------------------------------------------------------ the run

    def run(self) -> None:
        # Refused here, once, before any process starts: a certificate that does not load,
        # a port in use.
        self.settings.tls_context()
        self._sockets = bind_sockets(self.settings.host, self.settings.port)
        selector = self._selector = selectors.DefaultSelector()
        wake_r, wake_w = self._wake = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        selector.register(wake_r, selectors.EVENT_READ, None)
        previous = {signum: signal.signal(signum, self._on_signal)
                    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)}
        old_wakeup = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        try:
            for slot in range(self.processes):
                self._spawn(slot)
            self._loop()
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self._kill_all(signal.SIGKILL)  # only after an error: children are gone otherwise
            for sock in self._sockets:
                sock.close()
            selector.close()
            wake_r.close()
            wake_w.close()
        log.info("SMTP listener stopped")

    def _on_signal(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGCHLD:
            self._exited = True
        else:
            self._signalled = True

    def _loop(self) -> None:
        assert self._selector is not None
        while True:
            now = time.monotonic()
            waits = [at - now for at in self.restart_at.values()]
            if self.stopping:
                waits.append(self._kill_at - now)
            timeout = max(0.0, min(waits)) if waits else None
            for key, _ in self._selector.select(timeout):
                if key.data is None:
                    self._drain_wake()
                else:
                    self._readable(key.data)
            if self._exited:
                self._exited = False
                self._reap()
            if self._signalled and not self.stopping:
                self._begin_stop()
            if self.stopping:
                if not self.children:
                    return
                if time.monotonic() >= self._kill_at:
                    log.error("SMTP listener processes still running %.0f s after the stop: "
                              "killing them", SHUTDOWN_GRACE_SECONDS + KILL_AFTER_GRACE_SECONDS)
                    self._kill_all(signal.SIGKILL)
                    self._kill_at = time.monotonic() + 3600
                continue
            now = time.monotonic()
            for slot, at in list(self.restart_at.items()):
                if at <= now:
                    del self.restart_at[slot]
                    self._spawn(slot)
            if not self.announced and len(self.children) == self.processes and all(
                    child.ready for child in self.children.values()):
                self._announce()

    def _announce(self) -> None:
        self.announced = True
        limits = self.settings.limits
        log.info("SMTP listener on %s:%d, %d processes (max %d sessions in all, %d kept for the "
                 "relay networks; per untrusted client %s at once, %s per minute; %s)",
                 self.settings.host, self.settings.port, self.processes, limits.max_sessions,
                 limits.trusted_reserve, limits.client_count_limit or "any number",
                 limits.client_rate_limit or "any number",
                 "STARTTLS" if self.settings.tls_cert else "no TLS")
        if self.on_listening:
            self.on_listening()

    def _drain_wake(self) -> None:
        assert self._wake is not None
        try:
            while self._wake[0].recv(512):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    # ------------------------------------------------------------------ processes

    def _spawn(self, slot: int) -> None:
        assert self._selector is not None and self._wake is not None
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        name = f"process {slot + 1} of {self.processes}"
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns into the parent's code
            code = 1
            try:
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent stops us
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                parent_end.close()
                for child in self.children.values():
                    child.control.close()
                selector_fd = getattr(self._selector, "fileno", None)  # epoll, poll: none
                if selector_fd is not None:
                    os.close(selector_fd())
                self._wake[0].close()
                self._wake[1].close()
                _run_child(self.app, self.settings, self._sockets, child_end, name)
                code = 0
            except BaseException:
                log.exception("SMTP listener %s failed", name)
            finally:
                _exit(code)
        child_end.close()
        parent_end.setblocking(True)
        child = _Child(slot, pid, parent_end, time.monotonic())
        self.children[pid] = child
        self._selector.register(parent_end, selectors.EVENT_READ, child)

    def _reap(self) -> None:
        for pid, child in list(self.children.items()):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done == 0:
                continue
            released = len(child.tickets)
            self._forget(child)
            del self.children[pid]
            if self.stopping or self._signalled:  # systemd signals the whole group at once
                continue
            name = f"process {child.index + 1} of {self.processes}"
            if not self.announced and not child.ready:
                self._begin_stop()
                raise ListenerConfigError(f"SMTP listener {name} {_describe(status)} at start")
            lived = time.monotonic() - child.started
            delay = 0.0 if lived >= RESTART_DELAY_SECONDS else RESTART_DELAY_SECONDS
            log.error("SMTP listener %s (pid %d) %s; %d of its sessions released; starting "
                      "another%s", name, pid, _describe(status), released,
                      f" in {delay:.0f} s" if delay else "")
            self.restart_at[child.index] = time.monotonic() + delay

    def _forget(self, child: _Child) -> None:
        """Its sessions end with it; its socket is closed."""
        for ticket in child.tickets.values():
            self._leave(ticket)
        child.tickets.clear()
        assert self._selector is not None
        try:
            self._selector.unregister(child.control)
        except (KeyError, ValueError):
            pass
        child.control.close()

    def _begin_stop(self) -> None:
        self.stopping = True
        self._kill_at = time.monotonic() + SHUTDOWN_GRACE_SECONDS + KILL_AFTER_GRACE_SECONDS
        log.info("SMTP listener stopping (%d processes)", len(self.children))
        for sock in self._sockets:  # the children close theirs as they stop
            sock.close()
        self._kill_all(signal.SIGTERM)

    def _kill_all(self, signum: int) -> None:
        for pid in self.children:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
        if signum == signal.SIGKILL:
            for pid in list(self.children):
                try:
                    os.waitpid(pid, 0)
                except ChildProcessError:
                    pass
                self._forget(self.children.pop(pid))

    # ------------------------------------------------------------------ admissions

    def _readable(self, child: _Child) -> None:
        while True:
            data = _receive_now(child.control)
            if data is None:
                return
            if not data:  # it died: _reap tells how, once it is reaped
                self._exited = True
                assert self._selector is not None
                try:
                    self._selector.unregister(child.control)
                except (KeyError, ValueError):
                    pass
                return
            text = data.decode()
            kind = text[0]
            if kind == "A":
                self._admit(child, text)
            elif kind == "L":
                ticket = child.tickets.pop(int(text[2:]), None)
                if ticket is not None:
                    self._leave(ticket)
            elif kind == "R":
                child.ready = True

    def _admit(self, child: _Child, text: str) -> None:
        _, seq, address, trusted = text.split(" ")
        ip = None if address == "-" else ipaddress.ip_address(address)
        admission = self.admission
        was_stressed = admission.stressed
        decision = admission.admit(ip, trusted == "1")
        if isinstance(decision, Ticket):
            self._next_ticket += 1
            decision.number = self._next_ticket
            child.tickets[decision.number] = decision
            stressed = admission.stressed
            self._send(child, f"T {seq} {decision.number} {int(stressed)}")
            if stressed and not was_stressed:
                log.warning("SMTP listener near its session limit (%d of %d): idle timeout "
                            "before MAIL FROM is now %d s", admission.sessions,
                            self.settings.max_sessions, self.settings.stress_idle_timeout)
                self._broadcast("S 1", but=child)
            return
        silenced = self.refusals.due(decision)
        self._send(child, f"X {seq} {-1 if silenced is None else silenced} {decision.reason} "
                          f"{decision.client}\t{decision.reply}")

    def _leave(self, ticket: Ticket) -> None:
        was_stressed = self.admission.stressed
        self.admission.leave(ticket)
        if was_stressed and not self.admission.stressed:
            self._broadcast("S 0")

    def _broadcast(self, text: str, but: _Child | None = None) -> None:
        for child in list(self.children.values()):
            if child is not but:
                self._send(child, text)

    def _send(self, child: _Child, text: str) -> None:
        try:
            child.control.send(text.encode())
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.EBADF):
                log.error("SMTP listener process %d: cannot answer it (%s)", child.index + 1,
                          exc)
            # it is dying: _reap replaces it


def _exit(code: int) -> None:
    """Leave a forked listener process without running the parent's exit handlers, after
    writing this process's log records."""
    try:
        from ..logs.handler import shutdown_database_logging

        shutdown_database_logging()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def serve_port(app: Flask, settings: ListenerSettings,
               on_listening: Callable[[], None] | None = None) -> None:
    """The listener on its port until SIGTERM or SIGINT: this process alone (``server.serve``),
    or with ``ELEMTA_SMTPD_PROCESSES`` above 1 a ``Supervisor`` and its listener processes
    (``on_listening`` once every one of them is serving). The choice is made here, not in
    server.py, which this module builds on."""
    if settings.processes > 1:
        Supervisor(app, settings, on_listening).run()
    else:
        serve(app, settings, on_listening)

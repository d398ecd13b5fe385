"""Faults for the delivery tests and the acceptance run: a database behind a cuttable proxy,
an SQLite database locked by another writer."""

from __future__ import annotations

import contextlib
import socket
import sqlite3
import threading
from collections.abc import Iterator

import sqlalchemy as sa


class TcpProxy:
    """A loopback TCP proxy (127.0.0.1:<port> -> target) that can be cut and restored.

    ``cut()`` closes every connection through it and refuses new ones (what a database restart
    or a network failure looks like to a client: connections lost, then connection refused);
    ``restore()`` accepts again. Nothing is mocked: the client talks to the real server.
    """

    def __init__(self, target_host: str, target_port: int, port: int = 0) -> None:
        self.target = (target_host, target_port)
        self.port = port
        self.cuts = 0
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def url_for(self, database_url: str) -> str:
        """``database_url`` (PostgreSQL) pointed at the proxy."""
        return sa.make_url(database_url).set(host="127.0.0.1", port=self.port).render_as_string(
            hide_password=False)

    def __enter__(self) -> TcpProxy:
        self.restore()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cut()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        self.port = listener.getsockname()[1]
        listener.listen(64)
        self._listener = listener
        self._thread = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        self._thread.start()

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            pairs, self._pairs = self._pairs, []
            self.cuts += 1
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for pair in pairs:
            for sock in pair:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
        if self._thread is not None:
            self._thread.join(5)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                server = socket.create_connection(self.target, timeout=5)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    server.close()
                    return
                self._pairs.append((client, server))
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=_pipe, args=(src, dst), daemon=True).start()


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class SqliteLock:
    """Another writer holding SQLite's write lock (BEGIN EXCLUSIVE) until ``release()``."""

    def __init__(self, database_url: str) -> None:
        path = sa.make_url(database_url).database
        assert path, "a file database"
        self._connection = sqlite3.connect(path, timeout=30, isolation_level=None,
                                           check_same_thread=False)

    def take(self) -> SqliteLock:
        self._connection.execute("BEGIN EXCLUSIVE")
        return self

    def release(self) -> None:
        self._connection.execute("COMMIT")
        self._connection.close()


@contextlib.contextmanager
def sqlite_locked(database_url: str) -> Iterator[SqliteLock]:
    lock = SqliteLock(database_url).take()
    try:
        yield lock
    finally:
        lock.release()

"""gunicorn's gthread worker, answering gunicorn's own errors in the contract's JSON shape.

Some requests never reach the application: a request line over ``limit_request_line``
(414), a NUL or other garbage in it (400), too many or too large header fields (431), an
unsupported transfer coding (501). gunicorn answers those itself, with an HTML page. Every
error of this API has the JSON shape (``app/errors.py``), whatever produced it, so this worker
keeps gunicorn's decisions (status, logging, access log) and replaces only the page.

gunicorn writes the page with one ``sendall`` of the complete response; the socket handed to
its ``handle_error`` is wrapped to write the JSON response instead. Set in gunicorn.conf.py
(``worker_class``); tests/test_gunicorn_edges.py drives it through a real gunicorn.

It also closes the connections of WebSocket streams itself (``release_websocket``). gunicorn
closes a finished connection on the worker's main loop, "gracefully": it half-closes and then
waits up to 2 s for the client's end of the connection. For a stream that ended because its
client stopped reading or vanished, nothing ever comes, so each such close held the loop for
2 s, during which the worker accepted and dispatched nothing: ten streams cut off at once kept
every new client of that worker waiting 20 s (tests/test_stream_gunicorn.py). A stream has
already finished its WebSocket closing handshake on its own thread (app/stream/sockets.py), so
the socket only needs closing. (The stream's reader thread may also have closed it already, and
gunicorn's graceful close then failed on the closed socket and counted the connection as
finished twice.)
"""

from __future__ import annotations

import json
import socket
import threading
from typing import Any

from gunicorn import util
from gunicorn.workers.gthread import ThreadWorker

from .errors import CODE_BY_STATUS, MESSAGE_BY_STATUS


def json_error_response(status: int, reason: str) -> bytes:
    """A complete HTTP/1.1 error response with the contract's body; the connection closes.

    The message is generic: gunicorn's own repeats the offending request line or header,
    which the contract does not echo back.
    """
    body = json.dumps({"error": MESSAGE_BY_STATUS.get(status, reason),
                       "code": CODE_BY_STATUS.get(status, "HTTP_ERROR"),
                       "details": None}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\n"
            "Connection: close\r\n"
            "Content-Type: application/json\r\n"
            "Cache-Control: no-store\r\n"
            "X-Content-Type-Options: nosniff\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode("latin-1") + body


class _JsonErrorSocket:
    """The client socket as gunicorn's error writer sees it: its HTML page becomes JSON."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def sendall(self, data: bytes) -> None:
        status_line = data.split(b"\r\n", 1)[0].decode("latin-1")
        _, status, reason = (status_line.split(" ", 2) + ["", ""])[:3]
        if status.isdigit():
            data = json_error_response(int(status), reason or "Error")
        self._sock.sendall(data)

    def __getattr__(self, name: str) -> Any:  # gettimeout, setblocking, ...
        return getattr(self._sock, name)


_websockets: set[int] = set()  # id() of the sockets of finished WebSocket streams
_websockets_lock = threading.Lock()


def release_websocket(sock: socket.socket) -> None:
    """A stream on ``sock`` (gunicorn's connection socket) is finished: close it at once.

    Called by the stream's own thread before its request returns to gunicorn.
    """
    with _websockets_lock:
        _websockets.add(id(sock))


def _is_released(sock: socket.socket) -> bool:
    with _websockets_lock:
        if id(sock) in _websockets:
            _websockets.discard(id(sock))
            return True
        return False


class JsonErrorThreadWorker(ThreadWorker):
    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        super().handle_error(req, _JsonErrorSocket(client), addr, exc)

    def finish_request(self, conn: Any, fs: Any) -> None:
        # Runs on the worker's main loop: a WebSocket's connection is closed without waiting
        # for its client (see the module's docstring).
        if _is_released(conn.sock):
            self.nr_conns -= 1
            util.close(conn.sock)
            return
        super().finish_request(conn, fs)

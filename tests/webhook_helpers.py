"""A real HTTP receiver on loopback for the webhook tests (http.server in a thread)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int  # what the receiver answered

    @property
    def event(self) -> dict[str, Any]:
        return json.loads(self.body)


@dataclass
class Receiver:
    """Records every request; ``answer(request_number, body) -> status`` decides the reply
    (200 by default). ``wait_for(n)`` blocks until n requests were answered."""

    answer: Callable[[int, bytes], int] = lambda _n, _body: 200
    requests: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver._lock:
                    status = receiver.answer(len(receiver.requests) + 1, body)
                    receiver.requests.append(Request(self.path, dict(self.headers.items()),
                                                     body, status))
                    receiver._lock.notify_all()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                reply = b"ok" if status < 300 else b"not now"
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def accepted(self) -> list[Request]:
        return [r for r in self.requests if 200 <= r.status < 300]

    def wait_for(self, count: int, timeout: float = 30.0) -> bool:
        with self._lock:
            return self._lock.wait_for(lambda: len(self.requests) >= count, timeout)


def fail_first(count: int, status: int = 500) -> Callable[[int, bytes], int]:
    return lambda n, _body: status if n <= count else 200

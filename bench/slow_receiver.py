"""A slow webhook receiver for the webhook cost benchmark: ``python -m bench.slow_receiver
PORT SECONDS``. Answers every POST with 200 after SECONDS; prints the request count on stdout
when it receives SIGTERM. Its own process: it never shares a GIL with the worker measured."""

from __future__ import annotations

import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    port, delay = int(sys.argv[1]), float(sys.argv[2])
    count = [0]
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            time.sleep(delay)
            with lock:
                count[0] += 1
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print("ready", flush=True)
    server.serve_forever()
    print(count[0], flush=True)


if __name__ == "__main__":
    main()

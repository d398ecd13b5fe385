"""A counting SMTP sink for the delivery benchmark: ``python -m bench.sink PORT``.

Accepts everything, counts messages, recipients and the connections that carried them, and
prints ``cpu_seconds connections messages recipients`` on stdout when it receives SIGTERM.
Runs in its own process so it never shares a GIL with the worker.
"""

from __future__ import annotations

import resource
import signal
import sys
import threading

from aiosmtpd.controller import Controller


class CountingHandler:
    def __init__(self) -> None:
        self.messages = 0
        self.recipients = 0
        self.sessions: set[int] = set()  # connections that carried mail

    async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
        self.messages += 1
        self.recipients += len(envelope.rcpt_tos)
        self.sessions.add(id(session))
        return "250 2.0.0 Ok: queued"


def main() -> int:
    handler = CountingHandler()
    controller = Controller(handler, hostname="127.0.0.1", port=int(sys.argv[1]))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    controller.start()
    print("ready", flush=True)
    stop.wait()
    controller.stop()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(f"{usage.ru_utime + usage.ru_stime:.2f} {len(handler.sessions)} {handler.messages} "
          f"{handler.recipients}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

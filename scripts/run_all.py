"""Start every Elemta process for local use; Ctrl-C (or SIGTERM) stops all of them.

API (gunicorn, gthread workers), the delivery worker, the SMTP listener and the webhook
dispatcher (docs/WEBHOOKS.md), each a child process sharing this terminal. When one dies the
others are stopped too, so a broken start is visible at once instead of leaving half a service
running.

Before anything starts, the API and SMTP addresses must be free: a second ``make run`` (or any
other program on the port) is reported in one line naming the setting to change, instead of
half a service and a traceback.

``make run`` execs this script, so make is its parent. make passes SIGTERM on to its children
but not SIGINT, SIGHUP or SIGQUIT (it expects the terminal to have sent those to the whole
process group); signalled alone, it resets the signal to its default and waits for us. So the
parent is watched: when it stops catching one of those signals, or exits, we stop too.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

BIN = os.path.dirname(sys.executable)
# What each part listens on: (part, setting, default), as gunicorn.conf.py and app/config.py.
ADDRESSES = (("api", "ELEMTA_API_LISTEN", "127.0.0.1:8025"),
             ("smtpd", "ELEMTA_SMTP_LISTEN", "127.0.0.1:2525"))
PARENT_SIGNALS = (signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)


def busy_address(parts: list[str]) -> str | None:
    """The first address a part would listen on that is taken, as a one-line message."""
    for part, setting, default in ADDRESSES:
        if part not in parts:
            continue
        address = os.environ.get(setting) or default
        host, _, port = address.rpartition(":")
        host = host.strip("[]") or "0.0.0.0"
        try:
            infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except (OSError, ValueError):
            continue  # a bad value: the part itself refuses it with the setting's message
        family, _, _, _, sockaddr = infos[0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            # As the servers bind (reuse_address): a port in TIME_WAIT is not busy.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    continue
                return (f"run_all: {address} ({part}) is already in use, by another "
                        f"`make run` or another program; stop it, or set {setting} to a free "
                        f"host:port")
    return None


def caught_signals(pid: int) -> int | None:
    """The signals process ``pid`` has handlers for (Linux /proc), None when unknown."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("SigCgt:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return None


class ParentWatch:
    """Notices that our parent (make) was told to stop although the signal did not reach us."""

    def __init__(self) -> None:
        self.parent = os.getppid()
        self.caught = caught_signals(self.parent) or 0
        self.watched = sum(1 << (int(sig) - 1) for sig in PARENT_SIGNALS) & self.caught

    def stopped(self) -> str | None:
        if os.getppid() != self.parent:
            return "the parent process exited"
        if self.watched:
            now = caught_signals(self.parent)
            if now is not None and self.watched & ~now:
                return "the parent process was signalled"
        return None


def commands() -> dict[str, list[str]]:
    flask = os.path.join(BIN, "flask")
    procs = {"api": [os.path.join(BIN, "gunicorn"), "-c", "gunicorn.conf.py", "wsgi:app"]}
    # Each part joins once its command exists (`flask worker --help` answers).
    for name, args in (("worker", ["worker"]), ("smtpd", ["smtpd"]),
                       ("webhooks", ["webhook", "dispatch"])):
        probe = subprocess.run([flask, *args, "--help"], capture_output=True)
        if probe.returncode == 0:
            procs[name] = [flask, *args]
    return procs


def main() -> int:
    children: dict[str, subprocess.Popen[bytes]] = {}
    stopping = False

    def stop(_signum: int = 0, _frame: object = None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    # One prometheus multiprocess directory for the API workers *and* the delivery worker, as
    # deploy/ sets up on a host: /metrics then reports the worker's delivery latencies too.
    planned = commands()
    busy = busy_address(list(planned))
    if busy:
        print(busy, file=sys.stderr, flush=True)
        return 1
    parent = ParentWatch()
    metrics_dir = None
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        metrics_dir = tempfile.mkdtemp(prefix="elemta-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    for name, argv in planned.items():
        print(f"run_all: starting {name}: {' '.join(argv)}", file=sys.stderr, flush=True)
        # Own process group: the terminal's Ctrl-C reaches us once, we pass it on in order.
        children[name] = subprocess.Popen(argv, start_new_session=True)
    exit_code = 0
    while not stopping:
        reason = parent.stopped()
        if reason:
            print(f"run_all: {reason}; stopping", file=sys.stderr, flush=True)
            stopping = True
        for name, child in children.items():
            if child.poll() is not None:
                print(f"run_all: {name} exited with {child.returncode}; stopping the rest",
                      file=sys.stderr, flush=True)
                exit_code = child.returncode or 1
                stopping = True
        time.sleep(0.2)
    for child in children.values():
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 35
    for child in children.values():
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
    if metrics_dir:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    print("run_all: stopped", file=sys.stderr, flush=True)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())

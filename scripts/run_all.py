"""Start every Elemta process for local use; Ctrl-C (or SIGTERM) stops all of them.

API (gunicorn, gthread workers), the delivery worker and the SMTP listener, each a child
process sharing this terminal. When one dies the others are stopped too, so a broken start is
visible at once instead of leaving half a service running.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

BIN = os.path.dirname(sys.executable)


def commands() -> dict[str, list[str]]:
    flask = os.path.join(BIN, "flask")
    procs = {"api": [os.path.join(BIN, "gunicorn"), "-c", "gunicorn.conf.py", "wsgi:app"]}
    # Each part joins once its command exists (`flask worker --help` answers).
    for name, args in (("worker", ["worker"]), ("smtpd", ["smtpd"])):
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
    metrics_dir = None
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        metrics_dir = tempfile.mkdtemp(prefix="elemta-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    for name, argv in commands().items():
        print(f"run_all: starting {name}: {' '.join(argv)}", file=sys.stderr, flush=True)
        # Own process group: the terminal's Ctrl-C reaches us once, we pass it on in order.
        children[name] = subprocess.Popen(argv, start_new_session=True)
    exit_code = 0
    while not stopping:
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

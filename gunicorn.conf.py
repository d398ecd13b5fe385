"""gunicorn settings for the Elemta API (``gunicorn -c gunicorn.conf.py wsgi:app``).

gthread workers: flask-sock holds one thread per WebSocket, so each worker needs threads for
its sockets plus its ordinary requests. Sizing is explained in docs/OPERATIONS.md.

Metrics: prometheus_client's multiprocess mode needs ``PROMETHEUS_MULTIPROC_DIR`` set before any
worker imports it. Without one given, each master start gets a fresh temporary directory (removed
at exit). With one given (to share it with a delivery worker on this host), files left by
processes that no longer exist are removed at start, so a restart starts from zero.

Streams: ``post_worker_init`` makes a worker's SIGTERM close its WebSocket streams with 1001
first (docs/STREAMS.md).
"""

import glob
import os
import shutil
import sys
import tempfile
import time


def _count(name, default):
    # app/config.py checks the app's settings, but this file is read before the app exists:
    # a typo here must be one line too, not gunicorn's "Failed to read config file" traceback.
    value = os.environ.get(name, default)
    if not value.strip().isdigit() or int(value) < 1:
        sys.exit(f"Error: {name}: {value!r} must be a whole number of at least 1")
    return int(value)


bind = os.environ.get("ELEMTA_API_LISTEN", "127.0.0.1:8025")
workers = _count("WEB_CONCURRENCY", "2")
# gthread, with gunicorn's own error pages (414, 400 for a malformed request line, 431) in the
# contract's JSON shape instead of HTML (app/gunicorn_worker.py).
worker_class = "app.gunicorn_worker.JsonErrorThreadWorker"
threads = _count("ELEMTA_API_THREADS", "32")
timeout = 60
graceful_timeout = 30
keepalive = 5
accesslog = os.environ.get("ELEMTA_ACCESS_LOG", "-")
errorlog = "-"
# gunicorn's control socket has one default path per user: several masters on one host (tests,
# e2e, blue/green) would fight over it, and nothing here uses it.
control_socket_disable = True
# The largest request line gunicorn can bound (its default is 4094): every URL the API accepts
# fits (all listing filters at their longest, percent-encoded), and nginx's default header
# buffers (8k) end at the same size. Longer lines get a JSON 414. Header fields likewise.
limit_request_line = 8190
limit_request_field_size = 8190
# Forwarding headers are werkzeug ProxyFix's business alone, and only with
# ELEMTA_TRUSTED_PROXIES > 0 (app/ratelimit.py). gunicorn's default would honour
# X-Forwarded-Proto from any loopback client, whatever the setting says.
forwarded_allow_ips = ""
# One JSON line per record, gunicorn's own and the access log included (app/logging_setup.py).
# The loggers have no handler of their own: records reach the root's JSON handler once.
os.environ.setdefault("ELEMTA_PROCESS_ROLE", "api")
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "root": {"level": "INFO", "handlers": ["json"]},
    "loggers": {
        "gunicorn.error": {"level": "INFO", "handlers": [], "propagate": True},
        "gunicorn.access": {"level": "INFO", "handlers": [], "propagate": True},
    },
    "handlers": {"json": {"()": "app.logging_setup.StdoutJsonHandler"}},
    "formatters": {},
}

_MULTIPROC = "PROMETHEUS_MULTIPROC_DIR"
_OWNER = "ELEMTA_METRICS_DIR_OWNER"  # the master that created the temporary directory


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _prepare_metrics_dir() -> None:
    if os.environ.get(_OWNER) == str(os.getpid()):
        return  # this master re-reads its configuration (SIGHUP): keep the live files
    path = os.environ.get(_MULTIPROC)
    if path:
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as exc:
            print(f"gunicorn.conf.py: {_MULTIPROC}={path} unusable ({exc}); "
                  "using a temporary directory", file=sys.stderr)
            path = None
    if not path:
        os.environ[_MULTIPROC] = tempfile.mkdtemp(prefix="elemta-metrics-")
        os.environ[_OWNER] = str(os.getpid())
        return
    for name in glob.glob(os.path.join(path, "*.db")):
        pid = os.path.basename(name)[:-3].rpartition("_")[2]
        if not pid.isdigit() or not _pid_alive(int(pid)):
            os.remove(name)


_prepare_metrics_dir()


def on_starting(server):
    # The service's start, reported as uptime by every API worker (app/health/service.py).
    os.environ["ELEMTA_STARTED_AT"] = str(time.time())
    _refuse_a_bad_setting(server)


def _refuse_a_bad_setting(server):
    """Check the settings once, in the master, before any worker is forked.

    Each worker would find the same typo and exit with gunicorn's "App failed to load" (4), and
    the master halts on that, but when two workers exit at once its arbiter raises the halt
    again while halting and exits 1 with a traceback (seen in CI with the default two workers).
    wsgi.py's own refusal stays for a setting changed before a reload (SIGHUP).
    """
    from flask import Flask

    from app.config import ConfigError, load_config

    try:
        load_config(Flask("app", instance_relative_config=True), None)
    except ConfigError as exc:
        server.log.error("configuration refused: %s", exc)
        print(f"Error: {exc}", file=sys.stderr)
        on_exit(server)  # not called by gunicorn when its start is refused: the metrics dir
        sys.exit(4)  # gunicorn's own status for an application that cannot load


def post_worker_init(worker):
    # A WebSocket never ends by itself: without this, SIGTERM (stop, and SIGHUP's replacement of
    # old workers) would leave every stream open until graceful_timeout and then drop it without
    # a close frame. The handler closes streams with 1001 and then calls gunicorn's own.
    from app.stream.hub import close_streams_on_sigterm

    close_streams_on_sigterm()


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    if os.environ.get(_OWNER) == str(os.getpid()):
        shutil.rmtree(os.environ[_MULTIPROC], ignore_errors=True)

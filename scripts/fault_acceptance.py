"""Delivery under faults, measured (issue 18's acceptance; figures in docs/DELIVERY.md).

    .venv/bin/python scripts/fault_acceptance.py [--backend sqlite|postgresql|both]
        [--messages 5000] [--kills 3] [--outage 20] [--concurrency 8] [--port 32600]

Per backend, on a fresh database (SQLite: a temporary file; PostgreSQL: a database created on
``--pg-server`` and dropped afterwards; the server itself is never stopped):

1. **kill -9**: ``--messages`` one-recipient messages queued; a ``flask worker`` process
   delivers them to a loopback SMTP sink that counts every recipient it accepts, and is killed
   with SIGKILL at a random moment, ``--kills`` times (each time a new worker is started once
   the dead one's leases expired); a last worker finishes the queue. Right after each kill the
   recipients the sink accepted but the database does not record as delivered are counted: the
   kill's *at-risk* recipients, which the next worker sends again.
2. **outage**: ``--messages`` more messages; a worker (in this process) delivers them while
   the database goes away for ``--outage`` seconds at a random moment: PostgreSQL behind a
   loopback TCP proxy that is cut (every connection dropped, new ones refused) and restored;
   SQLite locked by another writer (``BEGIN EXCLUSIVE``) while the worker's busy timeout is 1 s.

Prints one line per measurement and a JSON summary; exits 1 if a message was lost, a kill
caused more duplicates than the worker's delivery threads (four times the concurrency, the
default of ``ELEMTA_WORKER_THREADS``), or the outage caused any.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import sqlalchemy as sa  # noqa: E402

from app import create_app  # noqa: E402
from app.config import THREADS_PER_SLOT  # noqa: E402
from app.delivery.worker import Worker  # noqa: E402
from app.extensions import db  # noqa: E402
from app.models import Message, Recipient  # noqa: E402
from bench.common import postgres_database  # noqa: E402
from tests.delivery_helpers import Peer, bulk_queue  # noqa: E402
from tests.fault_helpers import SqliteLock, TcpProxy  # noqa: E402

LEASE = 5  # seconds: how long killed work waits (the default 300 s would only make this slow)


def say(text: str) -> None:
    print(f"[faults] {text}", flush=True)


def migrate(url: str) -> None:
    from flask_migrate import upgrade

    app = create_app({"DATABASE_URL": url, "TESTING": True, "LOG_LEVEL": "warning"})
    with app.app_context():
        upgrade()
        db.engine.dispose()


def scalar(app: Any, query: Any) -> int:
    with app.app_context():
        value = db.session.scalar(query)
        db.session.remove()
        return int(value or 0)


def queued(app: Any) -> int:
    return scalar(app, sa.select(sa.func.count()).select_from(Message))


def undelivered_addresses(app: Any) -> set[str]:
    with app.app_context():
        rows = set(db.session.scalars(sa.select(Recipient.address)))
        db.session.remove()
        return rows


def start_worker(url: str, peer: Peer, concurrency: int, log_path: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ELEMTA_")}
    env.update(FLASK_APP="wsgi.py", ELEMTA_DATABASE_URL=url, ELEMTA_LOG_LEVEL="warning",
               ELEMTA_RELAY_HOST=peer.address, ELEMTA_WORKER_CONCURRENCY=str(concurrency),
               ELEMTA_WORKER_LEASE_SECONDS=str(LEASE))
    flask = os.path.join(os.path.dirname(sys.executable), "flask")
    with open(log_path, "ab") as log_file:
        return subprocess.Popen([flask, "worker"], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=log_file)


def kill_run(url: str, app: Any, args: argparse.Namespace, rng: random.Random,
             log_path: str) -> dict[str, Any]:
    count = args.messages
    with Peer(port=args.port) as peer:
        bulk_queue(app, count, prefix="kill")
        at_risk: list[int] = []
        pending: set[tuple[str, int]] = set()  # (recipient, deliveries so far) to be sent again
        started = time.monotonic()
        # Random moments spread over the whole load: kill when the sink has seen this many.
        moments = sorted(rng.sample(range(count // 20, count * 9 // 10), args.kills))
        for n, moment in enumerate(moments):
            process = start_worker(url, peer, args.concurrency, log_path)
            # Never before this worker delivered something: a kill before its first delivery
            # would only repeat the previous one.
            moment = max(moment, len(peer.received) + 1)
            while len(peer.received) < moment and process.poll() is None:
                time.sleep(0.002)
            process.send_signal(signal.SIGKILL)
            process.wait(10)
            sent = Counter(peer.recipients_received())
            # Accepted by the sink, not recorded: sent again by the next worker (unless it is
            # killed first, when the same pending delivery is not counted twice).
            now_pending = {(a, sent[a]) for a in undelivered_addresses(app) & set(sent)}
            risky = len(now_pending - pending)
            pending |= now_pending
            at_risk.append(risky)
            say(f"kill {n + 1}: after {len(sent)} recipients accepted by the sink, "
                f"{queued(app)} messages queued; accepted but unrecorded (sent again): {risky}")
            time.sleep(LEASE + 0.5)  # the dead worker's leases expire
        process = start_worker(url, peer, args.concurrency, log_path)
        while queued(app) and time.monotonic() - started < 600:
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        process.wait(60)
        received = Counter(peer.recipients_received())
    expected = {f"r{n}@example.net" for n in range(count)}
    lost = len(expected - set(received))
    duplicates = sum(received.values()) - len(received)
    return {"messages": count, "kills": args.kills, "lost": lost, "duplicates": duplicates,
            "at_risk_per_kill": at_risk, "left_in_queue": queued(app),
            "ok": lost == 0 and duplicates == sum(at_risk)
            and all(r <= THREADS_PER_SLOT * args.concurrency for r in at_risk)}  # the threads


def outage_run(url: str, app: Any, args: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    count = args.messages
    proxy: TcpProxy | None = None
    settings: dict[str, Any] = {}
    if url.startswith("postgresql"):
        parsed = sa.make_url(url)
        proxy = TcpProxy(parsed.host or "127.0.0.1", parsed.port or 5432).__enter__()
        settings["DATABASE_URL"] = proxy.url_for(url)
    else:
        settings["SQLALCHEMY_ENGINE_OPTIONS"] = {"connect_args": {"timeout": 1}}
    with Peer(port=args.port) as peer:
        bulk_queue(app, count, prefix="outage")
        worker_app = create_app({"DATABASE_URL": url, "TESTING": True, "LOG_LEVEL": "warning",
                                 "RELAY_HOST": peer.address,
                                 "WORKER_CONCURRENCY": args.concurrency, **settings})
        worker = Worker(worker_app)
        thread = threading.Thread(target=worker.run)
        thread.start()
        while not peer.received:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.5, 3.0))
        at_cut = len(peer.received)
        lock = None
        if proxy is not None:
            proxy.cut()
        else:
            lock = SqliteLock(url).take()
        say(f"database {'cut' if proxy else 'locked'} for {args.outage} s after "
            f"{at_cut} messages")
        time.sleep(args.outage)
        during = len(peer.received) - at_cut
        if proxy is not None:
            proxy.restore()
        else:
            assert lock is not None
            lock.release()
        back = time.monotonic()
        while queued(app) and time.monotonic() - back < 600:
            time.sleep(0.2)
        finished = time.monotonic() - back
        worker.stop()
        thread.join(60)
        if proxy is not None:
            proxy.cut()
        received = Counter(peer.recipients_received())
    expected = {f"r{n}@example.net" for n in range(count)}
    lost = len(expected - set(received))
    duplicates = sum(received.values()) - len(received)
    say(f"outage: {during} messages accepted by the sink during the outage (transactions in "
        f"flight), queue empty {finished:.1f} s after the database came back")
    return {"messages": count, "outage_s": args.outage, "accepted_during_outage": during,
            "lost": lost, "duplicates": duplicates, "left_in_queue": queued(app),
            "recorded_attempts": worker.recorded_attempts,
            "ok": lost == 0 and duplicates == 0}


def run_backend(url: str, args: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    migrate(url)
    app = create_app({"DATABASE_URL": url, "TESTING": True, "LOG_LEVEL": "warning"})
    log_path = os.path.join(tempfile.gettempdir(), f"fault-acceptance-{os.getpid()}.log")
    result = {"kill": kill_run(url, app, args, rng, log_path)}
    say(f"kill -9 x{args.kills}: {json.dumps(result['kill'])}")
    result["outage"] = outage_run(url, app, args, rng)
    say(f"outage {args.outage} s: {json.dumps(result['outage'])}")
    with app.app_context():
        db.engine.dispose()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--outage", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--port", type=int, default=32600, help="the sink's port")
    parser.add_argument("--pg-server",
                        default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    rng = random.Random(args.seed)
    summary: dict[str, Any] = {}
    if args.backend in ("sqlite", "both"):
        with tempfile.TemporaryDirectory() as tmp:
            summary["sqlite"] = run_backend(f"sqlite:///{tmp}/faults.db", args, rng)
    if args.backend in ("postgresql", "both"):
        os.environ["ELEMTA_BENCH_PG_SERVER"] = args.pg_server
        with postgres_database(None, "faults") as url:
            summary["postgresql"] = run_backend(url, args, rng)
    print(json.dumps(summary, indent=2))
    ok = all(part["ok"] for backend in summary.values() for part in backend.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

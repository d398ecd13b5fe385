"""Elemta side by side with Postfix on the same machine, in the same run (issue 13).

A private Postfix instance (``bench/postfix.py``: its own config and queue directories under a
temporary directory, loopback ports, nothing system-wide touched) and Elemta (``flask smtpd``
and ``flask worker --once`` as their own processes, on a PostgreSQL database created for the
run) are driven by the same tools, Postfix's own ``smtp-source`` load generator and
``smtp-sink`` as the next hop of both. Each round measures both sides one after the other,
the order alternating between rounds so a change in the machine's load hits both alike:

- intake, ``smtp-source -d -s 16 -m N -l 1024`` (16 sessions, connections reused);
- one message of 7.2 MB (``-s 1 -m 1 -l 7200000``), the time to its 250;
- delivery of the N + 1 queued messages to ``smtp-sink`` (Postfix: the held mail released;
  Elemta: ``flask worker --once``), from the first delivery to an empty queue, and the start-up
  (process start, or Postfix's release, to the first delivery);
- intake with a new connection per message (``smtp-source -s 16 -m N -l 1024``);
- delivery of those N.

Postfix holds what it accepts (``static:HOLD``) so intake is measured alone, as Elemta's
listener runs without a worker. CPU per message: Postfix = its master and every child (smtpd,
cleanup, qmgr, smtp, ...; exited children through the master's ``cutime``); Elemta = the
listener (``flask smtpd`` and its listener processes, ELEMTA_SMTPD_PROCESSES) or worker process
plus its PostgreSQL backends (``pg_stat_activity`` of the bench database), all from
``/proc/PID/stat``. Every figure is printed with the load average and
written to ``docs/PERFORMANCE.md`` (a block per scale, replaced on each run). Without Postfix
(not installed and not installable, not root) the suite says why and skips.

Ports: ephemeral, or ``BENCH_PORT_BASE`` (Elemta's listeners on base+525.., Postfix on
base+601, the sink on base+602). ``ELEMTA_BENCH_POSTFIX_SQLITE=1`` adds an Elemta-on-SQLite
side; ``ELEMTA_BENCH_BASELINE=<commit>`` adds that commit's code (``git archive``, its own
database) as one more side: a cut's before and after measured in the same run;
``ELEMTA_BENCH_VARIANT=ELEMTA_NAME=VALUE[,...]`` adds this tree once more with those settings
(its own database), e.g. ``ELEMTA_SMTPD_PROCESSES=2,ELEMTA_WORKER_PROCESSES=2``: what a setting
buys, in the same run.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
import sqlalchemy as sa

from bench.common import Result, free_port, percentile, postgres_database
from bench.postfix import (
    SMTP_SINK,
    SMTP_SOURCE,
    PostfixInstance,
    children_by_parent,
    unavailable,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLASK = os.path.join(os.path.dirname(sys.executable), "flask")
DOC = os.path.join(ROOT, "docs", "PERFORMANCE.md")
MESSAGES = {"small": 300, "full": 5000}
ROUNDS = {"small": 3, "full": 3}
BIG = 7_200_000
SESSIONS = 16
CLK = os.sysconf("SC_CLK_TCK")
TARGETS = {"intake, reused connections": 0.7, "intake, new connection per message": 0.7,
           "delivery to smtp-sink": 0.8}


def log(text: str) -> None:
    print(f"[postfix] {text}", file=sys.stderr, flush=True)


def cpu(pid: int, with_children: bool = True) -> float:
    """Seconds of CPU of a process (and of its children it has waited for)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            f = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = int(f[11]) + int(f[12]) + ((int(f[13]) + int(f[14])) if with_children else 0)
    return ticks / CLK


def tree_cpu(pid: int) -> float:
    """Seconds of CPU of a process, of its children waited for, and of its live descendants
    (``flask smtpd`` with ELEMTA_SMTPD_PROCESSES above 1: the parent and its listeners)."""
    parents = children_by_parent()
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        total += cpu(current)
        todo.extend(parents.get(current, ()))
    return total


def load() -> float:
    return round(os.getloadavg()[0], 2)


def smtp_source(port: int, messages: int, size: int, sessions: int, reuse: bool) -> float:
    """Seconds for ``smtp-source`` to have every message accepted; raises on any failure."""
    args = [SMTP_SOURCE, "-s", str(sessions), "-m", str(messages), "-l", str(size),
            "-M", "bench.local", "-f", "bench@example.com", "-t", "rcpt@example.net",
            f"127.0.0.1:{port}"]
    if reuse:
        args.insert(1, "-d")
    began = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, timeout=1800)
    elapsed = time.perf_counter() - began
    if done.returncode:
        raise RuntimeError(f"smtp-source failed ({done.returncode}): {done.stderr[-500:]}")
    return elapsed


# The worker's last log line: "... stopped after N delivery attempt(s) recorded in M
# transaction(s)".
STOPPED = re.compile(r"stopped after (\d+) delivery attempt\(s\) recorded in (\d+) transaction")


@dataclass
class Sample:
    seconds: float
    messages: int
    cpu_ms: float | None = None  # process side, per message
    db_cpu_ms: float | None = None  # database backends, per message
    startup_s: float | None = None
    load: float = 0.0
    per_commit: float | None = None  # the worker's outcomes a commit (its log's last line)

    @property
    def rate(self) -> float:
        return self.messages / self.seconds


# ---------------------------------------------------------------------------- Postfix side


class PostfixSide:
    name = "Postfix"

    def __init__(self, instance: PostfixInstance) -> None:
        self.instance = instance

    def cpu(self) -> float:
        return sum(cpu(pid) for pid in self.instance.pids())

    def intake(self, n: int, size: int, sessions: int, reuse: bool) -> Sample:
        held = self.instance.queued(("hold",))
        before = self.cpu()
        seconds = smtp_source(self.instance.smtp_port, n, size, sessions, reuse)
        used = self.cpu() - before
        if self.instance.queued(("hold",)) - held != n:
            raise RuntimeError(f"Postfix holds {self.instance.queued(('hold',)) - held} of {n}")
        return Sample(seconds, n, cpu_ms=1000 * used / n, load=load())

    def deliver(self, expected: int) -> Sample:
        total = self.instance.queued()
        if total != expected:
            raise RuntimeError(f"Postfix has {total} queued, expected {expected}")
        released = time.perf_counter()
        self.instance.release()
        first, cpu_first = _wait_until(lambda: self.instance.queued() < total, self.cpu)
        _, cpu_last = _wait_until(lambda: self.instance.queued() == 0, self.cpu)
        end = time.perf_counter()
        delivered = total - 0
        return Sample(end - first, delivered, cpu_ms=1000 * (cpu_last - cpu_first) / delivered,
                      startup_s=first - released, load=load())


def _wait_until(done: Callable[[], bool], sample: Callable[[], float],
                timeout: float = 1800) -> tuple[float, float]:
    """(perf_counter when ``done()`` first held, ``sample()`` then). Polls every 20 ms."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise RuntimeError("timed out waiting for the queue")
        time.sleep(0.02)
    return time.perf_counter(), sample()


# ---------------------------------------------------------------------------- Elemta side


@dataclass
class ElemtaSide:
    label: str
    url: str
    smtp_port: int
    sink_port: int
    source: str = ROOT  # the code tree that runs (a baseline: an exported older commit)
    settings: dict[str, str] = field(default_factory=dict)  # a variant's ELEMTA_* settings
    env: dict[str, str] = field(default_factory=dict)
    listener: subprocess.Popen[bytes] | None = None
    monitor: Any = None  # a psycopg connection (PostgreSQL) or an SQLAlchemy engine
    monitor_pid: int | None = None

    @property
    def name(self) -> str:
        return f"Elemta ({self.label})"

    def start(self) -> None:
        self.env = dict(os.environ)
        for key in ("ELEMTA_SMTP_LISTEN", "ELEMTA_API_LISTEN"):
            self.env.pop(key, None)
        self.env.update({"FLASK_APP": "wsgi.py", "ELEMTA_LOG_LEVEL": "info",
                         "ELEMTA_DATABASE_URL": self.url,
                         "ELEMTA_RELAY_HOST": f"127.0.0.1:{self.sink_port}"})
        self.env.update(self.settings)
        # Byte-compiled as an installed package is (pip and Debian compile at install): with
        # PYTHONDONTWRITEBYTECODE set, as on the development machine, every `flask worker`
        # would otherwise compile the app's modules again, ~0.15 s of its start-up.
        subprocess.run([sys.executable, "-m", "compileall", "-q", "app", "wsgi.py"],
                       cwd=self.source, check=True, capture_output=True)
        subprocess.run([FLASK, "db", "upgrade"], cwd=self.source, env=self.env, check=True,
                       capture_output=True)
        if self.url.startswith("postgresql"):
            dsn = sa.make_url(self.url).set(drivername="postgresql").render_as_string(False)
            self.monitor = psycopg.connect(dsn, autocommit=True)
            self.monitor_pid = self.monitor.execute("SELECT pg_backend_pid()").fetchone()[0]
        else:
            self.monitor = sa.create_engine(self.url)
        self.listener = subprocess.Popen(
            [FLASK, "smtpd", "--listen", f"127.0.0.1:{self.smtp_port}"], cwd=self.source,
            env=self.env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                smtp_source(self.smtp_port, 1, 100, 1, False)  # warm-up message
                break
            except RuntimeError:
                if self.listener.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("flask smtpd did not start") from None
                time.sleep(0.2)

    def stop(self) -> None:
        if self.listener is not None:
            self.listener.terminate()
            self.listener.wait(timeout=60)
        if self.monitor is not None:
            if isinstance(self.monitor, sa.Engine):
                self.monitor.dispose()
            else:
                self.monitor.close()

    def queued(self) -> int:
        query = "SELECT count(*) FROM messages"
        if isinstance(self.monitor, sa.Engine):
            with self.monitor.connect() as conn:
                return conn.execute(sa.text(query)).scalar_one()
        return self.monitor.execute(query).fetchone()[0]

    def backends(self) -> dict[int, float]:
        """CPU seconds of each PostgreSQL backend serving this database (not the monitor)."""
        if isinstance(self.monitor, sa.Engine):
            return {}
        rows = self.monitor.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid()").fetchall()
        return {pid: cpu(pid, with_children=False) for (pid,) in rows}

    def intake(self, n: int, size: int, sessions: int, reuse: bool) -> Sample:
        assert self.listener is not None
        queued = self.queued()
        db_before = self.backends()
        before = tree_cpu(self.listener.pid)
        seconds = smtp_source(self.smtp_port, n, size, sessions, reuse)
        used = tree_cpu(self.listener.pid) - before
        db_after = self.backends()
        db_used = sum(v - db_before.get(pid, 0.0) for pid, v in db_after.items())
        if self.queued() - queued != n:
            raise RuntimeError(f"{self.name} stored {self.queued() - queued} of {n}")
        return Sample(seconds, n, cpu_ms=1000 * used / n,
                      db_cpu_ms=1000 * db_used / n if db_after else None, load=load())

    def deliver(self, expected: int) -> Sample:
        total = self.queued()
        if total != expected:
            raise RuntimeError(f"{self.name} has {total} queued, expected {expected}")
        seen: dict[int, float] = {}
        worker_cpu = [0.0]

        def sample() -> float:
            for pid, value in self.backends().items():
                seen[pid] = max(value, seen.get(pid, 0.0))
            worker_cpu[0] = max(worker_cpu[0], cpu(process.pid))
            return worker_cpu[0]

        # The worker's log goes to a file: a pipe nobody reads while it runs could fill up
        # and stall it.
        errlog = tempfile.TemporaryFile()
        started = time.perf_counter()
        process = subprocess.Popen([FLASK, "worker", "--once"], cwd=self.source, env=self.env,
                                   stdout=errlog, stderr=errlog)
        # Until the first delivery, or the worker's exit: a worker that exits (or dies) before
        # delivering anything would otherwise be waited for until the timeout (half an hour).
        first, cpu_first = _wait_until(
            lambda: self.queued() < total or process.poll() is not None, sample)
        if process.poll() is not None and self.queued() == total:
            process.wait()
            errlog.seek(0)
            errors = errlog.read().decode(errors="replace")
            errlog.close()
            log(f"{self.name}: flask worker --once exited ({process.returncode}) before its "
                f"first delivery, {total} still queued; not waiting any longer")
            raise RuntimeError(f"{self.name}: the worker exited ({process.returncode}) before "
                               f"delivering any of the {total} queued: {errors[-500:]}")
        db_first = dict(seen)
        last = [first]

        def drained() -> bool:
            sample()
            if self.queued() == 0:
                last[0] = time.perf_counter()
                return True
            return process.poll() is not None

        _wait_until(drained, sample)
        # The worker's own total, including what it did after the last poll.
        _pid, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        errlog.seek(0)
        errors = errlog.read().decode(errors="replace")
        errlog.close()
        left = self.queued()
        if left:
            raise RuntimeError(f"{self.name}: worker exited ({process.returncode}) with "
                               f"{left} queued: {errors[-500:]}")
        worker_total = usage.ru_utime + usage.ru_stime
        db_used = sum(v - db_first.get(pid, 0.0) for pid, v in seen.items())
        stopped = STOPPED.search(errors)
        return Sample(last[0] - first, total, cpu_ms=1000 * (worker_total - cpu_first) / total,
                      db_cpu_ms=1000 * db_used / total if seen else None,
                      startup_s=first - started, load=load(),
                      per_commit=int(stopped[1]) / int(stopped[2])
                      if stopped and int(stopped[2]) else None)


# ---------------------------------------------------------------------------- the run


def _alternate(round_no: int, sides: list[Any]) -> list[Any]:
    return sides if round_no % 2 == 0 else list(reversed(sides))


def _sink(port: int) -> subprocess.Popen[bytes]:
    args = [SMTP_SINK, f"127.0.0.1:{port}", "256"]
    if os.geteuid() == 0:
        args[1:1] = ["-u", "nobody"]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    if process.poll() is not None:
        raise RuntimeError("smtp-sink did not start")
    return process


def measure(scale: str, urls: list[tuple[str, str, str, dict[str, str]]]
            ) -> dict[str, dict[str, list[Sample]]]:
    """``urls``: (label, database URL, code tree, extra settings) of each Elemta side."""
    n, rounds = MESSAGES[scale], ROUNDS[scale]
    base = os.environ.get("BENCH_PORT_BASE")
    ports = ((int(base) + 601, int(base) + 602, [int(base) + 525 + i for i in range(len(urls))])
             if base else (free_port(), free_port(), [free_port() for _ in urls]))
    postfix_port, sink_port, elemta_ports = ports
    sink = _sink(sink_port)
    instance = PostfixInstance(postfix_port, sink_port)
    elemtas = [ElemtaSide(label, url, port, sink_port, source, settings)
               for (label, url, source, settings), port
               in zip(urls, elemta_ports, strict=True)]
    samples: dict[str, dict[str, list[Sample]]] = {}

    def record(measure_name: str, side: Any, sample: Sample) -> None:
        samples.setdefault(measure_name, {}).setdefault(side.name, []).append(sample)
        extra = "".join(
            f", {label} {value:.2f}{unit}" for label, value, unit in (
                ("cpu", sample.cpu_ms, " ms/msg"), ("db", sample.db_cpu_ms, " ms/msg"),
                ("start-up", sample.startup_s, " s"),
                ("outcomes a commit", sample.per_commit, "")) if value is not None)
        log(f"{measure_name}: {side.name}: {sample.rate:.1f} msg/s ({sample.seconds:.3f} s"
            f"{extra}), load {sample.load}")

    try:
        instance.start()
        postfix = PostfixSide(instance)
        for side in elemtas:
            side.start()
        smtp_source(postfix_port, 1, 100, 1, False)  # Postfix's warm-up message
        instance.purge()
        for side in elemtas:  # the warm-up messages leave with a first (unmeasured) delivery
            side.deliver(1)
        sides: list[Any] = [*elemtas, postfix]
        for r in range(rounds):
            log(f"round {r + 1} of {rounds} (load {load()})")
            for side in _alternate(r, sides):
                record("intake, reused connections", side, side.intake(n, 1024, SESSIONS, True))
            for side in _alternate(r, sides):
                record("one 7.2 MB message", side, side.intake(1, BIG, 1, True))
            for side in _alternate(r, sides):
                record("delivery to smtp-sink", side, side.deliver(n + 1))
            for side in _alternate(r, sides):
                record("intake, new connection per message", side,
                       side.intake(n, 1024, SESSIONS, False))
            for side in _alternate(r, sides):
                record("delivery to smtp-sink", side, side.deliver(n))
    finally:
        for side in elemtas:
            try:
                side.stop()
            except Exception as exc:  # keep stopping the others
                log(f"stopping {side.name}: {exc}")
        instance.stop()
        sink.send_signal(signal.SIGTERM)
        sink.wait(timeout=30)
    return samples


def _ratio_results(samples: dict[str, dict[str, list[Sample]]], scale: str) -> list[Result]:
    results = []
    for measure_name, by_side in samples.items():
        pf = by_side["Postfix"]
        for side_name, mine in by_side.items():
            if side_name == "Postfix":
                continue
            big = measure_name.startswith("one ")
            # Pairs of the same round (delivery: two per round), compared as time or rate.
            ratios = [(m.seconds / p.seconds) if big else (m.rate / p.rate)
                      for m, p in zip(mine, pf, strict=True)]
            target = 2.0 if big else TARGETS.get(measure_name)
            med = statistics.median(ratios)
            loads = [s.load for s in mine + pf]
            extra: dict[str, Any] = {
                "ratio_min": round(min(ratios), 2), "ratio_max": round(max(ratios), 2),
                "elemta": [round(s.seconds if big else s.rate, 3 if big else 1) for s in mine],
                "postfix": [round(s.seconds if big else s.rate, 3 if big else 1) for s in pf],
                "load": f"{min(loads)}-{max(loads)}"}
            if not big:
                lat = [1000 * s.seconds / s.messages * SESSIONS for s in mine]
                extra["elemta_p50_ms_per_msg_per_session"] = round(statistics.median(lat), 2)
                extra["elemta_p95_ms_per_msg_per_session"] = round(percentile(lat, 95), 2)
            results.append(Result(
                name=f"{measure_name}: {side_name} / Postfix" + (" (time)" if big else " (rate)"),
                value=round(med, 2), unit="x", target=target, higher_is_better=not big,
                notes=f"{scale}, median of {len(ratios)} pairs", extra=extra))
            cpu_e = [s.cpu_ms + (s.db_cpu_ms or 0) for s in mine if s.cpu_ms is not None]
            cpu_p = [s.cpu_ms for s in pf if s.cpu_ms is not None]
            if cpu_e and cpu_p and not big:
                results.append(Result(
                    name=f"CPU per message, {measure_name}: {side_name} / Postfix",
                    value=round(statistics.median(cpu_e) / statistics.median(cpu_p), 2),
                    unit="x", notes="process + database backends",
                    extra={"elemta_process_ms": round(statistics.median(
                               [s.cpu_ms for s in mine if s.cpu_ms is not None]), 3),
                           "elemta_db_ms": round(statistics.median(
                               [s.db_cpu_ms or 0 for s in mine]), 3),
                           "postfix_ms": round(statistics.median(cpu_p), 3)}))
            if measure_name == "delivery to smtp-sink":
                starts = [s.startup_s for s in mine if s.startup_s is not None]
                results.append(Result(
                    name=f"start-up to first delivery: {side_name} (flask worker --once)",
                    value=round(statistics.median(starts), 3), unit="s", target=1.0,
                    extra={"max": round(max(starts), 3), "postfix_release_to_first": round(
                        statistics.median([s.startup_s or 0 for s in pf]), 3)}))
    return results


def _doc_block(samples: dict[str, dict[str, list[Sample]]], results: list[Result],
               scale: str) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [f"Last `python -m bench postfix --scale {scale}` run: {stamp}, "
             f"{MESSAGES[scale]} messages per measure, {ROUNDS[scale]} rounds "
             f"(load average 1 min shown per pair).", "",
             "| measure | round | side | figure | CPU ms/msg (process + db) | load |",
             "|---|---|---|---|---|---|"]
    for measure_name, by_side in samples.items():
        for side_name, mine in by_side.items():
            for i, s in enumerate(mine):
                figure = (f"{s.seconds:.3f} s" if s.messages == 1
                          else f"{s.rate:.0f} msg/s")
                if s.startup_s is not None:
                    figure += f", start-up {s.startup_s:.2f} s"
                cpu_text = "-" if s.cpu_ms is None else (
                    f"{s.cpu_ms:.2f}" + ("" if s.db_cpu_ms is None else f" + {s.db_cpu_ms:.2f}"))
                lines.append(f"| {measure_name} | {i + 1} | {side_name} | {figure} | "
                             f"{cpu_text} | {s.load} |")
    lines += ["", "| ratio | median | min | max | target | verdict |", "|---|---|---|---|---|---|"]
    for r in results:
        target = "-" if r.target is None else (
            f">= {r.target}" if r.higher_is_better else f"<= {r.target}")
        lines.append(f"| {r.name} | {r.value} {r.unit} | {r.extra.get('ratio_min', '-')} | "
                     f"{r.extra.get('ratio_max', '-')} | {target} | {r.verdict} |")
    return "\n".join(lines)


def write_doc(block: str, scale: str, path: str = DOC) -> None:
    start, end = f"<!-- bench:postfix:{scale}:start -->", f"<!-- bench:postfix:{scale}:end -->"
    with open(path) as fh:
        text = fh.read()
    new = f"{start}\n{block}\n{end}"
    if start in text and end in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _m: new, text,
                      flags=re.DOTALL)
    else:
        text = text.rstrip("\n") + f"\n\n### Latest side-by-side run ({scale})\n\n{new}\n"
    with open(path, "w") as fh:
        fh.write(text)


def variant_settings(text: str) -> dict[str, str]:
    """``ELEMTA_BENCH_VARIANT``: ``NAME=VALUE[,NAME=VALUE...]`` of ELEMTA_* settings."""
    settings: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or not name.startswith("ELEMTA_"):
            raise SystemExit(f"ELEMTA_BENCH_VARIANT: {item!r} is not ELEMTA_NAME=VALUE")
        settings[name] = value
    return settings


def run(options: Any) -> list[Result]:
    scale = getattr(options, "scale", "small")
    why = unavailable()
    if why:
        log(f"skipped: {why}")
        return [Result(name="side by side with Postfix", value=0, unit="(skipped)",
                       notes=f"skipped: {why}")]
    given = getattr(options, "database_url", None) or os.environ.get("ELEMTA_BENCH_DATABASE_URL")
    baseline = os.environ.get("ELEMTA_BENCH_BASELINE")
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(postgres_database(given, "postfix"))
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="elemta-bench-postfix-"))
        urls: list[tuple[str, str, str, dict[str, str]]] = [("PostgreSQL", url, ROOT, {})]
        if baseline:
            # The same measures for an older commit in the same run: before/after of a cut.
            tree = os.path.join(tmp, "baseline")
            os.makedirs(tree)
            archive = subprocess.run(["git", "-C", ROOT, "archive", baseline],
                                     capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
            old_url = stack.enter_context(postgres_database(None, "postfix_base"))
            urls.insert(0, (f"PostgreSQL, {baseline}", old_url, tree, {}))
        variant = variant_settings(os.environ.get("ELEMTA_BENCH_VARIANT", ""))
        if variant:
            # This tree once more with other settings (its own database): what a setting buys.
            variant_url = stack.enter_context(postgres_database(None, "postfix_variant"))
            label = ", ".join(f"{k}={v}" for k, v in variant.items())
            urls.append((f"PostgreSQL, {label}", variant_url, ROOT, variant))
        if os.environ.get("ELEMTA_BENCH_POSTFIX_SQLITE") == "1":
            urls.append(("SQLite", f"sqlite:///{tmp}/bench.db", ROOT, {}))
        samples = measure(scale, urls)
    results = _ratio_results(samples, scale)
    if os.environ.get("BENCH_NO_DOC") != "1":
        write_doc(_doc_block(samples, results, scale), scale)
    return results

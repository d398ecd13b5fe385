"""HTTP throughput and API worker memory under gunicorn (API.md §13).

Two targets, on a fresh database of each kind (a temporary SQLite file, information; a
PostgreSQL database created for the run and dropped after it, the target) migrated and filled
by ``flask demo seed``:

* **Throughput**: ``GET /api/queue/stats``, ``/api/stats/delivery?timeScale=day`` and
  ``/api/queue/pending?limit=100`` of the real app (``wsgi:app``, three ratios; with
  ``ELEMTA_BENCH_BASELINE`` also an older commit's, served next to it) against a bare Flask
  JSON endpoint (``bench.bare_app:app``), both under ``gunicorn -c gunicorn.conf.py`` (its
  worker class, workers, threads and keep-alive; its JSON access log, written to a file), both
  started in the same run and measured in alternating rounds, 32 persistent keep-alive
  connections. Target: the app >= 0.5 x the bare endpoint.
* **Memory** (PostgreSQL only): one gunicorn worker (``WEB_CONCURRENCY=1``, same threads) driven
  with a mix of requests (queue stats and pages, delivery stats, message events, health, a
  message detail, 404/400/401 answers, hold/release with an admin key, a /metrics scrape) over
  32 keep-alive connections; the worker's VmRSS (``/proc/PID/status`` of the worker, not the
  master) is read after every tenth of the run. Targets: <= 150 MB after 100 000 requests, and
  growth between 50 000 and 100 000 requests below ``GROWTH_TOLERANCE_MB``.

The rate limiter stays on, as in production, with its default budget raised
(``ELEMTA_RATELIMIT_DEFAULT``) so one benchmarking client measures the endpoint, not the 429.

The load generator is ``wrk`` (C, event loop: a fraction of the CPU per request of any Python
client, which matters with client, server and database on the same two cores); without it a
Python client (threads, one ``http.client`` keep-alive connection each) is used and reported.
``make bench`` installs wrk when it can (Debian package, as root).

gthread and keep-alive: a worker's main thread accepts, and after each response puts the
connection back into its poller until the next request arrives, then hands it to a pool thread
again; both apps pay that round trip alike. Connections stay with the worker that accepted
them, so the split of the 32 between the workers is reported (the workers' CPU shares).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from bench.common import Result, free_port, percentile, postgres_database

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
CONNECTIONS = 32
RATIO_TARGET = 0.5
RSS_TARGET_MB = 150.0
# RSS moves by a few hundred KiB between samples without any leak (allocator arenas of 32
# threads, the SQLAlchemy statement cache filling up to its bound, the rate limiter's window
# counters): a leak of even 20 bytes a request would add 1 MB over 50 000 requests.
GROWTH_TOLERANCE_MB = 2.0
# A high limit rather than ELEMTA_RATELIMIT_ENABLED=false: the limiter's cost is part of the
# production request path and is measured too.
RATELIMIT = "1000000000 per minute"
SIZES = {
    # small (``make bench-quick``, a few minutes in all): 2 s a measure is still ~500-8000
    # requests; the memory run only checks the machinery (its targets are the full scale's).
    "small": {"seconds": 2, "rounds": 2, "requests": 2_000, "messages": 300, "events": 5000},
    "full": {"seconds": 15, "rounds": 3, "requests": 100_000, "messages": 10_000,
             "events": 100_000},
}


# What each round measures, in this order (the first two: the API.md §13 ratio).
PATHS = {"bare": "/bare", "app": "/api/queue/stats",
         "stats": "/api/stats/delivery?timeScale=day", "page": "/api/queue/pending?limit=100"}


def log(text: str) -> None:
    print(f"[http] {text}", file=sys.stderr, flush=True)


def base_env(url: str) -> dict[str, str]:
    env = dict(os.environ)
    # Each gunicorn master makes (and removes) its own metrics directory: no stale files.
    for name in ("PROMETHEUS_MULTIPROC_DIR", "ELEMTA_METRICS_DIR_OWNER", "ELEMTA_API_LISTEN",
                 "WEB_CONCURRENCY", "ELEMTA_STARTED_AT"):
        env.pop(name, None)
    env.update({"FLASK_APP": "wsgi.py", "ELEMTA_DATABASE_URL": url,
                "ELEMTA_RATELIMIT_DEFAULT": RATELIMIT})
    return env


def flask_cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([os.path.join(BIN, "flask"), *args], cwd=ROOT, env=env, check=True,
                          capture_output=True, text=True)
    return done.stdout


def prepare(url: str, sizes: dict[str, int]) -> str:
    """Migrate, seed with ``flask demo seed``, create an admin key; returns the key."""
    env = base_env(url)
    flask_cli(env, "db", "upgrade")
    flask_cli(env, "demo", "seed", "--messages", str(sizes["messages"]),
              "--events", str(sizes["events"]), "--seed", "1")
    name = f"bench-http-{uuid.uuid4().hex[:8]}"  # unique: a given database may be reused
    return flask_cli(env, "apikey", "create", "--name", name, "--role", "admin").strip()


# --- gunicorn -----------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(p) for p in fh.read().split()]
    except FileNotFoundError:
        return []


@dataclass
class Server:
    name: str
    process: subprocess.Popen[bytes]
    port: int
    path: str
    logfile: str
    workers: list[int] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    def tail(self) -> str:
        with open(self.logfile, errors="replace") as fh:
            return "".join(fh.readlines()[-20:])


def http_get(port: int, path: str, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


_next_port = [0]


def server_port() -> int:
    """Ephemeral, or the next of ``BENCH_PORT_BASE``+25.. (a range given to this run)."""
    base = os.environ.get("BENCH_PORT_BASE")
    if not base:
        return free_port()
    _next_port[0] += 1
    return int(base) + 24 + _next_port[0]


@contextmanager
def gunicorn(name: str, module: str, path: str, env: dict[str, str], workers: int | None,
             tmp: str, root: str = ROOT) -> Iterator[Server]:
    """gunicorn with the project's gunicorn.conf.py (of ``root``, the code tree it runs);
    waits until every worker has booted."""
    port = server_port()
    env = env | {"ELEMTA_API_LISTEN": f"127.0.0.1:{port}"}
    if workers is not None:
        env["WEB_CONCURRENCY"] = str(workers)
    logfile = os.path.join(tmp, f"gunicorn-{name}-{port}.log")
    with open(logfile, "wb") as out:
        process = subprocess.Popen(
            [os.path.join(BIN, "gunicorn"), "-c", "gunicorn.conf.py", module], cwd=root,
            env=env, stdout=out, stderr=subprocess.STDOUT)
    server = Server(name, process, port, path, logfile)
    try:
        wait_ready(server, workers)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_ready(server: Server, workers: int | None, timeout: float = 90) -> None:
    """Answering, and every worker done booting (its CPU time has stopped moving).

    With several workers, the first answer only proves one of them is up; a worker still
    importing the app would leave every benchmark connection to the others.
    """
    expected = workers or int(os.environ.get("WEB_CONCURRENCY", "2"))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"gunicorn {server.name} exited:\n{server.tail()}")
        try:
            status, _, _ = http_get(server.port, server.path, timeout=5)
        except OSError:
            status = 0
        server.workers = children(server.process.pid)
        if status == 200 and len(server.workers) >= expected:
            break
        time.sleep(0.2)
    else:
        raise RuntimeError(f"gunicorn {server.name} did not start:\n{server.tail()}")
    previous = {pid: cpu_seconds(pid) for pid in server.workers}
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = {pid: cpu_seconds(pid) for pid in server.workers}
        if all(now[pid] - previous[pid] < 0.02 for pid in now):
            return
        previous = now
    raise RuntimeError(f"gunicorn {server.name}: workers did not settle")


# --- load generators ----------------------------------------------------------------------

@dataclass
class Load:
    requests: int
    seconds: float
    rps: float
    p50_ms: float | None = None
    p99_ms: float | None = None
    statuses: dict[str, int] = field(default_factory=dict)
    errors: int = 0


# A request of the mix: (method, path, headers, body or None).
Request = tuple[str, str, dict[str, str], str | None]

_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _wrk_ms(output: str, pct: str) -> float | None:
    found = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", output, re.M)
    return round(float(found.group(1)) * _UNITS[found.group(2)], 2) if found else None


def parse_wrk(output: str) -> Load:
    done = re.search(r"(\d+) requests in ([\d.]+)(ms|s|m)", output)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if not done or not rate:
        raise RuntimeError(f"unexpected wrk output:\n{output}")
    seconds = float(done.group(2)) * {"ms": 0.001, "s": 1.0, "m": 60.0}[done.group(3)]
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", output))
    statuses = {k: int(v) for k, v in re.findall(r"^status (\d+) (\d+)$", output, re.M)}
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if non2xx:
        statuses["non-2xx/3xx"] = int(non2xx.group(1))
    return Load(int(done.group(1)), seconds, float(rate.group(1)), _wrk_ms(output, "50"),
                _wrk_ms(output, "99"), statuses, errors)


def lua_string(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid Lua string literal here


MIX_LUA = """
local limit = {limit}
local marker = {marker}
local threads = {{}}
function setup(thread) table.insert(threads, thread) end
function init(args)
  counts = {{}}
  answered = 0
  reqs = {{ {requests} }}
  next_index = 0
end
function request()
  next_index = next_index % #reqs + 1
  return reqs[next_index]
end
function response(status, headers, body)
  answered = answered + 1
  counts[status] = (counts[status] or 0) + 1
  if answered == limit then
    local fh = io.open(marker, "w")
    fh:write("done")
    fh:close()
    wrk.thread:stop()
  end
end
function done(summary, latency, requests)
  for _, thread in ipairs(threads) do
    for status, n in pairs(thread:get("counts")) do
      io.write(string.format("status %s %d\\n", status, n))
    end
  end
end
"""


def _lua_request(req: Request) -> str:
    method, path, headers, body = req
    table = ", ".join(f"[{lua_string(k)}] = {lua_string(v)}" for k, v in headers.items())
    body_lua = lua_string(body) if body is not None else "nil"
    return f"wrk.format({lua_string(method)}, {lua_string(path)}, {{{table}}}, {body_lua})"


def wrk_duration(url: str, seconds: float) -> Load:
    # One wrk thread: an event loop carries 32 connections easily, and a second one would only
    # compete with the server for the two cores.
    out = subprocess.run(["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{seconds}s", "--latency",
                          "--timeout", "10s", url], capture_output=True, text=True, check=True)
    return parse_wrk(out.stdout)


def wrk_count(base: str, mix: list[Request], count: int, tmp: str) -> Load:
    """Exactly ``count`` answers of the mix, cycled; wrk stops on SIGINT once they are in."""
    marker = os.path.join(tmp, f"wrk-done-{uuid.uuid4().hex[:6]}")
    script = os.path.join(tmp, "mix.lua")
    with open(script, "w") as fh:
        fh.write(MIX_LUA.format(limit=count, marker=lua_string(marker),
                                requests=", ".join(_lua_request(r) for r in mix)))
    process = subprocess.Popen(["wrk", "-t1", f"-c{CONNECTIONS}", "-d3600s", "--latency",
                                "--timeout", "30s", "-s", script, base],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not os.path.exists(marker):
            if process.poll() is not None:
                raise RuntimeError(f"wrk ended early: {process.communicate()}")
            time.sleep(0.05)
        # wrk's SIGINT handler ends the run and prints its summary (the done() above included).
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return parse_wrk(out)


def python_load(port: int, mix: list[Request], seconds: float | None = None,
                count: int | None = None) -> Load:
    """The fallback generator: 32 threads, one http.client keep-alive connection each."""
    lock = threading.Lock()
    issued = [0]
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    errors = [0]
    deadline = time.monotonic() + seconds if seconds else None

    def take() -> int | None:
        with lock:
            if count is not None and issued[0] >= count:
                return None
            issued[0] += 1
            return issued[0]

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine: list[float] = []
        seen: dict[str, int] = {}
        while deadline is None or time.monotonic() < deadline:
            n = take()
            if n is None:
                break
            method, path, headers, body = mix[n % len(mix)]
            began = time.perf_counter()
            try:
                conn.request(method, path, body=body, headers=headers)
                response = conn.getresponse()
                response.read()
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                with lock:
                    errors[0] += 1
                continue
            mine.append((time.perf_counter() - began) * 1000)
            seen[str(response.status)] = seen.get(str(response.status), 0) + 1
        conn.close()
        with lock:
            latencies.extend(mine)
            for status, n in seen.items():
                statuses[status] = statuses.get(status, 0) + n

    threads = [threading.Thread(target=client) for _ in range(CONNECTIONS)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    return Load(len(latencies), elapsed, len(latencies) / elapsed,
                round(percentile(latencies, 50), 2), round(percentile(latencies, 99), 2),
                statuses, errors[0])


HAVE_WRK = shutil.which("wrk") is not None
GENERATOR = ("wrk 1 thread, 32 connections" if HAVE_WRK
             else "Python fallback (wrk not installed): 32 threads, http.client keep-alive")


def run_duration(server: Server, seconds: float,
                 path: str | None = None) -> tuple[Load, dict[str, float]]:
    """A timed run (of ``path``, default the server's); with it the CPU each worker (and the
    master) spent, in seconds."""
    pids = [server.process.pid, *server.workers]
    before = {pid: cpu_seconds(pid) for pid in pids}
    path = path or server.path
    if HAVE_WRK:
        load = wrk_duration(f"http://127.0.0.1:{server.port}{path}", seconds)
    else:
        load = python_load(server.port, [("GET", path, {}, None)], seconds=seconds)
    cpu = {str(pid): round(cpu_seconds(pid) - before[pid], 2) for pid in pids}
    return load, cpu


# --- the two measurements -----------------------------------------------------------------

def throughput(label: str, env: dict[str, str], sizes: dict[str, Any], tmp: str,
               target: float | None, baseline: tuple[str, str] | None = None) -> list[Result]:
    """The three ratios; with ``baseline`` (commit, exported tree) also that code's, served by
    a third gunicorn in the same rounds (before/after in one run)."""
    seconds, rounds = sizes["seconds"], sizes["rounds"]
    keys = list(PATHS) + ([f"{key}@base" for key in PATHS if key != "bare"] if baseline else [])
    loads: dict[str, list[Load]] = {key: [] for key in keys}
    cpu_per_request: dict[str, list[float]] = {key: [] for key in keys}
    splits: dict[str, list[str]] = {key: [] for key in keys}
    with contextlib.ExitStack() as stack:
        bare = stack.enter_context(gunicorn("bare", "bench.bare_app:app", "/bare", env, None, tmp))
        app = stack.enter_context(gunicorn("app", "wsgi:app", "/api/queue/stats", env, None, tmp))
        servers = {key: bare if key == "bare" else app for key in PATHS}
        if baseline:
            old = stack.enter_context(gunicorn("baseline", "wsgi:app", "/api/queue/stats", env,
                                               None, tmp, root=baseline[1]))
            servers |= {f"{key}@base": old for key in PATHS if key != "bare"}
        for key, server in servers.items():
            run_duration(server, 3, PATHS[key.split("@")[0]])  # warm-up: imports, pools
        # Alternating rounds: a change in the machine's load hits both sides alike.
        for n in range(rounds):
            for key, server in servers.items():
                load, cpu = run_duration(server, seconds, PATHS[key.split("@")[0]])
                log(f"{label} round {n + 1} {key}: {load.rps:.0f} req/s, p50 {load.p50_ms} ms, "
                    f"p99 {load.p99_ms} ms, cpu {cpu}, statuses {load.statuses}, "
                    f"load avg {os.getloadavg()[0]:.1f}")
                if load.errors or load.statuses.get("non-2xx/3xx"):
                    raise RuntimeError(f"{label} {key}: failed requests {load}")
                loads[key].append(load)
                cpu_per_request[key].append(sum(cpu.values()) * 1000 / max(1, load.requests))
                workers = [cpu[str(pid)] for pid in server.workers]
                splits[key].append("/".join(f"{100 * c / max(sum(workers), 1e-9):.0f}"
                                            for c in workers))
    results = []
    names = {"bare": "bare Flask JSON endpoint (bench/bare_app.py)"} | {
        key: f"GET {path}" for key, path in PATHS.items() if key != "bare"}
    for key in PATHS:
        rates = [load.rps for load in loads[key]]
        results.append(Result(
            name=f"HTTP throughput, {names[key]}, {label}", value=round(statistics.median(rates)),
            unit="requests/s", higher_is_better=True,
            notes=f"gunicorn -c gunicorn.conf.py, {GENERATOR}, median of {rounds} x {seconds} s",
            extra={"rounds": [round(r) for r in rates],
                   "p50_ms": statistics.median(load.p50_ms for load in loads[key]),
                   "p99_ms": statistics.median(load.p99_ms for load in loads[key]),
                   "server_cpu_ms_per_req": round(statistics.median(cpu_per_request[key]), 3),
                   "worker_cpu_split_pct": splits[key]}))
    ratios = [a.rps / b.rps for a, b in zip(loads["app"], loads["bare"], strict=True)]
    ratio = results[1].value / results[0].value
    results.append(Result(
        name=f"HTTP throughput ratio, /api/queue/stats : bare Flask, {label}",
        value=round(ratio, 3), unit="x", target=target, higher_is_better=True,
        notes=f"same gunicorn settings, same run; rate limiter on ({RATELIMIT})",
        extra={"round_ratios": [round(r, 3) for r in ratios],
               # gunicorn CPU per request, bare / app: what the ratio tends to when the server
               # alone is CPU bound (without the database's and the client's share).
               "server_cpu_ratio": round(results[0].extra["server_cpu_ms_per_req"]
                                         / results[1].extra["server_cpu_ms_per_req"], 3),
               "load_avg_1m": round(os.getloadavg()[0], 1)}))
    for n, key in enumerate(("stats", "page"), start=2):
        # The same figure for the other read paths (information: API.md §13 names queue stats).
        ratios = [a.rps / b.rps for a, b in zip(loads[key], loads["bare"], strict=True)]
        results.append(Result(
            name=f"HTTP throughput ratio, {PATHS[key]} : bare Flask, {label}",
            value=round(results[n].value / results[0].value, 3), unit="x",
            notes="same gunicorn, same rounds as the queue stats",
            extra={"round_ratios": [round(r, 3) for r in ratios],
                   "load_avg_1m": round(os.getloadavg()[0], 1)}))
    if baseline:
        for key in PATHS:
            if key == "bare":
                continue
            ratios = [a.rps / b.rps for a, b in zip(loads[f"{key}@base"], loads["bare"],
                                                    strict=True)]
            cpu = statistics.median(cpu_per_request[f"{key}@base"])
            rate = statistics.median(load.rps for load in loads[f"{key}@base"])
            results.append(Result(
                name=f"HTTP throughput ratio, {PATHS[key]} : bare Flask, {label}, "
                     f"baseline {baseline[0]}",
                value=round(rate / results[0].value, 3), unit="x",
                notes="the baseline's code, same bare server and rounds (median rates, as above)",
                extra={"round_ratios": [round(r, 3) for r in ratios],
                       "requests_per_s": round(rate),
                       "server_cpu_ms_per_req": round(cpu, 3),
                       "load_avg_1m": round(os.getloadavg()[0], 1)}))
    return results


def request_mix(port: int, admin_key: str) -> list[Request]:
    """What an admin UI and a monitoring system send, errors included."""
    status, headers, body = http_get(port, "/api/queue/all?limit=50")
    if status != 200:
        raise RuntimeError(f"/api/queue/all: {status} {body[:200]!r}")
    link = headers.get("Link", "")
    deep = link[link.index("?") + 1:link.index(">")] if "?" in link else "limit=50"
    _, _, body = http_get(port, "/api/queue/pending?limit=2")
    ids = [m["id"] for m in json.loads(body)] or ["nonexistent"]
    admin = {"X-API-Key": admin_key}
    get: list[Request] = [("GET", path, {}, None) for path in (
        "/api/queue/stats",
        "/api/queue/all?limit=100",
        "/api/queue/stats",
        f"/api/queue/all?{deep}",
        "/api/queue/pending?limit=20",
        "/api/stats/delivery?timeScale=hour",
        "/api/queue/stats",
        "/api/queue/deferred?limit=50",
        "/api/logs/messages?limit=100",
        "/api/health",
        "/api/queue/held",
        "/api/stats/delivery?timeScale=day",
        "/api/queue/stats",
        "/api/logs/messages?limit=50&event_type=rejection",
        f"/api/queue/message/{ids[0]}",
        "/api/queue/failed?limit=100",
        "/api/stats/delivery?timeScale=week",
        "/api/queue/message/doesnotexist",  # 404
        "/api/no/such/route",  # 404
        "/api/queue/bogus",  # 400 unknown queue type
        "/api/stats/delivery?timeScale=century",  # 422/400 validation
        "/api/queue/all?limit=0",  # validation
        "/api/stats/delivery?timeScale=month",
        "/api/queue/stats",
    )]
    actions: list[Request] = [
        ("POST", f"/api/queue/message/{ids[-1]}/hold", admin, ""),
        ("POST", f"/api/queue/message/{ids[-1]}/release", admin, ""),
        ("GET", "/api/queue/stats", {"X-API-Key": "wrong-key"}, None),  # 401
        ("POST", f"/api/queue/message/{ids[0]}/hold", {}, ""),  # 401: no key
        ("GET", "/metrics", {}, None),
    ]
    return get + actions


def memory(label: str, env: dict[str, str], admin_key: str, total: int, tmp: str,
           target: float, growth_target: float) -> list[Result]:
    step = total // 10
    samples: dict[int, float] = {}
    statuses: dict[str, int] = {}
    rates: list[float] = []
    with gunicorn("memory", "wsgi:app", "/livez", env, 1, tmp) as server:
        worker = server.workers[0]
        mix = request_mix(server.port, admin_key)
        # A few requests of the mix are made above (the cursor, the ids): sample 0 follows them.
        samples[0] = rss_mb(worker)
        for done in range(step, total + 1, step):
            if HAVE_WRK:
                load = wrk_count(f"http://127.0.0.1:{server.port}", mix, step, tmp)
            else:
                load = python_load(server.port, mix, count=step)
            if children(server.process.pid) != [worker]:
                raise RuntimeError("the gunicorn worker was replaced during the memory run")
            samples[done] = rss_mb(worker)
            rates.append(load.rps)
            for status, n in load.statuses.items():
                if status != "non-2xx/3xx":  # wrk's own sum of the error statuses below
                    statuses[status] = statuses.get(status, 0) + n
            log(f"{label} memory: {done} requests, worker RSS {samples[done]:.1f} MB, "
                f"{load.rps:.0f} req/s, errors {load.errors}, load avg {os.getloadavg()[0]:.1f}")
    half = total // 2
    shown = {f"rss_{n // 1000}k_mb": round(samples[n], 1) for n in (0, step, half, total)}
    notes = (f"one gthread worker, {CONNECTIONS} keep-alive connections, mix of {len(mix)} "
             f"requests cycled; {GENERATOR}")
    growth = samples[total] - samples[half]
    return [
        Result(name=f"API worker RSS after {total // 1000}k requests, {label}",
               value=round(samples[total], 1), unit="MB", target=target, notes=notes,
               extra=shown | {"statuses": dict(sorted(statuses.items())),
                              "mix_req_per_s": round(statistics.median(rates))}),
        Result(name=f"API worker RSS growth {half // 1000}k -> {total // 1000}k requests, {label}",
               value=round(growth, 2), unit="MB", target=growth_target,
               notes=f"tolerance {GROWTH_TOLERANCE_MB} MB for allocator noise",
               extra={"all_samples_mb": [round(samples[n], 1) for n in sorted(samples)],
                      "load_avg_1m": round(os.getloadavg()[0], 1)}),
    ]


def export_baseline(commit: str, tmp: str) -> str:
    """``commit``'s code tree (``git archive``), to serve next to the working tree's; a
    directory is taken as such a tree."""
    if os.path.isdir(commit):
        return commit
    tree = os.path.join(tmp, "baseline")
    os.makedirs(tree)
    archive = subprocess.run(["git", "-C", ROOT, "archive", commit], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
    return tree


def measure(label: str, url: str, sizes: dict[str, Any], primary: bool) -> list[Result]:
    """Throughput on every database; the memory run (minutes) on the target's only.

    ``ELEMTA_BENCH_BASELINE=<commit or code tree>``: that app is measured too, in the same rounds
    (its schema must be the working tree's: the database is migrated by the working tree).
    ``ELEMTA_BENCH_HTTP_MEMORY=false`` skips the memory run.
    """
    key = prepare(url, sizes)
    env = base_env(url)
    commit = os.environ.get("ELEMTA_BENCH_BASELINE")
    with tempfile.TemporaryDirectory(prefix="elemta-bench-http-") as tmp:
        baseline = (commit, export_baseline(commit, tmp)) if commit else None
        results = throughput(label, env, sizes, tmp, RATIO_TARGET if primary else None,
                             baseline)
        if primary and os.environ.get("ELEMTA_BENCH_HTTP_MEMORY", "true") != "false":
            results += memory(label, env, key, sizes["requests"], tmp, RSS_TARGET_MB,
                              GROWTH_TOLERANCE_MB)
    return results


def run(options: Any) -> list[Result]:
    sizes = SIZES[getattr(options, "scale", "small")]
    log(f"load generator: {GENERATOR}")
    results = []
    # API.md §13 names PostgreSQL; SQLite is reported for information.
    given = getattr(options, "database_url", None) or os.environ.get("ELEMTA_BENCH_DATABASE_URL")
    with postgres_database(given, "http") as url:
        results.extend(measure("PostgreSQL", url, sizes, primary=True))
    with tempfile.TemporaryDirectory(prefix="elemta-bench-http-db-") as tmp:
        results.extend(measure("SQLite", f"sqlite:///{tmp}/bench.db", sizes, primary=False))
    return results

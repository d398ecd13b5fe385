"""Shared pieces of the benchmark: timing, percentiles, results, the report."""

from __future__ import annotations

import json
import os
import socket
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg
import sqlalchemy as sa

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")
DEFAULT_PG_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _admin_dsn(url: str) -> str:
    return sa.make_url(url).set(drivername="postgresql", database="postgres").render_as_string(
        hide_password=False)


@contextmanager
def postgres_database(given: str | None, label: str) -> Iterator[str]:
    """``given``, or a database created for the run (``ELEMTA_BENCH_PG_SERVER``) and dropped."""
    if given:
        yield given
        return
    server = os.environ.get("ELEMTA_BENCH_PG_SERVER", DEFAULT_PG_SERVER)
    name = f"elemta_bench_{label}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(_admin_dsn(server), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield sa.make_url(server).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(_admin_dsn(server), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class Result:
    """One measured figure against its target (``target`` None: for information only)."""

    name: str
    value: float
    unit: str
    target: float | None = None
    higher_is_better: bool = False
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        if self.target is None:
            return "info"
        ok = self.value >= self.target if self.higher_is_better else self.value <= self.target
        return "PASS" if ok else "FAIL"


def percentile(samples: list[float], pct: float) -> float:
    ordered = sorted(samples)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[index]


def time_calls(call: Callable[[], Any], repeat: int = 200, warmup: int = 10) -> list[float]:
    """Wall-clock milliseconds of ``repeat`` calls after ``warmup`` unmeasured ones."""
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def latency_results(name: str, samples: list[float], p95_target: float | None,
                    notes: str = "") -> Result:
    return Result(name=name, value=round(percentile(samples, 95), 2), unit="ms p95",
                  target=p95_target, notes=notes,
                  extra={"p50": round(statistics.median(samples), 2),
                         "max": round(max(samples), 2), "n": len(samples)})


def report(results: list[Result], title: str) -> str:
    lines = [f"## {title}", "", "| measurement | value | target | verdict | notes |",
             "|---|---|---|---|---|"]
    for r in results:
        target = "-" if r.target is None else (
            f">= {r.target}" if r.higher_is_better else f"<= {r.target}")
        extra = ", ".join(f"{k} {v}" for k, v in r.extra.items())
        notes = "; ".join(x for x in (r.notes, extra) if x)
        lines.append(f"| {r.name} | {r.value} {r.unit} | {target} | {r.verdict} | {notes} |")
    return "\n".join(lines)


def save(results: list[Result], label: str) -> str:
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"{label}-{time.strftime('%Y%m%dT%H%M%S')}.json")
    with open(path, "w") as fh:
        json.dump([asdict(r) | {"verdict": r.verdict} for r in results], fh, indent=2)
    return path

"""Run the benchmark suites: ``python -m bench [suite ...] [--database-url URL] [--scale S]``.

Each suite is a module ``bench/suite_<name>.py`` with ``run(options) -> list[Result]``. With no
suite named, every suite runs. ``--scale full`` uses the data sizes of API.md §13 (ten
million events, a million queued messages: minutes of seeding on PostgreSQL); the default
``small`` scale checks the machinery quickly.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
import time

import bench
from bench.common import report, save


def suites() -> list[str]:
    return sorted(m.name[len("suite_"):] for m in pkgutil.iter_modules(bench.__path__)
                  if m.name.startswith("suite_"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suites", nargs="*", help=f"any of: {', '.join(suites())}")
    parser.add_argument("--database-url", default=None,
                        help="database to benchmark (default: ELEMTA_BENCH_DATABASE_URL, else a "
                             "fresh PostgreSQL database on 127.0.0.1 created for the run)")
    parser.add_argument("--scale", choices=("small", "full"), default="small")
    options = parser.parse_args(argv)
    chosen = options.suites or suites()
    unknown = set(chosen) - set(suites())
    if unknown:
        parser.error(f"unknown suite(s): {', '.join(sorted(unknown))}")
    failed = False
    elapsed: dict[str, float] = {}
    started = time.monotonic()
    for name in chosen:
        module = importlib.import_module(f"bench.suite_{name}")
        start = time.monotonic()
        results = module.run(options)
        elapsed[name] = time.monotonic() - start
        print(report(results, f"{name} ({options.scale})"), flush=True)
        print(f"saved: {save(results, name)}", flush=True)
        print(f"{name}: {duration(elapsed[name])}\n", flush=True)
        failed = failed or any(r.verdict == "FAIL" for r in results)
    print(timings(elapsed, time.monotonic() - started), flush=True)
    return 1 if failed else 0


def duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}:{rest:02d} ({seconds:.1f} s)"


def timings(elapsed: dict[str, float], total: float) -> str:
    """Each suite's wall-clock time, longest first, then the total and the load average (the
    figures are only comparable between runs on an equally loaded machine)."""
    lines = ["## time per suite", "", "| suite | elapsed |", "|---|---|"]
    lines += [f"| {name} | {duration(seconds)} |"
              for name, seconds in sorted(elapsed.items(), key=lambda item: -item[1])]
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    lines += [f"| **total** | **{duration(total)}** |", "", f"load average at the end: {load}"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

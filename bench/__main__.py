"""Run the benchmark suites: ``python -m bench [suite ...] [--database-url URL] [--scale S]``.

Each suite is a module ``bench/suite_<name>.py`` with ``run(options) -> list[Result]``. With no
suite named, every suite runs. ``--scale full`` uses the data sizes of API.md §13 (ten
million events, a million queued messages: minutes of seeding on PostgreSQL); the default
``small`` scale checks the machinery quickly.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

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
    for name in chosen:
        module = importlib.import_module(f"bench.suite_{name}")
        results = module.run(options)
        print(report(results, f"{name} ({options.scale})"), flush=True)
        print(f"saved: {save(results, name)}\n", flush=True)
        failed = failed or any(r.verdict == "FAIL" for r in results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

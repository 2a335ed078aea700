"""`make bench`: every benchmark in one run, each printing ratios against a named reference.

Each module `bench/<name>.py` exposes `run(args) -> list[str]` (report lines). Select with
`make bench BENCH_ARGS="conntrack table"`; default: all. Benchmarks needing root skip with a reason.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time

import bench


def main(argv: list[str]) -> int:
    names = argv or sorted(m.name for m in pkgutil.iter_modules(bench.__path__) if not m.name.startswith("_"))
    failed = 0
    for name in names:
        mod = importlib.import_module(f"bench.{name}")
        print(f"== bench {name}: {(mod.__doc__ or '').strip().splitlines()[0]}", flush=True)
        t0 = time.monotonic()
        try:
            for line in mod.run(argv):
                print(f"  {line}", flush=True)
        except Exception as e:  # report and continue with the other benchmarks
            failed += 1
            print(f"  FAILED: {type(e).__name__}: {e}", flush=True)
        print(f"  ({time.monotonic() - t0:.1f} s)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""`conntrack-dns-exporter record`: capture this namespace's conntrack statistics and table dump as one
fixture file (the format of `exporter.core.fixtures`), to replay with `--collector.conntrack.fixtures`
and `--collector.table.fixtures` on any machine, without root. Run it where the problem is (as root or
with CAP_NET_ADMIN, e.g. `kubectl exec` into the exporter pod) and attach the file to a bug report.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from exporter.conntrack.fixtures import Recorder
from exporter.core import fixtures
from exporter.core.errors import ExporterError
from exporter.core.flags import Parser, duration, int_range
from exporter.table import fixtures as table_fixtures

PROG = "conntrack-dns-exporter record"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, allow_abbrev=False,
                description="Record the conntrack statistics (and one table dump) of this network namespace "
                            "into a fixture file that the exporter can replay.")
    p.add_argument("out", type=Path, help="Fixture file to write (JSON).")
    p.add_argument("--samples", type=int_range(1, 10000), default=1,
                   help="Statistics samples to take (several show counters growing; default 1).")
    p.add_argument("--interval", type=duration(0.01, 3600), default=1.0,
                   help="Time between statistics samples (default 1s).")
    p.add_argument("--table", action=argparse.BooleanOptionalAction, default=True,
                   help="Also record one whole table dump (default on).")
    p.add_argument("--description", default="", help="What was going on while recording.")
    return p


def record(out: Path, samples: int, interval: float, table: bool, description: str) -> dict[str, object]:
    rec = Recorder(description)
    try:
        for i in range(samples):
            if i:
                time.sleep(interval)
            rec.sample()
    finally:
        rec.close()
    data: dict[str, object] = rec.data()
    if table:
        data.update(table_fixtures.record())
    fixtures.write(out, data)
    return data


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        data = record(args.out, args.samples, args.interval, args.table, args.description)
    except ExporterError as e:
        sys.stderr.write(f"{PROG}: error: {e}\n")
        return 1
    except OSError as e:
        sys.stderr.write(f"{PROG}: error: cannot write {args.out}: {e.strerror}\n")
        return 2
    parts = [f"{args.samples} statistics sample(s)"]
    if args.table:
        parts.append(f"a table dump of {data['entries']} entries")
    print(f"recorded {' and '.join(parts)} to {args.out}")
    return 0

"""CLI: python -m tests.lab up|down|status|fault NAME ARGS...|heal NAME|demo (see docs/lab.md)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from tests.lab import faults
from tests.lab.topology import Lab, cleanup, validate_prefix

DEFAULT_PREFIX = "cdlabcli"


def _prefix(v: str) -> str:
    try:
        validate_prefix(v)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return v


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.lab", description="The DNS-path lab (docs/lab.md).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p_up = sub.add_parser("up", help="build a lab and leave it running")
    p_up.add_argument("--prefix", type=_prefix, default=DEFAULT_PREFIX)
    p_up.add_argument("--backends", type=int, default=2)
    p_up.add_argument("--no-nodelocal", action="store_true", help="no NodeLocal DNSCache analogue")
    p_down = sub.add_parser("down", help="remove every lab whose prefix starts with --prefix (also after a crash)")
    p_down.add_argument("--prefix", type=_prefix, default=DEFAULT_PREFIX)
    p_st = sub.add_parser("status", help="namespaces, daemons, faults and conntrack stats of a lab")
    p_st.add_argument("--prefix", type=_prefix, default=DEFAULT_PREFIX)
    p_f = sub.add_parser("fault", help=f"inject a fault: {', '.join(faults.NAMES)}")
    p_f.add_argument("--prefix", type=_prefix, default=DEFAULT_PREFIX)
    p_f.add_argument("name", choices=faults.NAMES)
    p_f.add_argument("args", nargs="*")
    p_h = sub.add_parser("heal", help="heal one fault, or `all`")
    p_h.add_argument("--prefix", type=_prefix, default=DEFAULT_PREFIX)
    p_h.add_argument("name", choices=[*faults.NAMES, "all"])
    p_d = sub.add_parser("demo", help="lab + exporter + Prometheus + Alertmanager with a live summary")
    p_d.add_argument("--scenario", default=None, help=f"a fault to walk through: {', '.join(faults.SCENARIOS)}")
    p_d.add_argument("--seconds", type=float, default=None, help="stop after this long (default: until Ctrl-C)")
    p_d.add_argument("--interval", type=float, default=float(os.environ.get("DEMO_INTERVAL", "5")),
                     help="seconds between summaries (env DEMO_INTERVAL; default 5)")
    a = ap.parse_args(argv)

    try:
        if a.cmd == "up":
            lab = Lab.up(prefix=a.prefix, backends=a.backends, nodelocal=not a.no_nodelocal)
            print(json.dumps(lab.status(), indent=1))
            print(f"lab {a.prefix} is up; `python -m tests.lab down --prefix {a.prefix}` removes it")
        elif a.cmd == "down":
            removed = cleanup(a.prefix)
            print("\n".join(removed) if removed else f"nothing left by a lab with prefix {a.prefix}")
        elif a.cmd == "status":
            print(json.dumps(Lab.attach(a.prefix).status(), indent=1))
        elif a.cmd == "fault":
            lab = Lab.attach(a.prefix)
            r = lab.fault(a.name, *a.args)
            if a.name == "race":  # the race lives on this process's threads: run it here until done or Ctrl-C
                if not a.args:
                    print("race running until Ctrl-C", file=sys.stderr)
                try:
                    res = r.wait()
                except KeyboardInterrupt:
                    res = r.stop()
                lab.faults.pop("race", None)
                lab._save()
                print(f"race: {res.pairs} pairs, {res.answers} answers, {res.lost} lost; node conntrack: "
                      f"{ {k: v for k, v in lab.ct_stats().items() if k in ('clash_resolve', 'insert_failed')} }")
            elif a.name == "table-full":
                print(f"node conntrack table now holds {r} entries (max {faults.conntrack_max()})")
            else:
                print(f"fault {a.name} {' '.join(a.args)} injected")
        elif a.cmd == "heal":
            lab = Lab.attach(a.prefix)
            if a.name == "all":
                lab.heal_all()
            else:
                lab.heal(a.name)
            print(f"healed {a.name}")
        elif a.cmd == "demo":
            from tests.lab.demo import run_demo

            return run_demo(scenario=a.scenario, seconds=a.seconds, interval=a.interval)
    except (ValueError, RuntimeError) as e:
        print(f"lab: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

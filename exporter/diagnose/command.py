"""`conntrack-dns-exporter diagnose`: the node's DNS path checked in about six seconds, with a verdict.

    kubectl exec -n <namespace> <exporter pod> -- conntrack-dns-exporter diagnose [--output json]

It takes the running exporter's own discovery and probe flags (same names, same defaults, same
environment twins), so it looks where the exporter looks. Exit status: 0 healthy, 1 degraded, 2 broken
(and, as for every command of this program, 2 with one `error:` line for a bad flag), 3 when nothing
could be checked.
"""

from __future__ import annotations

import argparse
import sys
import time

from exporter.core import logs
from exporter.core.errors import ExporterError
from exporter.core.flags import Parser, add_flag
from exporter.diagnose import checks, report
from exporter.diagnose.verdict import RUNBOOK_BASE_URL, decide
from exporter.dns.feature import FEATURE as DNS
from exporter.dns.feature import probe_name
from exporter.kubernetes.feature import FEATURE as KUBERNETES

PROG = "conntrack-dns-exporter diagnose"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, allow_abbrev=False,
                description="Check this node's DNS path (conntrack, table, every DNS server in every mode, the "
                            "DNS Service's endpoints, resolv.conf, kube-proxy) and name the cause.")
    g = p.add_argument_group("diagnose")
    add_flag(g, "--output", default="text", choices=("text", "json"), help="Output format (JSON: docs/diagnose.md).")
    add_flag(g, "--diagnose.external-name", default="www.example.com.", type=probe_name, metavar="NAME",
             help="An external name to resolve through every server (tells an upstream outage apart).")
    add_flag(g, "--diagnose.pod-resolv-conf", default="", metavar="PATH",
             help="A pod's resolv.conf to judge (default: what the kubelet writes for a ClusterFirst pod).")
    add_flag(g, "--diagnose.cluster-domain", default="cluster.local", metavar="DOMAIN",
             help="The cluster domain of the kubelet's pod resolv.conf.")
    add_flag(g, "--diagnose.kube-proxy-url", default="http://127.0.0.1:10249/metrics", metavar="URL",
             help="kube-proxy's metrics endpoint on the node (empty: skip the check).")
    add_flag(g, "--diagnose.runbook-base-url", default=RUNBOOK_BASE_URL, metavar="URL",
             help="Where the runbooks are (the same base as the alerts' runbook_url).")
    add_flag(g, "--log.level", default="warn", choices=logs.LEVELS, help="Log level (stderr).")
    KUBERNETES.add_arguments(p)
    DNS.add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.setup(args.log_level, "logfmt")
    start = time.monotonic()
    try:
        ev = checks.run(args, checks.Budget())
    except ExporterError as e:
        sys.stderr.write(f"{PROG}: error: {e}\n")
        return 3
    verdict = decide(ev, args.diagnose_runbook_base_url)
    duration = time.monotonic() - start
    out = report.dumps(verdict, ev, duration) + "\n" if args.output == "json" else report.text(verdict, ev, duration)
    sys.stdout.write(out)
    return report.status_and_code(verdict, ev)[1]

#!/usr/bin/env python3
"""The one source of truth for the exporter's alerting rules.

Writes the plain Prometheus rule file (`alerts/conntrack-dns-exporter.rules.yaml`), the same groups
wrapped in a prometheus-operator `PrometheusRule` (`deploy/components/prometheusrule/prometheusrule.yaml`),
and the Helm chart's copy of the rule file (`deploy/helm/conntrack-dns-exporter/files/`), which the chart's
PrometheusRule template renders with its own job and runbook base URL.
`--check` regenerates in memory and exits 1 if a committed file differs (the unit tests run it).

The job selector lives in one place (`--job`, default `conntrack-dns-exporter`, the name the ServiceMonitor
gives the job); `--runbook-base-url` points `runbook_url` somewhere else (e.g. an internal wiki mirror).
Other code (the end-to-end test) imports `render_groups()` to get a copy with a shortened `for`.

    python scripts/gen_alerts.py            # rewrite both files
    python scripts/gen_alerts.py --check    # fail if they are stale
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
RULES_FILE = ROOT / "alerts" / "conntrack-dns-exporter.rules.yaml"
PROMETHEUS_RULE_FILE = ROOT / "deploy" / "components" / "prometheusrule" / "prometheusrule.yaml"
# The Helm chart's copy of the rule file (its PrometheusRule template reads it; charts cannot read outside).
CHART_RULES_FILE = ROOT / "deploy" / "helm" / "conntrack-dns-exporter" / "files" / "conntrack-dns-exporter.rules.yaml"

DEFAULT_JOB = "conntrack-dns-exporter"
RUNBOOK_BASE_URL = "https://github.com/conntrack-dns-exporter/conntrack-dns-exporter/blob/main/docs/runbooks/"

# Labels every per-node aggregation keeps. `node` is added by the ServiceMonitor's relabeling (and by the
# scrape config in docs/deploy.md); where it is missing, `instance` (the node's IP, hostNetwork) names it.
NODE_LABELS = "job, instance, node"
NODE = '{{ if $labels.node }}{{ $labels.node }}{{ else }}{{ $labels.instance }}{{ end }}'

# Conntrack thresholds (fraction of nf_conntrack_max) and DNS thresholds from the field's diagnosis checklist.
TABLE_CRITICAL = 0.90
TABLE_WARNING = 0.75
PROBE_FAILURE_RATIO = 0.01
PROBE_P99_SECONDS = 0.5


def _or_zero(metric: str, sel: str, by: str, window: str, requests_sel: str) -> str:
    """`sum by (...) (increase(metric))`, or 0 where the counter has no series yet but probes ran.

    Failure/retry counters carry a `reason`/`qtype` and are created on first use; without this an absent
    failure series would make a ratio vanish instead of being 0."""
    return (f"(sum by ({by}) (increase({metric}{{{sel}}}[{window}]))"
            f" or sum by ({by}) (increase(dns_probe_requests_total{{{requests_sel}}}[{window}])) * 0)")


ENDPOINT_QUERIES = "dns_probe_endpoint_queries_total"
ENDPOINT_FAILED = 'result!~"ok|retried"'


def _endpoint_failure_ratio(sel: str, by: str, window: str) -> str:
    """Failed share of the sampled endpoints' queries (issue 17: results only, no per mode/qtype series);
    0 where every query succeeded (the failure results do not exist then)."""
    total = f"sum by ({by}) (increase({ENDPOINT_QUERIES}{{{sel}}}[{window}]))"
    return (f"(sum by ({by}) (increase({ENDPOINT_QUERIES}{{{sel}, {ENDPOINT_FAILED}}}[{window}])) or {total} * 0)\n"
            f"  / {total}")


def rules(job: str, runbook_base_url: str) -> list[dict[str, Any]]:
    """The alert definitions, as (group name, rules) pairs in rule-file form."""
    s = f'job="{job}"'

    def alert(name: str, expr: str, for_: str, severity: str, summary: str, description: str) -> dict[str, Any]:
        rule: dict[str, Any] = {"alert": name, "expr": expr}
        if for_ != "0m":
            rule["for"] = for_
        rule["labels"] = {"severity": severity}
        rule["annotations"] = {
            "summary": summary,
            "description": description,
            "runbook_url": f"{runbook_base_url}{name}.md",
        }
        return rule

    table = [
        alert("ConntrackTableNearFull",
              f"conntrack_entries{{{s}}} / conntrack_entries_limit{{{s}}} > {TABLE_CRITICAL}",
              "5m", "critical",
              "Conntrack table almost full: new connections and DNS queries are about to be dropped.",
              f"The conntrack table on node {NODE} is {{{{ $value | humanizePercentage }}}} full "
              f"(alert above {TABLE_CRITICAL:.0%}). At 100% the kernel drops every packet that needs a new "
              "entry, including DNS queries, which then time out after 5 seconds."),
        alert("ConntrackTableFilling",
              f"conntrack_entries{{{s}}} / conntrack_entries_limit{{{s}}} > {TABLE_WARNING}",
              "15m", "warning",
              "Conntrack table filling up.",
              f"The conntrack table on node {NODE} has been above {TABLE_WARNING:.0%} for 15 minutes; "
              "it is {{ $value | humanizePercentage }} full now."),
        alert("ConntrackInsertFailed",
              f"sum without (cpu) (increase(conntrack_stat_insert_failed_total{{{s}}}[5m])) > 0",
              "0m", "warning",
              "Conntrack insertions are failing: packets are being lost (the UDP DNAT race).",
              f"Node {NODE} failed to insert {{{{ $value | humanize }}}} conntrack entries in the last 5 minutes. "
              "Each failure drops a packet; for parallel A/AAAA DNS lookups through the DNS Service IP that is "
              "a 5-second delay for the application."),
        alert("ConntrackDroppingPackets",
              f"sum without (cpu) (increase(conntrack_stat_drop_total{{{s}}}[5m])) > 0",
              "0m", "critical",
              "Conntrack is dropping packets because the table is full.",
              f"Node {NODE} dropped {{{{ $value | humanize }}}} packets in the last 5 minutes because no "
              "conntrack entry could be created. New connections and DNS queries on this node are failing."),
        alert("ConntrackClashResolving",
              f"sum without (cpu) (increase(conntrack_stat_clash_resolve_total{{{s}}}[10m])) > 0",
              "5m", "info",
              "The parallel UDP insert race is happening and the kernel is resolving it.",
              f"Node {NODE} resolved {{{{ $value | humanize }}}} conntrack insert clashes in the last 10 minutes "
              "(clash_resolve). This kernel repairs the A/AAAA race; older kernels would have lost those packets."),
    ]

    by_target = f"{NODE_LABELS}, server, kind"
    ratio_failures = (f"{_or_zero('dns_probe_failures_total', s, by_target, '10m', s)}\n"
                      f"  / sum by ({by_target}) (increase(dns_probe_requests_total{{{s}}}[10m]))")
    svc = f'{s}, kind="service"'
    ep = f'{s}, kind="endpoint"'
    par = f'{s}, mode="parallel"'
    by_par = f"{NODE_LABELS}, server, kind"
    dns = [
        alert("DNSProbeFailures",
              f"(\n{ratio_failures}\n) > {PROBE_FAILURE_RATIO}\nor\n"
              f"(\n{_endpoint_failure_ratio(ep, by_target, '10m')}\n) > {PROBE_FAILURE_RATIO}",
              "5m", "warning",
              "DNS probes to a server are failing.",
              f"{{{{ $value | humanizePercentage }}}} of the DNS probes from node {NODE} to "
              "{{ $labels.server }} (kind {{ $labels.kind }}) failed over the last 10 minutes "
              f"(alert above {PROBE_FAILURE_RATIO:.0%})."),
        alert("DNSServiceIPPathBroken",
              "(\n"
              f"  {_or_zero('dns_probe_failures_total', svc, NODE_LABELS, '5m', svc)}\n"
              f"  + {_or_zero('dns_probe_retries_total', svc, NODE_LABELS, '5m', svc)}\n"
              f")\n  / sum by ({NODE_LABELS}) (increase(dns_probe_requests_total{{{svc}}}[5m]))\n"
              f"> {PROBE_FAILURE_RATIO}\n"
              f"and on ({NODE_LABELS})\n"
              f"  {_endpoint_failure_ratio(ep, NODE_LABELS, '5m')}\n"
              f"<= {PROBE_FAILURE_RATIO}",
              "5m", "critical",
              "DNS through the Service IP is broken on this node while the DNS pods answer directly.",
              f"On node {NODE}, {{{{ $value | humanizePercentage }}}} of DNS probes to the DNS Service IP failed "
              "or needed a retransmission in the last 5 minutes, while probes from the same node straight to the "
              "DNS endpoints succeed. The node's DNAT/conntrack path (kube-proxy rules or stale conntrack "
              "entries) is at fault, not CoreDNS."),
        alert("DNSProbeSlow",
              f"histogram_quantile(0.99,\n  sum by ({NODE_LABELS}, server, kind, mode, le) "
              f"(rate(dns_probe_duration_seconds_bucket{{{s}}}[5m]))\n) > {PROBE_P99_SECONDS}",
              "10m", "warning",
              "DNS lookups are slow.",
              f"The p99 DNS probe duration from node {NODE} to {{{{ $labels.server }}}} "
              "(kind {{ $labels.kind }}, mode {{ $labels.mode }}) is {{ $value | humanizeDuration }} "
              f"(alert above {PROBE_P99_SECONDS * 1000:.0f}ms)."),
        alert("DNSParallelQueryRetries",
              f"{_or_zero('dns_probe_partial_pairs_total', s, by_par, '10m', par)}\n"
              f"+ {_or_zero('dns_probe_retries_total', par, by_par, '10m', par)}\n"
              "> 0",
              "5m", "warning",
              "Parallel A/AAAA DNS lookups lose one answer and wait for a retransmission (5-second delays).",
              f"Probes from node {NODE} to {{{{ $labels.server }}}} (kind {{{{ $labels.kind }}}}) saw "
              "{{ $value | humanize }} lost halves of A/AAAA pairs or retransmitted queries in parallel mode over "
              "the last 10 minutes. Applications using glibc or musl defaults wait 5 seconds each time."),
    ]

    selfmon = [
        alert("ConntrackDNSExporterDown",
              f"up{{{s}}} == 0",
              "5m", "warning",
              "The conntrack/DNS exporter cannot be scraped.",
              f"Prometheus has not been able to scrape the exporter on node {NODE} for 5 minutes: the node's "
              "conntrack table and DNS path are unmonitored. A full conntrack table can itself cause this."),
        alert("ConntrackDNSExporterCollectorFailing",
              f"conntrack_dns_exporter_collector_success{{{s}}} == 0\n"
              f'or label_replace(conntrack_dns_exporter_kubernetes_up{{{s}}} == 0, '
              '"collector", "kubernetes", "", "")',
              "10m", "warning",
              "An exporter collector keeps failing.",
              f"The {{{{ $labels.collector }}}} collector of the exporter on node {NODE} has been failing for "
              "10 minutes; its metrics are missing or stale."),
    ]
    return [
        {"name": "conntrack-dns-exporter.conntrack", "rules": table},
        {"name": "conntrack-dns-exporter.dns", "rules": dns},
        {"name": "conntrack-dns-exporter.exporter", "rules": selfmon},
        {"name": "conntrack-dns-exporter.fleet", "rules": fleet_records(s)},
        {"name": "conntrack-dns-exporter.dnsflows", "rules": [dnsflows_backend_unanswered(s, alert)]},
    ]


# Fleet aggregation (issue 17) -------------------------------------------------------------------------------
# Each node probes only a sample of the CoreDNS endpoints, so one node's per-endpoint view is thin; these
# rules add the fleet up per endpoint across nodes and per node across endpoints. Sums of rates (not
# ratios) are recorded first so that a Thanos/Mimir ruler can sum them again across shards or clusters;
# the ratios divide two recorded sums. FLEET_LABELS is what the per-endpoint rules keep besides `server`
# (add `cluster` there when one ruler sees several clusters). See docs/scale.md.
FLEET_LABELS = "job"


def fleet_records(s: str) -> list[dict[str, Any]]:
    q = ENDPOINT_QUERIES
    node, srv = NODE_LABELS, f"{FLEET_LABELS}, server"
    out: list[dict[str, Any]] = []
    for level, by in (("node", node), ("server", srv)):
        out += [
            {"record": f"{level}:dns_probe_endpoint_queries:rate5m",
             "expr": f"sum by ({by}) (rate({q}{{{s}}}[5m]))"},
            {"record": f"{level}:dns_probe_endpoint_failures:rate5m",
             "expr": f"sum by ({by}) (rate({q}{{{s}, {ENDPOINT_FAILED}}}[5m]))"},
            {"record": f"{level}:dns_probe_endpoint_retries:rate5m",
             "expr": f'sum by ({by}) (rate({q}{{{s}, result="retried"}}[5m]))'},
            {"record": f"{level}:dns_probe_endpoint_failures:ratio_rate5m",
             "expr": f"(\n  {level}:dns_probe_endpoint_failures:rate5m{{{s}}}\n"
                     f"  or {level}:dns_probe_endpoint_queries:rate5m{{{s}}} * 0\n)\n"
                     f"/ {level}:dns_probe_endpoint_queries:rate5m{{{s}}}"},
        ]
    out += [
        {"record": "server_result:dns_probe_endpoint_failures:rate5m",
         "expr": f"sum by ({srv}, result) (rate({q}{{{s}, {ENDPOINT_FAILED}}}[5m]))"},
        {"record": "server:dns_probe_endpoint_probing_nodes:count5m",
         "expr": f"count by ({srv}) (\n  sum by ({srv}, instance, node) (increase({q}{{{s}}}[5m])) > 0\n)"},
    ]
    return out


# DNSBackendUnanswered (issue 14): real pods' DNS flows, from conntrack events (exporter/dnsflows/).
FLOWS_UNANSWERED_RATIO = 0.10  # a backend leaving more than this share of its flows unanswered ...
FLOWS_ANSWERED_RATIO = 0.01  # ... while another backend of the same Service leaves at most this share
FLOWS_MIN = 20  # flows a backend must have had in the window to be judged at all


def dnsflows_backend_unanswered(s: str, alert: Any) -> dict[str, Any]:
    """On one node, one backend behind the DNS Service IP leaves real flows unanswered while another one
    answers (a dead or overloaded CoreDNS pod, a stale endpoint: the DNAT still sends it its share)."""
    by = f"{NODE_LABELS}, server_kind, backend"
    sel = f'{s}, server_kind="service", backend!="other"'
    flows = f"sum by ({by}) (increase(conntrack_dns_flows_total{{{sel}}}[10m]))"
    unanswered = (f"(sum by ({by}) (increase(conntrack_dns_unanswered_flows_total{{{sel}}}[10m]))\n"
                  f"   or {flows} * 0)")
    share = f"{unanswered}\n  / ({flows} >= {FLOWS_MIN})"
    return alert(
        "DNSBackendUnanswered",
        f"(\n  {share}\n) > {FLOWS_UNANSWERED_RATIO}\n"
        f"and on ({NODE_LABELS}, server_kind)\n"
        f"count by ({NODE_LABELS}, server_kind) (\n  (\n  {share}\n  ) <= {FLOWS_ANSWERED_RATIO}\n) > 0",
        "5m", "warning",
        "One DNS backend leaves real clients' queries unanswered while the others answer.",
        f"On node {NODE}, {{{{ $value | humanizePercentage }}}} of the pods' DNS flows that the DNAT sent to "
        "backend {{ $labels.backend }} (behind the DNS Service IP) over the last 10 minutes were never "
        "answered, while another backend of the same Service answered (nearly) all of its own (alert above "
        f"{FLOWS_UNANSWERED_RATIO:.0%}). A CoreDNS pod that is down, overloaded or gone (stale endpoint) still "
        "gets its share of the queries.")


_DURATION = re.compile(r"^(\d+)([smh])$")
_RANGE = re.compile(r"\[(\d+)([smh])\]")
_SECONDS = {"s": 1, "m": 60, "h": 3600}


def _scaled(amount: str, unit: str, scale: float) -> str:
    return f"{max(1, round(int(amount) * _SECONDS[unit] * scale))}s"


def render_groups(job: str = DEFAULT_JOB, runbook_base_url: str = RUNBOOK_BASE_URL,
                  for_override: str | None = None, time_scale: float | None = None,
                  extra_labels: dict[str, str] | None = None, group_prefix: str = "") -> list[dict[str, Any]]:
    """Rule groups. For tests that cannot wait minutes: `for_override` replaces every non-zero `for`;
    `time_scale` multiplies every `for` and every range window (1/60: 5m -> 5s), so the same rules pend, fire
    and resolve in seconds against a fast-scraping Prometheus; `extra_labels`/`group_prefix` tell such a copy
    apart when it is loaded next to the shipped rules."""
    groups = rules(job, runbook_base_url)
    for g in groups:
        g["name"] = group_prefix + g["name"]
        for r in g["rules"]:
            if time_scale is not None:
                r["expr"] = _RANGE.sub(lambda m: f"[{_scaled(m.group(1), m.group(2), time_scale)}]", r["expr"])
                if "for" in r:
                    m = _DURATION.match(r["for"])
                    assert m, r["for"]
                    r["for"] = _scaled(m.group(1), m.group(2), time_scale)
            if for_override is not None and "for" in r:
                r["for"] = for_override
            if extra_labels:
                r["labels"] = {**r.get("labels", {}), **extra_labels}
    return groups


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str)

HEADER = "# Generated by scripts/gen_alerts.py from its rule definitions: edit that file, then run it.\n"


def dump(doc: Any) -> str:
    return HEADER + yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=1000, default_flow_style=False)


def rule_file_text(groups: list[dict[str, Any]]) -> str:
    return dump({"groups": groups})


def prometheus_rule_text(groups: list[dict[str, Any]]) -> str:
    return dump({
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "conntrack-dns-exporter",
            "namespace": "conntrack-dns-exporter",
            "labels": {"app.kubernetes.io/name": "conntrack-dns-exporter",
                       "app.kubernetes.io/component": "alerting"},
        },
        "spec": {"groups": groups},
    })


def outputs(job: str = DEFAULT_JOB, runbook_base_url: str = RUNBOOK_BASE_URL) -> dict[Path, str]:
    groups = render_groups(job, runbook_base_url)
    return {RULES_FILE: rule_file_text(groups), PROMETHEUS_RULE_FILE: prometheus_rule_text(groups),
            # Always the defaults: the chart substitutes its own job and runbook base URL for these.
            CHART_RULES_FILE: rule_file_text(render_groups())}


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--job", default=DEFAULT_JOB, help="value of the job label the rules select")
    p.add_argument("--runbook-base-url", default=RUNBOOK_BASE_URL, help="prefix of every runbook_url")
    p.add_argument("--check", action="store_true", help="exit 1 if the committed files are not up to date")
    a = p.parse_args(argv)
    stale = []
    for path, text in outputs(a.job, a.runbook_base_url).items():
        current = path.read_text() if path.exists() else None
        if current == text:
            continue
        if a.check:
            stale.append(_shown(path))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {_shown(path)}")
    if stale:
        print(f"stale generated rules: {', '.join(stale)}; run python scripts/gen_alerts.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

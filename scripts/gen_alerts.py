#!/usr/bin/env python3
"""The one source of truth for the exporter's alerting rules and their inhibition.

Writes the plain Prometheus rule file (`alerts/conntrack-dns-exporter.rules.yaml`), the same groups
wrapped in a prometheus-operator `PrometheusRule` (`deploy/components/prometheusrule/prometheusrule.yaml`),
the Helm chart's copy of the rule file (`deploy/helm/conntrack-dns-exporter/files/`), which the chart's
PrometheusRule template renders with its own job and runbook base URL, the Alertmanager `inhibit_rules` that
let a cause silence its symptoms (`alerts/alertmanager/inhibit-rules.yaml`) and the same inhibition as an
operator `AlertmanagerConfig` (`deploy/components/alertmanagerconfig/alertmanagerconfig.yaml`).
docs/alerts.md explains the cause model.
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
INHIBIT_FILE = ROOT / "alerts" / "alertmanager" / "inhibit-rules.yaml"
ALERTMANAGER_CONFIG_FILE = ROOT / "deploy" / "components" / "alertmanagerconfig" / "alertmanagerconfig.yaml"
# The Helm chart's copy of the rule file (its PrometheusRule template reads it; charts cannot read outside).
CHART_FILES = ROOT / "deploy" / "helm" / "conntrack-dns-exporter" / "files"
CHART_RULES_FILE = CHART_FILES / "conntrack-dns-exporter.rules.yaml"
CHART_ALERTMANAGER_CONFIG_FILE = CHART_FILES / "alertmanagerconfig.yaml"  # the chart's template reads its spec

DEFAULT_JOB = "conntrack-dns-exporter"
RUNBOOK_BASE_URL = "https://github.com/conntrack-dns-exporter/conntrack-dns-exporter/blob/main/docs/runbooks/"

# Labels every per-node aggregation keeps. `node` is added by the ServiceMonitor's relabeling (and by the
# scrape config in docs/deploy.md); where it is missing, `instance` (the node's IP, hostNetwork) names it.
# `namespace` (set by the prometheus-operator) is kept so the AlertmanagerConfig form of the inhibition,
# which the operator confines to its own namespace, matches these alerts; where it is absent it stays absent.
NODE_LABELS = "namespace, job, instance, node"
FLEET_LABELS = "namespace, job"
NODE = '{{ if $labels.node }}{{ $labels.node }}{{ else }}{{ $labels.instance }}{{ end }}'
POD = '{{ if $labels.pod }}{{ $labels.pod }}{{ else }}{{ $labels.server }}{{ end }}'

# Conntrack thresholds (fraction of nf_conntrack_max) from the field reports: alert at 90%, watch at 75%;
# "full" is what the kernel sees when it drops for want of a slot (sampled at scrape, so a little below 1).
TABLE_CRITICAL = 0.90
TABLE_WARNING = 0.75
TABLE_FULL = 0.98
# DNS thresholds. The field's checklist says SERVFAIL > 1% and p99 > 500 ms: the generic symptom alerts use
# exactly those. Cause alerts compare evidence and need their own margins (docs/alerts.md explains each).
PROBE_FAILURE_RATIO = 0.01         # DNSProbeFailures (symptom)
SLOW_SECONDS = 0.5                 # an answer slower than this is slow (p99 > 500 ms <=> more than 1% slow)
SLOW_RATIO = 0.05                  # "sustained": 5% of a 2-minute window (1% there is a single probe)
SLOW_BUCKET_LE = "0.5"
# Answers after a retransmission take at least --probe.timeout (5 s by default) and land above le="5.0": the
# slow-answer ratio counts answers between 0.5 s and this bound, so failures and retries do not read as slow.
ANSWERED_BUCKET_LE = "5.0"
PATH_RATIO = 0.05                  # DNSServiceIPPathBroken: Service IP errors, and at least twice any endpoint's
PATH_FACTOR = 2
LOSS_RATIO = 0.02                  # DNSNodePacketLoss: errors on every endpoint from this node
POD_DOWN_RATIO = 0.1               # an endpoint "does not answer" from a node above this failure ratio
FLEET_MOST = 0.5                   # ... and it is a CoreDNS problem from at least this share of the nodes
UPSTREAM_RATIO = 0.5               # external names fail above this on every server ...
CLUSTER_OK_RATIO = 0.05            # ... while cluster names fail below this
NODELOCAL_RATIO = 0.05

# The race fingerprint (docs/resolvers.md, "Race fingerprint"): recent partial pairs, at a rate more than
# RACE_FACTOR times what the target's lone-query loss explains (uniform loss q: partial-pair rate 2q(1-q),
# lone loss q), both rates over RACE_WINDOW so the reference has samples (every lost half is re-sent alone).
RACE_MIN_PAIRS = 2
RACE_FACTOR = 3
RACE_WINDOW = "30m"

# Windows (docs/alerts.md, "Timing"). With the DaemonSet's probe flags (every 5 s, timeout 5 s x 2 attempts)
# a healthy target completes ~24 lookups per mode in 2 minutes and a dead one ~10; the ServiceMonitor
# scrapes every 15 s. Ratios use WINDOW; "still happening" guards use RECENT, so an alert stops being true
# at most RECENT (+ a scrape) after the last failure instead of a whole WINDOW.
WINDOW = "2m"
RECENT = "1m"
# How long a probe can take before its failure is counted (timeout x attempts + jitter, rounded up): the
# Service-IP side of DNSServiceIPPathBroken looks this far back, so endpoint probes sent in the same round
# have had time to time out before the two are compared.
PROBE_DEADLINE = "15s"
# A cause that inhibits symptoms keeps firing this long after its evidence ended (Prometheus's
# `keep_firing_for`), so it outlives every symptom it holds back: a symptom's "still failing" guard is RECENT
# plus the probes still in flight at the heal (timeout x attempts) plus a scrape. Without it the symptom
# would be notified in the seconds between the cause resolving and the symptom resolving.
CAUSE_HOLD = "1m"


def _or_zero(metric: str, sel: str, by: str, window: str, requests_sel: str) -> str:
    """`sum by (...) (increase(metric))`, or 0 where the counter has no series yet but probes ran.

    Failure/retry counters carry a `reason`/`qtype` and are created on first use; without this an absent
    failure series would make a ratio vanish instead of being 0."""
    return (f"(sum by ({by}) (increase({metric}{{{sel}}}[{window}]))"
            f" or sum by ({by}) (increase(dns_probe_requests_total{{{requests_sel}}}[{window}])) * 0)")


ENDPOINT_QUERIES = "dns_probe_endpoint_queries_total"
ENDPOINT_FAILED = 'result!~"ok|retried|slow"'
ENDPOINT_LOST = 'result!~"ok|slow"'  # a retransmission or a failure: the endpoint queries lost packets too


def _endpoint_failure_ratio(sel: str, by: str, window: str) -> str:
    """Failed share of the sampled endpoints' queries (issue 17: results only, no per mode/qtype series);
    0 where every query succeeded (the failure results do not exist then)."""
    total = f"sum by ({by}) (increase({ENDPOINT_QUERIES}{{{sel}}}[{window}]))"
    return (f"(sum by ({by}) (increase({ENDPOINT_QUERIES}{{{sel}, {ENDPOINT_FAILED}}}[{window}])) or {total} * 0)\n"
            f"  / {total}")


def rules(job: str, runbook_base_url: str) -> list[dict[str, Any]]:
    """The recording rules and alert definitions, as rule-file groups."""
    s = f'job="{job}"'

    def alert(name: str, expr: str, for_: str, severity: str, role: str, summary: str,
              description: str) -> dict[str, Any]:
        rule: dict[str, Any] = {"alert": name, "expr": expr}
        if for_ != "0m":
            rule["for"] = for_
        rule["labels"] = {"severity": severity, "role": role}
        rule["annotations"] = {
            "summary": summary,
            "description": description,
            "runbook_url": f"{runbook_base_url}{name}.md",
        }
        return rule

    def record(name: str, expr: str) -> dict[str, Any]:
        return {"record": name, "expr": expr}

    usage = "instance:conntrack_table_usage:max2m"
    full = f"({usage}{{{s}}} > {TABLE_FULL})"
    drops = f"sum without (cpu) (increase(conntrack_stat_drop_total{{{s}}}[{RECENT}]))"
    inserts = f"sum without (cpu) (increase(conntrack_stat_insert_failed_total{{{s}}}[{WINDOW}]))"
    table = [
        record(usage,
               f"max_over_time(conntrack_entries{{{s}}}[{WINDOW}])\n"
               f"  / max_over_time(conntrack_entries_limit{{{s}}}[{WINDOW}])"),
        alert("ConntrackTableFull",
              f"{drops} > 0\nand on (job, instance)\n  {full}",
              "0m", "critical", "cause",
              "The conntrack table is full: the kernel drops packets that need a new entry, DNS queries included.",
              f"The conntrack table on node {NODE} reached {TABLE_FULL:.0%} of nf_conntrack_max and "
              f"{{{{ $value | humanize }}}} packets were dropped in the last {RECENT} for want of an entry. "
              "New connections and DNS queries on this node fail; its DNS probe alerts are symptoms of this."),
        alert("ConntrackTableNearFull",
              f"conntrack_entries{{{s}}} / conntrack_entries_limit{{{s}}} > {TABLE_CRITICAL}",
              "1m", "critical", "cause",
              "Conntrack table almost full: new connections and DNS queries are about to be dropped.",
              f"The conntrack table on node {NODE} is {{{{ $value | humanizePercentage }}}} full "
              f"(alert above {TABLE_CRITICAL:.0%}). At 100% the kernel drops every packet that needs a new "
              "entry, including DNS queries, which then time out after 5 seconds."),
        alert("ConntrackTableFilling",
              f"conntrack_entries{{{s}}} / conntrack_entries_limit{{{s}}} > {TABLE_WARNING}",
              "15m", "warning", "cause",
              "Conntrack table filling up.",
              f"The conntrack table on node {NODE} has been above {TABLE_WARNING:.0%} for 15 minutes; "
              "it is {{ $value | humanizePercentage }} full now."),
        alert("ConntrackInsertFailed",
              f"{inserts} > 0",
              "0m", "warning", "cause",
              "Conntrack insertions are failing: packets are being lost (the UDP DNAT race).",
              f"Node {NODE} failed to insert {{{{ $value | humanize }}}} conntrack entries in the last {WINDOW}. "
              "Each failure drops a packet; for parallel A/AAAA DNS lookups through the DNS Service IP that is "
              "a 5-second delay for the application."),
        alert("ConntrackDroppingPackets",
              f"{drops} > 0\nunless on (job, instance)\n  {full}\n"
              f"unless on (job, instance)\n  ({inserts} > 0)",
              "0m", "warning", "cause",
              "Conntrack is dropping packets on a table that is not full and without insert failures.",
              f"Node {NODE} dropped {{{{ $value | humanize }}}} packets in conntrack in the last {RECENT}, while "
              f"its table stayed below {TABLE_FULL:.0%} and no insertion failed: neither a full table nor the "
              "insert race explains them (see the runbook for the other drop paths)."),
        alert("ConntrackClashResolving",
              f"sum without (cpu) (increase(conntrack_stat_clash_resolve_total{{{s}}}[3m])) > 0",
              "0m", "info", "cause",
              "The parallel UDP insert race is happening and the kernel is resolving it.",
              f"Node {NODE} resolved {{{{ $value | humanize }}}} conntrack insert clashes in the last 3 minutes "
              "(clash_resolve). This kernel repairs the A/AAAA race; older kernels would have lost those packets."),
        alert("ConntrackStaleDNSEntries",
              f"conntrack_table_stale_dns_entries{{{s}}} > 0",
              "3m", "warning", "cause",
              "Conntrack entries keep DNS traffic pinned to a DNS server that is gone.",
              f"Node {NODE} has {{{{ $value | humanize }}}} conntrack entries for DNS addressed to a current DNS "
              "server but answered from an address that is no current server, for more than 3 minutes (longer "
              "than such entries live when unused): clients reusing those source ports still reach a dead pod."),
    ]

    by_server = f"{NODE_LABELS}, server, kind"
    partial = f"sum by ({by_server}) (increase(dns_probe_partial_pairs_total"
    pairs = f"sum by ({by_server}) (increase(dns_probe_requests_total"
    lone = f"sum by ({by_server}) (increase(dns_probe_lone_queries_total"
    by_zone = f"{by_server}, zone"
    req2 = "node_server_zone:dns_probe_requests:increase2m"
    fail2 = "node_server_zone:dns_probe_failures:increase2m"
    retr2 = "node_server_zone:dns_probe_retries:increase2m"
    fail_ratio = "node_server:dns_probe_failures:ratio2m"
    zone_ratio = "node_server_zone:dns_probe_failures:ratio2m"
    err_ratio = "node_server:dns_probe_cluster_errors:ratio2m"
    fail1 = "node_server:dns_probe_failures:increase1m"
    err1 = "node_server:dns_probe_cluster_errors:increase1m"
    slow_ratio = "node_server:dns_probe_slow_answers:ratio2m"
    slow1 = "node_server:dns_probe_slow_answers:increase1m"
    ep_ratio = "node_endpoint:dns_probe_cluster_failures:ratio2m"
    nodes = "endpoint:dns_probe_nodes:count"
    failing = "endpoint:dns_probe_nodes_failing:ratio"
    erring = "endpoint:dns_probe_nodes_erring:count"
    ep_err = "node_endpoint:dns_probe_cluster_errors:ratio2m"
    node_min = "node:dns_probe_best_endpoint_errors:ratio2m"
    lossy = f"({node_min}{{{s}}} > {LOSS_RATIO})"
    coredns_wide = (f"(count by ({FLEET_LABELS}) {lossy} >= 2\n"
                    f"   and on (job) count by ({FLEET_LABELS}) {lossy} / count by ({FLEET_LABELS}) ({node_min}{{{s}}})"
                    f" >= {FLEET_MOST})")
    lossy_node = f"({lossy} unless on (job) {coredns_wide})"
    real_failures = f'{s}, reason!="mismatch"'  # mismatch counts stray replies; the answer still came
    EQ = ENDPOINT_QUERIES
    cluster = f'{s}, zone!="external"'  # cluster names (and series from exporters without the zone label)
    pod_info = (f"max by (job, instance, server, kind, pod) (dns_probe_target_info{{{s}}})")
    with_pod = f"* on (job, instance, server, kind) group_left (pod)\n  {pod_info}"
    not_full = f"unless on (job, instance) {full}"

    dns_records = [
        # Sampled CoreDNS endpoints report results only (dns_probe_endpoint_queries_total, issue 17): each
        # record reads them as the same requests / failures / retries / slow answers as the other kinds.
        record(req2, f"sum by ({by_zone}) (increase(dns_probe_requests_total{{{s}}}[{WINDOW}]))\n"
                     f"or sum by ({by_zone}) (increase({EQ}{{{s}}}[{WINDOW}]))"),
        record(fail2, f"sum by ({by_zone}) (increase(dns_probe_failures_total{{{real_failures}}}[{WINDOW}]))\n"
                      f"or sum by ({by_zone}) (increase({EQ}{{{s}, {ENDPOINT_FAILED}}}[{WINDOW}]))\n"
                      f"or {req2}{{{s}}} * 0"),
        record(retr2, f"sum by ({by_zone}) (increase(dns_probe_retries_total{{{s}}}[{WINDOW}]))\n"
                      f'or sum by ({by_zone}) (increase({EQ}{{{s}, result="retried"}}[{WINDOW}]))\n'
                      f"or {req2}{{{s}}} * 0"),
        record(zone_ratio, f"{fail2}{{{s}}} / {req2}{{{s}}}"),
        record(fail_ratio, f"sum without (zone) ({fail2}{{{s}}})\n  / sum without (zone) ({req2}{{{s}}})"),
        # Errors (failures + retransmissions) of cluster names only: external names fail with their upstream.
        record(err_ratio, f"(sum without (zone) ({fail2}{{{cluster}}}) + sum without (zone) ({retr2}{{{cluster}}}))\n"
                          f"  / sum without (zone) ({req2}{{{cluster}}})"),
        record(fail1, f"sum by ({by_server}) (increase(dns_probe_failures_total{{{real_failures}}}[{RECENT}]))\n"
                      f"or sum by ({by_server}) (increase({EQ}{{{s}, {ENDPOINT_FAILED}}}[{RECENT}]))"),
        record(err1, f"sum by ({by_server}) (increase(dns_probe_retries_total{{{cluster}}}[{RECENT}]))\n"
                     f"+ (sum by ({by_server}) (increase(dns_probe_failures_total{{{cluster}, reason!=\"mismatch\"}}"
                     f"[{RECENT}]))\n"
                     f"   or sum by ({by_server}) (increase(dns_probe_retries_total{{{cluster}}}[{RECENT}])) * 0)\n"
                     f'or sum by ({by_server}) (increase({EQ}{{{cluster}, result!~"ok|slow"}}[{RECENT}]))'),
        record(slow_ratio,
               f'(sum by ({by_server}) (increase(dns_probe_duration_seconds_bucket{{{s}, le="{ANSWERED_BUCKET_LE}"}}'
               f"[{WINDOW}]))\n"
               f'  - sum by ({by_server}) (increase(dns_probe_duration_seconds_bucket{{{s}, le="{SLOW_BUCKET_LE}"}}'
               f"[{WINDOW}])))\n"
               f"/ sum by ({by_server}) (increase(dns_probe_duration_seconds_count{{{s}}}[{WINDOW}]))\n"
               f'or (sum by ({by_server}) (increase({EQ}{{{s}, result="slow"}}[{WINDOW}]))\n'
               f"    or sum by ({by_server}) (increase({EQ}{{{s}}}[{WINDOW}])) * 0)\n"
               f"  / sum by ({by_server}) (increase({EQ}{{{s}}}[{WINDOW}]))"),
        record(slow1,
               f'sum by ({by_server}) (increase(dns_probe_duration_seconds_bucket{{{s}, le="{ANSWERED_BUCKET_LE}"}}'
               f"[{RECENT}]))\n"
               f'- sum by ({by_server}) (increase(dns_probe_duration_seconds_bucket{{{s}, le="{SLOW_BUCKET_LE}"}}'
               f"[{RECENT}]))\n"
               f'or sum by ({by_server}) (increase({EQ}{{{s}, result="slow"}}[{RECENT}]))'),
        # Fleet view of each CoreDNS endpoint: its cluster-name failure ratio from every node that probes it
        # (nodes whose own table is full are left out: their failures say nothing about CoreDNS).
        record(ep_ratio, f'(\n  ({zone_ratio}{{{s}, kind="endpoint", zone!="external"}} >= 0)\n'
                         f"  {not_full}\n)\n{with_pod}"),
        record(ep_err, f'(\n  ({err_ratio}{{{s}, kind="endpoint"}} >= 0)\n'
                       f"  {not_full}\n)\n{with_pod}"),
        record(nodes, f"count by ({FLEET_LABELS}, server, pod) ({ep_ratio}{{{s}}})"),
        # An endpoint that loses or fails queries from most nodes (and from more than one) is a CoreDNS problem:
        # it is no evidence against any one node.
        record(erring, f"count by ({FLEET_LABELS}, server, pod) ({ep_err}{{{s}}} > {LOSS_RATIO})\n"
                       f"or {nodes}{{{s}}} * 0"),
        # Per node: the error ratio of the endpoint that did best, among those not erring cluster-wide.
        record(node_min, f"min by ({NODE_LABELS}) (\n  {ep_err}{{{s}}}\n  unless on (job, server) (\n"
                         f"    {erring}{{{s}}} / {nodes}{{{s}}} >= {FLEET_MOST}\n"
                         f"    and {erring}{{{s}}} >= 2\n  )\n)"),
        # Share of probing nodes, leaving out lossy nodes (every endpoint errs from them; they would blame every
        # pod), from which this endpoint fails; when most nodes (and more than one) are "lossy", CoreDNS itself
        # is failing everywhere and none is left out.
        record(failing, f"(\n  count by ({FLEET_LABELS}, server, pod) (\n"
                        f"    {ep_ratio}{{{s}}} > {POD_DOWN_RATIO}\n"
                        f"    and on (job, instance, server) {fail1}{{{s}}} > 0\n"
                        f"    unless on (job, instance) {lossy_node}\n  )\n"
                        f"  or count by ({FLEET_LABELS}, server, pod) ({ep_ratio}{{{s}}}) * 0\n)\n"
                        f"/ count by ({FLEET_LABELS}, server, pod) ({ep_ratio}{{{s}}} unless on (job, instance) "
                        f"{lossy_node})"),
    ]

    def fleet_sum(rec: str, zone: str) -> str:
        return (f'sum by ({FLEET_LABELS}, server) ({rec}{{{s}, zone="{zone}", kind!="nodelocal"}} '
                f"{not_full})")

    dns_alerts = [
        # ---- causes on one node ----
        alert("DNSServiceIPPathBroken",
              f'({err_ratio}{{{s}, kind="service"}} offset {PROBE_DEADLINE} > {PATH_RATIO})\n'
              f"> on (job, instance) group_left ()\n"
              f'  {PATH_FACTOR} * max by (job, instance) ({err_ratio}{{{s}, kind="endpoint"}})\n'
              f"and on (job, instance, server, kind) {err1}{{{s}}} > 0",
              "1m", "critical", "cause",
              "DNS through the Service IP is broken on this node while the DNS pods answer directly.",
              f"On node {NODE}, {{{{ $value | humanizePercentage }}}} of DNS probes to the DNS Service IP "
              f"{{{{ $labels.server }}}} failed or needed a retransmission in the last {WINDOW}, more than "
              f"{PATH_FACTOR} times the worst CoreDNS endpoint probed directly from the same node. The node's "
              "DNAT/conntrack path (kube-proxy rules or stale conntrack entries) is at fault, not CoreDNS."),
        alert("DNSNodePacketLoss",
              f"{lossy}\nunless on (job)\n  {coredns_wide}\n"
              f"and on (job, instance)\n"
              f'  sum by (job, instance) ({err1}{{{s}, kind="endpoint"}}) > 0',
              "1m", "critical", "cause",
              "This node loses DNS packets to every DNS server, CoreDNS endpoints included.",
              f"From node {NODE}, even the CoreDNS endpoint that did best lost or failed "
              f"{{{{ $value | humanizePercentage }}}} of its probe queries in the last {WINDOW} (retransmissions "
              "and failures), while other nodes reach the same pods: packets are lost on this node's path "
              "(NIC, CNI, node network), not in CoreDNS and not only behind the Service IP."),
        alert("NodeLocalDNSCacheDown",
              f"max by ({NODE_LABELS}, server) (dns_probe_nodelocal_present{{{s}}}) == 0\n"
              f"or max by ({NODE_LABELS}, server) (\n"
              f'  {zone_ratio}{{{s}, kind="nodelocal", zone!="external"}} > {NODELOCAL_RATIO}\n'
              f"  and on (job, instance, server) {fail1}{{{s}}} > 0\n"
              ")",
              "1m", "critical", "cause",
              "NodeLocal DNSCache on this node does not answer or fails.",
              f"NodeLocal DNSCache at {{{{ $labels.server }}}} on node {NODE} "
              "{{ if eq $value 0.0 }}does not answer at all{{ else }}failed {{ $value | humanizePercentage }} "
              f"of cluster-name probes in the last {WINDOW}{{{{ end }}}}. Pods whose resolv.conf points at it "
              "lose DNS on this node."),
        # ---- causes in CoreDNS or beyond it: one alert for the cluster, not one per node ----
        alert("CoreDNSPodNotAnswering",
              f"{failing}{{{s}}} >= {FLEET_MOST}",
              "1m", "critical", "cause",
              "A CoreDNS pod does not answer, seen from most nodes.",
              f"CoreDNS pod {POD} ({{{{ $labels.server }}}}) failed more than {POD_DOWN_RATIO:.0%} of the "
              f"cluster-name probes sent to it directly from {{{{ $value | humanizePercentage }}}} of the nodes "
              f"probing it, over the last {WINDOW}. The pod is the problem, not the nodes; through the Service "
              "IP every node loses the share of lookups kube-proxy sends to it."),
        alert("CoreDNSPodSlow",
              f"count by ({FLEET_LABELS}, server, pod) (\n"
              f'  (\n    ({slow_ratio}{{{s}, kind="endpoint"}} > {SLOW_RATIO})\n'
              f"    and on (job, instance, server) {slow1}{{{s}}} > 0\n    {not_full}\n  )\n  {with_pod}\n)\n"
              f"/ {nodes}{{{s}}}\n>= {FLEET_MOST}",
              "2m", "warning", "cause",
              "A CoreDNS pod answers slowly, seen from most nodes.",
              f"More than {SLOW_RATIO:.0%} of the answers of CoreDNS pod {POD} ({{{{ $labels.server }}}}) took "
              f"longer than {SLOW_SECONDS * 1000:.0f} ms (without any retransmission) from "
              f"{{{{ $value | humanizePercentage }}}} of the nodes probing it, over the last {WINDOW}."),
        alert("DNSUpstreamFailing",
              f"min by ({FLEET_LABELS}) (\n"
              f"  {fleet_sum(fail2, 'external')}\n  / {fleet_sum(req2, 'external')}\n"
              f") > {UPSTREAM_RATIO}\n"
              f"and on (job)\n"
              f'  sum by (job) ({fail2}{{{s}, zone="cluster"}} {not_full})\n'
              f'  / sum by (job) ({req2}{{{s}, zone="cluster"}} {not_full})\n'
              f"  < {CLUSTER_OK_RATIO}",
              "1m", "critical", "cause",
              "External names fail on every DNS server while cluster names resolve: the upstream DNS is failing.",
              f"Even the DNS server that did best failed {{{{ $value | humanizePercentage }}}} of the probes of "
              f"external names over the last {WINDOW}, across all nodes, while cluster names failed less than "
              f"{CLUSTER_OK_RATIO:.0%}. CoreDNS works; what it forwards to (the Corefile's `forward`, the nodes' "
              "upstream resolvers) does not."),
        # ---- symptoms: what the user notices; each cause above inhibits the ones it explains ----
        alert("DNSProbeFailures",
              f"(\n  {zone_ratio}{{{s}}} > {PROBE_FAILURE_RATIO}\n"
              f"  and on (job, instance, server, kind) {fail1}{{{s}}} > 0\n)\n{with_pod}",
              "2m", "warning", "symptom",
              "DNS probes to a server are failing.",
              f"{{{{ $value | humanizePercentage }}}} of the DNS probes of {{{{ $labels.zone }}}} names from node "
              f"{NODE} to {{{{ $labels.server }}}} (kind {{{{ $labels.kind }}}}{{{{ if $labels.pod }}}}, pod "
              f"{{{{ $labels.pod }}}}{{{{ end }}}}) failed over the last {WINDOW} "
              f"(alert above {PROBE_FAILURE_RATIO:.0%}), and they are still failing."),
        alert("DNSProbeSlow",
              f"(\n  {slow_ratio}{{{s}}} > {SLOW_RATIO}\n  and on (job, instance, server, kind) {slow1}{{{s}}} > 0\n)\n"
              f"{with_pod}",
              "2m", "warning", "symptom",
              "DNS lookups are slow.",
              f"{{{{ $value | humanizePercentage }}}} of the DNS probe answers from node {NODE} to "
              f"{{{{ $labels.server }}}} (kind {{{{ $labels.kind }}}}{{{{ if $labels.pod }}}}, pod "
              f"{{{{ $labels.pod }}}}{{{{ end }}}}) took longer than {SLOW_SECONDS * 1000:.0f} ms without a "
              f"retransmission over the last {WINDOW} (alert above {SLOW_RATIO:.0%})."),
        alert("DNSParallelQueryRetries",
              f"(\n  {partial}{{{s}, kind!=\"endpoint\"}}[{WINDOW}])) >= {RACE_MIN_PAIRS}\n"
              f"and on ({by_server})\n"
              f"  (\n    {partial}{{{s}, kind!=\"endpoint\"}}[{RACE_WINDOW}]))\n"
              f"    / {pairs}{{{s}, kind!=\"endpoint\", mode=\"parallel\", qtype=\"A\"}}[{RACE_WINDOW}]))\n  )\n"
              f"  > {2 * RACE_FACTOR} * (\n"
              f"    {lone}{{{s}, kind!=\"endpoint\", result=\"lost\"}}[{RACE_WINDOW}]))\n"
              f"    / {lone}{{{s}, kind!=\"endpoint\"}}[{RACE_WINDOW}]))\n  )\n)\n"
              f"unless on (job, instance)\n"
              f"  sum by (job, instance) (increase({ENDPOINT_QUERIES}{{{s}, {ENDPOINT_LOST}}}[{WINDOW}])) > 0",
              "2m", "warning", "symptom",
              "Parallel A/AAAA lookups through a DNS address lose one answer of the pair (5-second delays).",
              f"Probes from node {NODE} to {{{{ $labels.server }}}} (kind {{{{ $labels.kind }}}}) lost one "
              f"answer of {{{{ $value | humanize }}}} parallel A/AAAA pairs in the last {WINDOW} while the other "
              f"came back at once, more than {RACE_FACTOR} times what the loss of the same target's lone queries "
              f"explains over {RACE_WINDOW}, and probes straight to the CoreDNS endpoints lost no query: the "
              "conntrack race's fingerprint on the DNAT path, not packet loss. Applications using glibc or musl "
              "defaults wait 5 seconds each time."),
    ]

    selfmon = [
        alert("ConntrackDNSExporterDown",
              f"up{{{s}}} == 0",
              "2m", "warning", "cause",
              "The conntrack/DNS exporter cannot be scraped.",
              f"Prometheus has not been able to scrape the exporter on node {NODE} for 2 minutes: the node's "
              "conntrack table and DNS path are unmonitored. A full conntrack table can itself cause this."),
        alert("ConntrackDNSExporterCollectorFailing",
              f"conntrack_dns_exporter_collector_success{{{s}}} == 0\n"
              f'or label_replace(conntrack_dns_exporter_kubernetes_up{{{s}}} == 0, '
              '"collector", "kubernetes", "", "")',
              "3m", "warning", "cause",
              "An exporter collector keeps failing.",
              f"The {{{{ $labels.collector }}}} collector of the exporter on node {NODE} has been failing for "
              "3 minutes; its metrics are missing or stale."),
    ]
    sources = {r["source_matchers"][0].split('"')[1] for r in inhibitions()}
    for rule in table + dns_alerts + selfmon:
        if rule.get("alert") in sources:
            items = list(rule.items())
            after = "for" if "for" in rule else "expr"
            rule.clear()
            for k, v in items:
                rule[k] = v
                if k == after:
                    rule["keep_firing_for"] = CAUSE_HOLD
    return [
        {"name": "conntrack-dns-exporter.conntrack", "rules": table},
        {"name": "conntrack-dns-exporter.dns", "rules": dns_records + dns_alerts},
        {"name": "conntrack-dns-exporter.exporter", "rules": selfmon},
        {"name": "conntrack-dns-exporter.fleet", "rules": fleet_records(s)},
        {"name": "conntrack-dns-exporter.dnsflows", "rules": [dnsflows_backend_unanswered(s, alert)]},
    ]


# ---- inhibition: a cause silences the symptoms it explains (Alertmanager `inhibit_rules`) ----
NODE_EQUAL = ["job", "instance"]
DNS_ON_NODE = ["DNSProbeFailures", "DNSProbeSlow", "DNSParallelQueryRetries", "DNSServiceIPPathBroken",
               "DNSNodePacketLoss", "NodeLocalDNSCacheDown", "ConntrackStaleDNSEntries"]


def _alt(names: list[str]) -> str:
    return "|".join(names)


def inhibitions() -> list[dict[str, Any]]:
    """(source matchers, target matchers, equal, why) in Alertmanager's `matchers` syntax."""
    def rule(source: str, targets: list[str], equal: list[str], why: str,
             extra: list[str] | None = None) -> dict[str, Any]:
        return {"source_matchers": [f'alertname="{source}"'],
                "target_matchers": [f'alertname=~"{_alt(targets)}"', *(extra or [])],
                "equal": equal, "why": why}

    return [
        rule("ConntrackTableFull",
             ["ConntrackTableNearFull", "ConntrackTableFilling", "ConntrackDroppingPackets",
              "ConntrackInsertFailed", *DNS_ON_NODE], NODE_EQUAL,
             "a full table drops every new flow on the node: DNS probes of every kind fail"),
        rule("ConntrackTableNearFull", ["ConntrackTableFilling"], NODE_EQUAL, "the same table, one step further"),
        rule("ConntrackInsertFailed",
             ["ConntrackClashResolving", "DNSParallelQueryRetries", "DNSServiceIPPathBroken"], NODE_EQUAL,
             "the kernel's own count of the race: the Service-IP retries are its packets"),
        rule("ConntrackInsertFailed", ["DNSProbeFailures"], NODE_EQUAL,
             "queries lost to the race fail through the Service IP", ['kind="service"']),
        rule("DNSServiceIPPathBroken", ["DNSParallelQueryRetries", "ConntrackStaleDNSEntries", "DNSBackendUnanswered"],
             NODE_EQUAL, "the broken DNAT path explains lost halves, stale entries and the real flows it loses"),
        rule("DNSServiceIPPathBroken", ["DNSProbeFailures", "DNSProbeSlow"], NODE_EQUAL,
             "Service-IP failures are the broken path itself, and NodeLocal's cache misses go the same way",
             ['kind=~"service|nodelocal"']),
        rule("DNSNodePacketLoss",
             ["DNSProbeFailures", "DNSProbeSlow", "DNSParallelQueryRetries", "DNSServiceIPPathBroken",
              "NodeLocalDNSCacheDown"], NODE_EQUAL,
             "lost packets fail and delay probes of every kind on the node"),
        rule("NodeLocalDNSCacheDown", ["DNSProbeFailures", "DNSProbeSlow"], NODE_EQUAL,
             "failures of the cache itself", ['kind="nodelocal"']),
        rule("CoreDNSPodNotAnswering", ["DNSProbeFailures", "DNSProbeSlow"], ["job", "server"],
             "direct probes of the dead pod fail from every node"),
        rule("CoreDNSPodNotAnswering", ["DNSProbeFailures", "DNSProbeSlow", "DNSParallelQueryRetries"], ["job"],
             "the Service IP sends every node's queries to the dead pod in turn", ['kind=~"service|nodelocal"']),
        rule("CoreDNSPodNotAnswering", ["DNSBackendUnanswered"], ["job"],
             "every node's real DNS flows to the dead pod go unanswered"),
        rule("CoreDNSPodSlow", ["DNSProbeSlow"], ["job", "server"], "direct probes of the slow pod"),
        rule("CoreDNSPodSlow", ["DNSProbeSlow"], ["job"], "the Service IP reaches the slow pod too",
             ['kind=~"service|nodelocal"']),
        rule("DNSUpstreamFailing", ["DNSProbeFailures"], ["job"],
             "external names fail on every server because their upstream does", ['zone="external"']),
        rule("ConntrackDNSExporterDown", ["ConntrackDNSExporterCollectorFailing"], NODE_EQUAL,
             "no scrape, no collector"),
    ]


def inhibit_rules() -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "why"} for r in inhibitions()]


def _operator_matchers(matchers: list[str]) -> list[dict[str, Any]]:
    out = []
    for m in matchers:
        found = re.fullmatch(r'([a-z_]+)(=~|!~|!=|=)"(.*)"', m)
        assert found, m
        out.append({"name": found.group(1), "matchType": found.group(2), "value": found.group(3)})
    return out


def inhibit_file_text() -> str:
    lines = [HEADER.rstrip("\n"),
             "# Alertmanager inhibit_rules: merge these into alertmanager.yml. A cause alert silences the symptom",
             "# alerts it explains (docs/alerts.md has the cause model). `equal: [job, instance]` = the same node.",
             "inhibit_rules:"]
    for r in inhibitions():
        body = yaml.dump([{k: v for k, v in r.items() if k != "why"}], Dumper=_Dumper, sort_keys=False,
                         width=1000, default_flow_style=None)
        lines.append(f"  # {r['source_matchers'][0].split('=', 1)[1].strip(chr(34))}: {r['why']}")
        lines.extend("  " + ln for ln in body.rstrip("\n").splitlines())
    return "\n".join(lines) + "\n"


def alertmanager_config_text() -> str:
    return dump({
        "apiVersion": "monitoring.coreos.com/v1alpha1",
        "kind": "AlertmanagerConfig",
        "metadata": {
            "name": "conntrack-dns-exporter-inhibit",
            "namespace": "conntrack-dns-exporter",
            "labels": {"app.kubernetes.io/name": "conntrack-dns-exporter",
                       "app.kubernetes.io/component": "alerting"},
        },
        "spec": {"inhibitRules": [
            {"sourceMatch": _operator_matchers(r["source_matchers"]),
             "targetMatch": _operator_matchers(r["target_matchers"]),
             "equal": r["equal"]}
            for r in inhibitions()]},
    })


# Fleet aggregation (issue 17) -------------------------------------------------------------------------------
# Each node probes only a sample of the CoreDNS endpoints, so one node's per-endpoint view is thin; these
# rules add the fleet up per endpoint across nodes and per node across endpoints. Sums of rates (not
# ratios) are recorded first so that a Thanos/Mimir ruler can sum them again across shards or clusters;
# the ratios divide two recorded sums. FLEET_RECORD_LABELS is what the per-endpoint rules keep besides `server`
# (add `cluster` there when one ruler sees several clusters). See docs/scale.md.
FLEET_RECORD_LABELS = "job"


def fleet_records(s: str) -> list[dict[str, Any]]:
    q = ENDPOINT_QUERIES
    node, srv = NODE_LABELS, f"{FLEET_RECORD_LABELS}, server"
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
        "5m", "warning", "cause",
        "One DNS backend leaves real clients' queries unanswered while the others answer.",
        f"On node {NODE}, {{{{ $value | humanizePercentage }}}} of the pods' DNS flows that the DNAT sent to "
        "backend {{ $labels.backend }} (behind the DNS Service IP) over the last 10 minutes were never "
        "answered, while another backend of the same Service answered (nearly) all of its own (alert above "
        f"{FLOWS_UNANSWERED_RATIO:.0%}). A CoreDNS pod that is down, overloaded or gone (stale endpoint) still "
        "gets its share of the queries.")


_DURATION = re.compile(r"^(\d+)([smh])$")
_RANGE = re.compile(r"\[(\d+)([smh])\]")
_OFFSET = re.compile(r"offset (\d+)([smh])")
_SECONDS = {"s": 1, "m": 60, "h": 3600}


def _scaled(amount: str, unit: str, scale: float) -> str:
    return f"{max(1, round(int(amount) * _SECONDS[unit] * scale))}s"


def render_groups(job: str = DEFAULT_JOB, runbook_base_url: str = RUNBOOK_BASE_URL,
                  for_override: str | None = None, time_scale: float | None = None,
                  extra_labels: dict[str, str] | None = None, group_prefix: str = "") -> list[dict[str, Any]]:
    """Rule groups. For tests that cannot wait minutes: `for_override` replaces every non-zero `for`;
    `time_scale` multiplies every `for`, range window and offset (1/60: 5m -> 5s), so the same rules pend, fire
    and resolve in seconds against a fast-scraping Prometheus; `extra_labels`/`group_prefix` tell such a copy
    apart when it is loaded next to the shipped rules."""
    groups = rules(job, runbook_base_url)
    for g in groups:
        g["name"] = group_prefix + g["name"]
        for r in g["rules"]:
            if time_scale is not None:
                r["expr"] = _RANGE.sub(lambda m: f"[{_scaled(m.group(1), m.group(2), time_scale)}]", r["expr"])
                r["expr"] = _OFFSET.sub(lambda m: f"offset {_scaled(m.group(1), m.group(2), time_scale)}",
                                        r["expr"])
                for key in ("for", "keep_firing_for"):
                    if key in r:
                        m = _DURATION.match(r[key])
                        assert m, r[key]
                        r[key] = _scaled(m.group(1), m.group(2), time_scale)
            if for_override is not None and "for" in r:
                r["for"] = for_override
            if extra_labels and "alert" in r:
                r["labels"] = {**r["labels"], **extra_labels}
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
            INHIBIT_FILE: inhibit_file_text(), ALERTMANAGER_CONFIG_FILE: alertmanager_config_text(),
            # Always the defaults: the chart substitutes its own job and runbook base URL for these.
            CHART_RULES_FILE: rule_file_text(render_groups()),
            CHART_ALERTMANAGER_CONFIG_FILE: alertmanager_config_text()}


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

#!/usr/bin/env python3
"""Generates the Grafana dashboard (deploy/grafana/conntrack-dns-exporter.json) and the Helm chart's copy.

The dashboard is laid out for one glance: first a row with one table line per node (table usage, drop and
insert_failed rates, Service-IP vs endpoint failure share and p99, NodeLocal present), the Service-IP vs
endpoints comparison per node and the firing alerts of this exporter with their runbook links; then the
detail rows, broken down per node wherever a sum over nodes would hide one bad node. Thresholds (0.9, 0.75,
1%, 0.5 s) and runbook URLs come from scripts/gen_alerts.py, the source of the alert rules, so a panel's
colours change when an alert's threshold does. Variables come from `conntrack_dns_exporter_build_info`,
which every exporter exports whatever collector fails. Every panel has a unit, a description and a link to
the runbook of the alert it belongs to.

    python scripts/gen_dashboard.py            # rewrite both files
    python scripts/gen_dashboard.py --check    # exit 1 if they are stale (a unit test runs it)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gen_alerts

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "conntrack-dns-exporter.json"
CHART_COPY = ROOT / "deploy" / "helm" / "conntrack-dns-exporter" / "files" / "conntrack-dns-exporter.json"

DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'job="$job", node=~"$node", instance=~"$instance"'
RATE = "$__rate_interval"
INFO = "conntrack_dns_exporter_build_info"
PARALLEL = 'mode="parallel"'
# The p99 line: gen_alerts' DNSProbeSlow threshold, under whichever name gen_alerts gives it.
SLOW_SECONDS: float = getattr(gen_alerts, "SLOW_SECONDS", None) or gen_alerts.PROBE_P99_SECONDS
Panel = dict[str, Any]


def runbook(alert: str) -> str:
    return f"{gen_alerts.RUNBOOK_BASE_URL}{alert}.md"


def sel(extra: str = "") -> str:
    return "{" + SEL + (f", {extra}" if extra else "") + "}"


def or_zero(metric: str, by: str, extra: str = "", fn: str = "rate", base_extra: str = "") -> str:
    """`sum by (...) (fn(metric))`, or 0 where the counter has no series yet but probes ran (as the rules do)."""
    base = base_extra or extra
    return (f"(sum by ({by}) ({fn}({metric}{sel(extra)}[{RATE}]))"
            f" or sum by ({by}) ({fn}(dns_probe_requests_total{sel(base)}[{RATE}])) * 0)")


def failed_or_retried_share(by: str, kind: str) -> str:
    k = f'kind="{kind}"'
    return (f"({or_zero('dns_probe_failures_total', by, k)} + {or_zero('dns_probe_retries_total', by, k)})"
            f" / sum by ({by}) (rate(dns_probe_requests_total{sel(k)}[{RATE}]))")


def endpoint_failed_or_retried_share(by: str, failed: str = 'result!="ok"') -> str:
    """The sampled CoreDNS endpoints keep results only (issue 17): not-ok (failed or retried) / all queries."""
    q, k = "dns_probe_endpoint_queries_total", 'kind="endpoint"'
    total = f"sum by ({by}) (rate({q}{sel(k)}[{RATE}]))"
    return f"(sum by ({by}) (rate({q}{sel(k + ', ' + failed)}[{RATE}])) or {total} * 0) / {total}"


def p99(by: str, extra: str = "", q: float = 0.99) -> str:
    return f"histogram_quantile({q}, sum by ({by}, le) (rate(dns_probe_duration_seconds_bucket{sel(extra)}[{RATE}])))"


def target(ref: str, expr: str, legend: str = "", **kw: Any) -> dict[str, Any]:
    t: dict[str, Any] = {"datasource": DS, "refId": ref, "expr": expr, "legendFormat": legend}
    if kw.get("instant"):
        t.update(instant=True, range=False, format="table")
    else:
        t["range"] = True
    if kw.get("format"):
        t["format"] = kw["format"]
    return t


def steps(*pairs: tuple[str, float | None]) -> dict[str, Any]:
    return {"mode": "absolute", "steps": [{"color": c, "value": v} for c, v in pairs]}


def timeseries(title: str, description: str, unit: str, alert: str, targets: list[dict[str, Any]],
               thresholds: dict[str, Any] | None = None, **field: Any) -> Panel:
    defaults: dict[str, Any] = {"unit": unit, "custom": {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 0,
                                                         "spanNulls": False}, **field}
    if thresholds:
        defaults["thresholds"] = thresholds
        defaults["custom"]["thresholdsStyle"] = {"mode": "line+area"}
    return {"type": "timeseries", "title": title, "description": description, "alert": alert, "targets": targets,
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["max", "lastNotNull"]},
                        "tooltip": {"mode": "multi", "sort": "desc"}}}


def column(name: str, unit: str, th: dict[str, Any] | None = None, decimals: int | None = None) -> dict[str, Any]:
    props: list[dict[str, Any]] = [{"id": "unit", "value": unit}]
    if th:
        props += [{"id": "thresholds", "value": th},
                  {"id": "custom.cellOptions", "value": {"type": "color-background"}}]
    if decimals is not None:
        props.append({"id": "decimals", "value": decimals})
    return {"matcher": {"id": "byName", "options": name}, "properties": props}


def glance_table() -> Panel:
    """One line per node: instant queries joined on `node`."""
    warn_ratio = gen_alerts.PROBE_FAILURE_RATIO
    slow = SLOW_SECONDS
    cols = [
        ("A", "Table usage", f"max by (node) (conntrack_entries{sel()} / conntrack_entries_limit{sel()})",
         column("Table usage", "percentunit", steps(("green", None), ("orange", gen_alerts.TABLE_WARNING),
                                                    ("red", gen_alerts.TABLE_CRITICAL)))),
        ("B", "Drops/s", f"sum by (node) (rate(conntrack_stat_drop_total{sel()}[{RATE}]))",
         column("Drops/s", "pps", steps(("green", None), ("red", 1e-9)), 3)),
        ("C", "Insert failed/s", f"sum by (node) (rate(conntrack_stat_insert_failed_total{sel()}[{RATE}]))",
         column("Insert failed/s", "pps", steps(("green", None), ("orange", 1e-9)), 3)),
        ("D", "Service IP failed/retried", failed_or_retried_share("node", "service"),
         column("Service IP failed/retried", "percentunit", steps(("green", None), ("red", warn_ratio)))),
        ("E", "Endpoints failed/retried", endpoint_failed_or_retried_share("node"),
         column("Endpoints failed/retried", "percentunit", steps(("green", None), ("red", warn_ratio)))),
        ("F", "Service IP p99", p99("node", 'kind="service"'),
         column("Service IP p99", "s", steps(("green", None), ("orange", slow)))),
        ("G", "NodeLocal p99", p99("node", 'kind="nodelocal"'),
         column("NodeLocal p99", "s", steps(("green", None), ("orange", slow)))),
        ("H", "NodeLocal present",
         f"max by (node) (dns_probe_nodelocal_present{sel()}) or max by (node) ({INFO}{sel()}) * 0",
         column("NodeLocal present", "bool_yes_no")),
    ]
    rename = {f"Value #{ref}": name for ref, name, _e, _c in cols}
    return {
        "type": "table", "title": "Nodes at a glance", "alert": "DNSServiceIPPathBroken",
        "description": (
            "One line per node, now: conntrack table usage (orange from "
            f"{gen_alerts.TABLE_WARNING:.0%}, red from {gen_alerts.TABLE_CRITICAL:.0%}), drop and insert_failed "
            "rates (any is bad), the share of DNS probes that failed or were retransmitted through the DNS Service "
            f"IP versus straight to the sampled endpoints (red above {warn_ratio:.0%}), the p99 through the Service "
            f"IP and NodeLocal (orange above {slow * 1000:.0f} ms), and whether NodeLocal DNSCache answers (no: not "
            "configured or down). Service IP "
            "red with endpoints green: this node's DNAT/conntrack path, not CoreDNS."),
        "targets": [target(ref, expr, instant=True) for ref, _n, expr, _c in cols],
        "transformations": [
            {"id": "merge", "options": {}},
            {"id": "organize", "options": {"excludeByName": {"Time": True}, "renameByName": rename,
                                           "indexByName": {"node": 0}}},
        ],
        "fieldConfig": {"defaults": {"unit": "short", "custom": {"align": "auto", "filterable": True}},
                        "overrides": [c for *_x, c in cols]},
        "options": {"showHeader": True, "cellHeight": "sm",
                    "sortBy": [{"displayName": "Service IP failed/retried", "desc": True}]},
    }


def alerts_table() -> Panel:
    names = [r["alert"] for g in gen_alerts.render_groups() for r in g["rules"] if "alert" in r]
    return {
        "type": "table", "title": "Firing alerts of this exporter", "alert": "DNSServiceIPPathBroken",
        "description": ("Alerts of the shipped rules now firing for the selected nodes (Prometheus's ALERTS "
                        "series). Click an alert name for its runbook. Empty when all is well."),
        "targets": [target("A", f'max by (alertname, severity, node) (ALERTS{{alertstate="firing", '
                                f'alertname=~"{"|".join(names)}", {SEL}}})', instant=True)],
        "transformations": [{"id": "organize", "options": {"excludeByName": {"Time": True, "Value": True}}}],
        "fieldConfig": {"defaults": {"unit": "short", "custom": {"align": "auto"}}, "overrides": [
            {"matcher": {"id": "byName", "options": "alertname"}, "properties": [{"id": "links", "value": [
                {"title": "Runbook", "url": f"{gen_alerts.RUNBOOK_BASE_URL}${{__value.text}}.md",
                 "targetBlank": True}]}]},
        ]},
        "options": {"showHeader": True, "cellHeight": "sm"},
    }


def table_usage_th() -> dict[str, Any]:
    return steps(("green", None), ("orange", gen_alerts.TABLE_WARNING), ("red", gen_alerts.TABLE_CRITICAL))


def panels() -> list[tuple[str, list[tuple[Panel, int, int]]]]:
    """(row title, [(panel, width, height)]) in display order."""
    ratio_th = steps(("green", None), ("red", gen_alerts.PROBE_FAILURE_RATIO))
    slow_th = steps(("green", None), ("orange", SLOW_SECONDS))
    glance = [
        (glance_table(), 24, 7),
        (timeseries("Service IP vs endpoints: failed or retried", (
            "Per node: share of DNS probes that failed or needed a retransmission, through the DNS Service IP "
            "(kube-proxy DNAT + conntrack) and straight to each endpoint. Service high while endpoints stay low = "
            "this node's path is broken (DNSServiceIPPathBroken)."), "percentunit", "DNSServiceIPPathBroken",
            [target("A", failed_or_retried_share("node", "service"), "{{node}} service IP"),
             target("B", endpoint_failed_or_retried_share("node"), "{{node}} endpoints")], ratio_th, min=0), 8, 8),
        (timeseries("Service IP vs NodeLocal: p99 latency", (
            "Per node: p99 probe duration through the DNS Service IP and through NodeLocal DNSCache (the sampled "
            "CoreDNS endpoints carry no histogram, docs/scale.md); 5 s and 10 s plateaus are resolver timeouts. "
            f"Line at {SLOW_SECONDS * 1000:.0f} ms (DNSProbeSlow)."),
            "s", "DNSProbeSlow",
            [target("A", p99("node", 'kind="service"'), "{{node}} service IP"),
             target("B", p99("node", 'kind="nodelocal"'), "{{node}} NodeLocal")], slow_th, min=0), 8, 8),
        (alerts_table(), 8, 8),
    ]
    table = [
        (timeseries("Conntrack table usage", (
            f"Entries as a fraction of nf_conntrack_max per node. Lines at {gen_alerts.TABLE_WARNING:.0%} "
            f"(ConntrackTableFilling) and {gen_alerts.TABLE_CRITICAL:.0%} (ConntrackTableNearFull); at 100% new "
            "flows, DNS included, are dropped."), "percentunit", "ConntrackTableNearFull",
            [target("A", f"conntrack_entries{sel()} / conntrack_entries_limit{sel()}", "{{node}} {{instance}}")],
            table_usage_th(), min=0, max=1), 12, 8),
        (timeseries("Entries and limit", "Conntrack entries and nf_conntrack_max per node.", "short",
                    "ConntrackTableFilling",
                    [target("A", f"conntrack_entries{sel()}", "{{node}} entries"),
                     target("B", f"conntrack_entries_limit{sel()}", "{{node}} limit")]), 12, 8),
        (timeseries("Conntrack events per second", (
            "Per node, summed over CPUs: insert_failed (the UDP DNAT race lost a packet), drop (table full), "
            "early_drop (an unassured entry evicted to make room), clash_resolve (the race, repaired)."),
            "pps", "ConntrackInsertFailed",
            [target("A", f"sum by (node) (rate(conntrack_stat_insert_failed_total{sel()}[{RATE}]))",
                    "{{node}} insert_failed"),
             target("B", f"sum by (node) (rate(conntrack_stat_drop_total{sel()}[{RATE}]))", "{{node}} drop"),
             target("C", f"sum by (node) (rate(conntrack_stat_early_drop_total{sel()}[{RATE}]))",
                    "{{node}} early_drop"),
             target("D", f"sum by (node) (rate(conntrack_stat_clash_resolve_total{sel()}[{RATE}]))",
                    "{{node}} clash_resolve")], min=0), 24, 8),
    ]
    fills = [
        (timeseries("Entries by protocol and state", "Per node, the table broken down by protocol and state "
                    "(from the last table scan).", "short", "ConntrackTableFilling",
                    [target("A", f"sum by (node, protocol, state) (conntrack_table_entries{sel()})",
                            "{{node}} {{protocol}} {{state}}")]), 8, 8),
        ({"type": "bargauge", "title": "Top sources", "alert": "ConntrackTableFilling",
          "description": "Pods with the most conntrack entries, per node (conntrack_table_top_sources; empty "
                         "namespace/pod = not a known pod).",
          "targets": [target("A", f"topk(10, sum by (node, namespace, pod) (conntrack_table_top_sources{sel()}))",
                             "{{node}} {{namespace}}/{{pod}}")],
          "fieldConfig": {"defaults": {"unit": "short"}, "overrides": []},
          "options": {"displayMode": "basic", "orientation": "horizontal",
                      "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}}}, 8, 8),
        (timeseries("DNS entries and stale DNS entries", (
            "Per node: conntrack entries of DNS traffic by transport, and DNS entries still NATed to a server "
            "that is no current DNS endpoint (stale after a CoreDNS rollout)."), "short", "DNSServiceIPPathBroken",
            [target("A", f"sum by (node, transport) (conntrack_table_dns_entries{sel()})", "{{node}} {{transport}}"),
             target("B", f"sum by (node) (conntrack_table_stale_dns_entries{sel()})", "{{node}} stale")]), 8, 8),
    ]
    probes = [
        (timeseries("Probe latency p50 / p99 by node and target kind", (
            "Per node and target kind (service, nodelocal, static; endpoints carry no histogram). p99 line at "
            f"{SLOW_SECONDS * 1000:.0f} ms (DNSProbeSlow)."), "s", "DNSProbeSlow",
            [target("A", p99("node, kind", q=0.5), "{{node}} {{kind}} p50"),
             target("B", p99("node, kind"), "{{node}} {{kind}} p99")], slow_th, min=0), 12, 8),
        ({"type": "heatmap", "title": "Probe latency heatmap", "alert": "DNSProbeSlow",
          "description": "Distribution of probe durations over time, all selected nodes and targets: a band at "
                         "5 s is the resolver timeout. Pick one node with the variable to see its own.",
          "targets": [target("A", f"sum by (le) (increase(dns_probe_duration_seconds_bucket{sel()}[{RATE}]))",
                             "{{le}}", format="heatmap")],
          "fieldConfig": {"defaults": {"unit": "s"}, "overrides": []},
          "options": {"calculate": False, "yAxis": {"unit": "s"}, "cellGap": 1,
                      "color": {"mode": "scheme", "scheme": "Oranges", "exponent": 0.5, "fill": "dark-orange",
                                "steps": 64},
                      "tooltip": {"show": True, "yHistogram": True}, "legend": {"show": True},
                      "rowsFrame": {"layout": "auto"}}}, 12, 8),
        (timeseries("Probe failure ratio by node and target kind", (
            f"Per node and target kind: failed probes / probes. Line at {gen_alerts.PROBE_FAILURE_RATIO:.0%} "
            "(DNSProbeFailures)."), "percentunit", "DNSProbeFailures",
            [target("A", f"{or_zero('dns_probe_failures_total', 'node, kind')} / sum by (node, kind) "
                         f"(rate(dns_probe_requests_total{sel()}[{RATE}]))", "{{node}} {{kind}}"),
             target("B", endpoint_failed_or_retried_share("node, kind", 'result!~"ok|retried"'),
                    "{{node}} {{kind}} (sampled)")],
            ratio_th, min=0), 12, 8),
        (timeseries("Retries and partial pairs", (
            "Per node: retransmitted queries by target kind and mode, and parallel A/AAAA pairs with one half "
            "lost on the first attempt (the conntrack race's fingerprint; each is a 5-second wait for glibc/musl)."),
            "reqps", "DNSParallelQueryRetries",
            [target("A", f"sum by (node, kind, mode) (rate(dns_probe_retries_total{sel()}[{RATE}])) or sum by "
                         f"(node, kind, mode) (rate(dns_probe_requests_total{sel()}[{RATE}])) * 0",
                    "{{node}} {{kind}} {{mode}} retries"),
             target("B", f"sum by (node, kind) (rate(dns_probe_partial_pairs_total{sel()}[{RATE}])) or sum by "
                         f"(node, kind) (rate(dns_probe_requests_total{sel(PARALLEL)}[{RATE}])) * 0",
                    "{{node}} {{kind}} partial pairs")], min=0), 12, 8),
        (timeseries("Application lookups by C library and result", (
            "Per C library (resolver model: glibc, musl, ...): lookups that got every address family (ok), one "
            "family only (partial: glibc after a lost half) or nothing (failed: EAI_AGAIN). docs/resolvers.md."),
            "reqps", "DNSProbeFailures",
            [target("A", f"sum by (node, resolver, result) (rate(dns_probe_lookups_total{sel()}[{RATE}]))",
                    "{{node}} {{resolver}} {{result}}")], min=0), 12, 8),
        (timeseries("What applications waited, p50 / p99 by C library", (
            "Per C library: the wait of an application lookup. glibc's classes are 5, 10, 15 and 20 s after "
            "losses, musl's 2.5 and 5 s; the buckets separate them."), "s", "DNSProbeSlow",
            [target("A", f"histogram_quantile(0.5, sum by (node, resolver, le) "
                         f"(rate(dns_probe_lookup_duration_seconds_bucket{sel()}[{RATE}])))",
                    "{{node}} {{resolver}} p50"),
             target("B", f"histogram_quantile(0.99, sum by (node, resolver, le) "
                         f"(rate(dns_probe_lookup_duration_seconds_bucket{sel()}[{RATE}])))",
                    "{{node}} {{resolver}} p99")],
            min=0), 12, 8),
    ]
    # Real clients' DNS from conntrack events (exporter/dnsflows/, issue 14), beside the probe panels. A node
    # without real DNS flows shows a 0 line (the event counters always exist), not an empty panel.
    svc = 'server_kind="service"'
    flows = f"sum by (node, backend) (rate(conntrack_dns_flows_total{sel(svc)}[{RATE}]))"
    new = 'type="new"'
    no_events = f"sum by (node) (rate(conntrack_dns_events_total{sel(new)}[{RATE}])) * 0"
    unanswered = (f"(sum by (node, backend) (rate(conntrack_dns_unanswered_flows_total{sel(svc)}[{RATE}])) "
                  f"or {flows} * 0)")
    probes += [
        (timeseries("Real DNS flows by backend", (
            "Per node: pods' (and the node's) DNS flows through the DNS Service IP per second, by the CoreDNS "
            "backend the DNAT chose, from conntrack events; the exporter's own probes are left out. One backend "
            "far above the others = hot-spotting."), "reqps", "DNSBackendUnanswered",
            [target("A", f"{flows} or {no_events}", "{{node}} {{backend}}")], min=0), 12, 8),
        (timeseries("Real DNS flows unanswered by backend", (
            "Per node and backend: share of the DNS flows destroyed without ever seeing a reply. Line at "
            f"{gen_alerts.FLOWS_UNANSWERED_RATIO:.0%} (DNSBackendUnanswered, when another backend answers)."),
            "percentunit", "DNSBackendUnanswered",
            [target("A", f"{unanswered} / {flows} or {no_events}", "{{node}} {{backend}}")],
            steps(("green", None), ("red", gen_alerts.FLOWS_UNANSWERED_RATIO)), min=0), 12, 8),
    ]
    exporter = [
        (timeseries("Probe targets", "Per node, the DNS servers probed, by kind (dns_probe_target_info).", "short",
                    "DNSProbeFailures",
                    [target("A", f"count by (node, kind) (dns_probe_target_info{sel()})", "{{node}} {{kind}}")],
                    min=0), 6, 6),
        (timeseries("Collector success", (
            "Per node and collector: 1 when the last scrape's collection succeeded; kubernetes = the API watch "
            "is up. 0 for 10 minutes fires ConntrackDNSExporterCollectorFailing."), "bool",
            "ConntrackDNSExporterCollectorFailing",
            [target("A", f"min by (node, collector) (conntrack_dns_exporter_collector_success{sel()})",
                    "{{node}} {{collector}}"),
             target("B", f"min by (node) (conntrack_dns_exporter_kubernetes_up{sel()})", "{{node}} kubernetes")],
            min=0, max=1), 6, 6),
        (timeseries("Scrape duration by collector", "Per node and collector, how long the last collection took.",
                    "s", "ConntrackDNSExporterCollectorFailing",
                    [target("A", f"max by (node, collector) (conntrack_dns_exporter_collector_duration_seconds{sel()})",
                            "{{node}} {{collector}}")], min=0), 6, 6),
        ({"type": "table", "title": "Exporter versions", "alert": "ConntrackDNSExporterDown",
          "description": "How many exporters run each version (conntrack_dns_exporter_build_info); a node missing "
                         "from the Node variable is not scraped (ConntrackDNSExporterDown).",
          "targets": [target("A", f"count by (version, python_version) ({INFO}{sel()})", instant=True)],
          "transformations": [{"id": "organize", "options": {"excludeByName": {"Time": True},
                                                             "renameByName": {"Value": "exporters"}}}],
          "fieldConfig": {"defaults": {"unit": "short"}, "overrides": []},
          "options": {"showHeader": True, "cellHeight": "sm"}}, 6, 6),
    ]
    return [("At a glance: every node", glance), ("Conntrack table", table), ("What fills the table", fills),
            ("DNS probes", probes), ("Exporter", exporter)]


def variable(name: str, label: str, query: str, *, multi: bool) -> dict[str, Any]:
    v: dict[str, Any] = {
        "type": "query", "name": name, "label": label, "datasource": DS, "definition": query,
        "query": {"query": query, "refId": name}, "hide": 0, "refresh": 2, "sort": 1, "regex": "", "options": [],
        "includeAll": multi, "multi": multi,
    }
    if multi:
        v.update(allValue=".*", current={"selected": True, "text": ["All"], "value": ["$__all"]})
    else:
        v["current"] = {"selected": True, "text": gen_alerts.DEFAULT_JOB, "value": gen_alerts.DEFAULT_JOB}
    return v


def dashboard() -> dict[str, Any]:
    out: list[Panel] = []
    y = 0
    next_id = 1
    for row_title, row in panels():
        out.append({"id": next_id, "type": "row", "title": row_title, "collapsed": False, "panels": [],
                    "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
        next_id += 1
        y += 1
        x, row_h = 0, 0
        for panel, w, h in row:
            if x + w > 24:
                x, y, row_h = 0, y + row_h, 0
            alert = panel.pop("alert")
            p = {"id": next_id, "type": panel.pop("type"), "title": panel.pop("title"),
                 "description": panel.pop("description"), "datasource": DS,
                 "gridPos": {"h": h, "w": w, "x": x, "y": y},
                 "links": [{"title": f"Runbook: {alert}", "url": runbook(alert), "targetBlank": True}], **panel}
            out.append(p)
            next_id += 1
            x += w
            row_h = max(row_h, h)
        y += row_h
    return {
        "uid": "conntrack-dns-exporter",
        "title": "Conntrack and DNS path",
        "description": "conntrack-dns-exporter: the node conntrack table and the DNS path (the Kubernetes 5-second "
                       "DNS problem). Generated by scripts/gen_dashboard.py.",
        "tags": ["conntrack", "dns", "kubernetes"],
        "editable": True, "graphTooltip": 1, "schemaVersion": 39, "version": 1,
        "time": {"from": "now-3h", "to": "now"}, "refresh": "30s", "timezone": "",
        "links": [{"title": "Runbooks", "type": "link", "targetBlank": True,
                   "url": gen_alerts.RUNBOOK_BASE_URL.replace("/blob/", "/tree/").rstrip("/")}],
        "annotations": {"list": [{"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                                  "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
                                  "name": "Annotations & Alerts", "type": "dashboard"}]},
        "templating": {"list": [
            {"type": "datasource", "name": "datasource", "label": "Data source", "query": "prometheus",
             "current": {}, "hide": 0, "refresh": 1, "regex": "", "includeAll": False, "multi": False, "options": []},
            variable("job", "Job", f"label_values({INFO}, job)", multi=False),
            variable("node", "Node", f'label_values({INFO}{{job="$job"}}, node)', multi=True),
            variable("instance", "Instance", f'label_values({INFO}{{job="$job", node=~"$node"}}, instance)',
                     multi=True),
        ]},
        "panels": out,
    }


def text() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if the committed files are not up to date")
    a = p.parse_args(argv)
    t = text()
    stale = [f for f in (DASHBOARD, CHART_COPY) if not f.exists() or f.read_text() != t]
    if a.check:
        if stale:
            print(f"stale dashboard: {', '.join(str(f.relative_to(ROOT)) for f in stale)}; "
                  "run python scripts/gen_dashboard.py", file=sys.stderr)
            return 1
        return 0
    for f in stale:
        f.write_text(t)
        print(f"wrote {f.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

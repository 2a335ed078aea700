"""The Grafana dashboard (deploy/grafana/conntrack-dns-exporter.json): loads, has the datasource/job/node
variables, every panel and query bound to the datasource variable, unique ids, a grid without overlaps, the
panels the issue asks for, only metric names the exporter exports, every query filtered by job and node, and
every query parses as PromQL (promtool parses them as recording rules: no server needed). The end-to-end test
runs the same queries against a real Prometheus and requires data."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "conntrack-dns-exporter.json"
DS_UID = "${datasource}"
EXPORTED = {
    "conntrack_entries", "conntrack_entries_limit", "conntrack_stat_insert_failed_total", "conntrack_stat_drop_total",
    "conntrack_stat_early_drop_total", "conntrack_stat_clash_resolve_total", "conntrack_table_entries",
    "conntrack_table_top_sources", "conntrack_table_dns_entries", "conntrack_table_stale_dns_entries",
    "dns_probe_duration_seconds_bucket", "dns_probe_failures_total", "dns_probe_requests_total",
    "dns_probe_retries_total", "dns_probe_partial_pairs_total", "dns_probe_target_info",
    "conntrack_dns_exporter_collector_success", "conntrack_dns_exporter_kubernetes_up",
    "conntrack_dns_exporter_collector_duration_seconds", "dns_probe_endpoint_queries_total",
}
PROMQL_WORDS = {"sum", "by", "min", "max", "count", "topk", "rate", "increase", "histogram_quantile", "or", "and",
                "on", "le", "node", "kind", "mode", "collector", "protocol", "state", "namespace", "pod",
                "transport", "job", "result"}


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def queries() -> list[tuple[str, str]]:
    """(panel title, expr) for every query of every panel."""
    return [(p["title"], t["expr"]) for p in panels() for t in p["targets"]]


def concrete(expr: str, job: str = "conntrack-dns-exporter", node: str = ".*", rate_interval: str = "1m") -> str:
    """An expr with Grafana's variables replaced the way Grafana would, for Prometheus/promtool."""
    return expr.replace("$__rate_interval", rate_interval).replace("$job", job).replace("$node", node)


def test_variables() -> None:
    tpl = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert tpl["datasource"]["type"] == "datasource" and tpl["datasource"]["query"] == "prometheus"
    for name in ("job", "node"):
        assert tpl[name]["type"] == "query"
        assert tpl[name]["datasource"]["uid"] == DS_UID
    assert '$job' in tpl["node"]["query"]["query"] and "node)" in tpl["node"]["query"]["query"]
    assert tpl["node"]["multi"] and tpl["node"]["includeAll"] and tpl["node"]["allValue"] == ".*"


def test_every_panel_and_query_uses_the_datasource_variable() -> None:
    assert panels()
    for p in panels():
        assert p["datasource"] == {"type": "prometheus", "uid": DS_UID}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == DS_UID, p["title"]
            assert t["expr"].strip(), p["title"]
        ref_ids = [t["refId"] for t in p["targets"]]
        assert len(set(ref_ids)) == len(ref_ids), p["title"]


def test_ids_unique_and_grid_valid() -> None:
    all_panels = dashboard()["panels"]
    ids = [p["id"] for p in all_panels]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in all_panels:
        g = p["gridPos"]
        assert g["w"] > 0 and g["h"] > 0 and g["x"] >= 0 and g["y"] >= 0, p["title"]
        assert g["x"] + g["w"] <= 24, f"{p['title']} runs past the 24-column grid"
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"{p['title']} overlaps another panel"
        cells |= mine


def test_issue_panels_are_there() -> None:
    by_title = {p["title"]: p for p in panels()}
    usage = by_title["Conntrack table usage"]
    steps = [s["value"] for s in usage["fieldConfig"]["defaults"]["thresholds"]["steps"]]
    assert 0.75 in steps and 0.9 in steps, "the 75% / 90% lines"
    assert usage["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"]["mode"].startswith("line")
    events = " ".join(t["expr"] for t in by_title["Conntrack events per second"]["targets"])
    for stat in ("insert_failed", "drop", "early_drop", "clash_resolve"):
        assert f"conntrack_stat_{stat}_total" in events, stat
    lat = [t["expr"] for t in by_title["Probe latency p50 / p99 by target kind"]["targets"]]
    assert any("histogram_quantile(0.5," in e for e in lat) and any("histogram_quantile(0.99," in e for e in lat)
    assert all("by (kind, le)" in e for e in lat)
    heat = by_title["Probe latency heatmap"]
    assert heat["type"] == "heatmap" and heat["targets"][0]["format"] == "heatmap"
    assert "by (kind)" in by_title["Probe failure ratio by target kind"]["targets"][0]["expr"]
    rp = " ".join(t["expr"] for t in by_title["Retries and partial pairs"]["targets"])
    assert "dns_probe_retries_total" in rp and "dns_probe_partial_pairs_total" in rp
    cmp_ = [t["expr"] for t in by_title["Service IP vs endpoints: failed or retried"]["targets"]]
    assert any('kind="service"' in e for e in cmp_) and any('kind="endpoint"' in e for e in cmp_)


def test_queries_use_exported_metrics_and_the_variables() -> None:
    for title, expr in queries():
        bare = re.sub(r'"[^"]*"', '""', expr)
        bare = re.sub(r"\[[^\]]*\]", "", bare)
        names = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", bare)) - PROMQL_WORDS
        assert names <= EXPORTED, f"{title}: unknown metrics {names - EXPORTED}"
        for metric, sel in re.findall(r"([a-z_:]+)\{([^}]*)\}", expr):
            assert 'job="$job"' in sel and 'node=~"$node"' in sel, f"{title}: {metric} ignores the variables"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool missing (Debian package prometheus)")
def test_every_query_parses(tmp_path: Path) -> None:
    rules = [{"record": f"dashboard:query_{i}", "expr": concrete(e)} for i, (_t, e) in enumerate(queries())]
    f = tmp_path / "queries.yaml"
    f.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = subprocess.run(["promtool", "check", "rules", str(f)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(rules)} rules found" in r.stdout

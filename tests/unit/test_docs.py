"""The docs users read stay true: the flag reference matches the parser, every metric is documented,
and the README's commands exist."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from prometheus_client.metrics_core import Metric

from exporter.app import build_registry
from exporter.conntrack import fixtures as conntrack_fixtures
from exporter.conntrack.collector import ConntrackCollector
from exporter.conntrack.sysctl import StaticSysctlSource
from exporter.discovery import Discovery, Target
from exporter.dns.collector import DnsProbeCollector
from exporter.dns.resolver import ProbeResult, QueryOutcome
from exporter.dns.store import ProbeStore
from exporter.dnsflows.collector import DnsFlowsCollector
from exporter.dnsflows.flows import FlowStats
from exporter.dnsflows.listener import FlowListener
from exporter.dnsflows.parse import iter_flows
from exporter.kubernetes.collector import KubernetesCollector
from exporter.kubernetes.state import KubeState
from exporter.table.collector import TableCollector
from exporter.table.fixtures import fixture_socket_factory, load_fixture
from exporter.table.scan import Scanner
from exporter.table.service import TableScanService
from exporter.web.notrack import Notrack
from exporter.web.server import ExporterHTTPServer

ROOT = Path(__file__).resolve().parent.parent.parent


def test_flag_reference_matches_the_parser() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gen_flags_doc
    finally:
        sys.path.pop(0)
    assert (ROOT / "docs" / "flags.md").read_text() == gen_flags_doc.render(), (
        "docs/flags.md is stale: run `python scripts/gen_flags_doc.py`")


def _families() -> list[Metric]:
    """Every family the exporter can emit, from its real collectors fed with recorded or built data."""
    fixtures = ROOT / "tests" / "fixtures"
    data = conntrack_fixtures.load(fixtures / "conntrack-incident.json")
    src = conntrack_fixtures.FixtureStatsSource(data)
    discovery = Discovery()
    discovery.targets.set("static", [Target("127.0.0.1"), Target("10.96.0.10", kind="service"),
                                     Target("169.254.20.10", kind="nodelocal"),
                                     Target("10.244.1.5", kind="endpoint", pod="coredns-1")])
    table = TableScanService(Scanner(fixture_socket_factory(load_fixture(fixtures / "table-mixed.json")), pace=0),
                             discovery=discovery)
    table.scan_once()
    store = ProbeStore()
    for t in discovery.targets.snapshot():
        store.ensure((t.server, t.kind), ("parallel",), ("glibc",))
        outcomes = {"A": QueryOutcome("A", True, None, 1, 1), "AAAA": QueryOutcome("AAAA", True, "timeout")}
        r = ProbeResult("parallel", 0.01, outcomes, {"A": 1}, "AAAA", 3)
        store.record((t.server, t.kind), r)
    store.skip(("10.244.1.5:53", "endpoint"), "busy")
    store.set_present("169.254.20.10:53", True)
    store.record_search("web", 4, 0.01)
    flows = FlowListener(FlowStats(discovery), events_sysctl=lambda: 2)
    for hexdata in json.loads((fixtures / "dnsflows-events.json").read_text())["events"]:
        d = bytes.fromhex(hexdata)
        for mtype, flow in iter_flows(d, len(d)):
            if flow is not None:
                (flows.stats.new if mtype == 256 else flows.stats.destroy)(flow)
    flows.check_sysctl()
    state = KubeState(("services", "endpointslices", "pods"))
    state.ok("services", 1)
    collectors = [ConntrackCollector(src, StaticSysctlSource(src.sysctl)), TableCollector(table),
                  DnsProbeCollector(store, discovery.targets), KubernetesCollector(state),
                  DnsFlowsCollector(flows)]
    registry = build_registry(collectors)
    server = ExporterHTTPServer("127.0.0.1", 0, registry)
    try:
        families = [*registry.collect(), *server.collect(), *Notrack(server.port).collect()]
    finally:
        server.server_close()
    return families


def _documented() -> dict[str, tuple[str, str]]:
    """docs/metrics.md rows: name -> (type, source module)."""
    rows = {}
    for line in (ROOT / "docs" / "metrics.md").read_text().splitlines():
        m = re.match(r"\| `([a-z0-9_*]+)` \| ([a-z ]+) \|.*\| `([^`]+)`[^|]*\|$", line)
        if m:
            rows[m.group(1)] = (m.group(2).strip(), m.group(3))
    return rows


def test_every_metric_served_is_documented_with_its_type_and_source_module() -> None:
    """What a scrape really returns (f-string names included) each has a row naming its type and the module
    that emits it; the module named really contains the name."""
    rows = _documented()
    problems = []
    for fam in _families():
        if fam.name.startswith("process_") or fam.name.startswith("python_"):
            continue
        name = fam.name + ("_total" if fam.type == "counter" else "")
        if name not in rows:
            problems.append(f"{name}: no row")
            continue
        typ, source = rows[name]
        if typ != fam.type:
            problems.append(f"{name}: documented as {typ}, served as {fam.type}")
        short = fam.name.removeprefix("conntrack_dns_exporter_").removeprefix("conntrack_stat_")
        if short not in (ROOT / source).read_text():
            problems.append(f"{name}: {source} does not emit it")
    assert not problems, problems
    assert len(rows) >= 40


def test_readme_commands_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert "make demo" in readme and "make test" in readme
    for target in ("demo", "test", "bench"):
        assert re.search(rf"^{target}:", makefile, re.M), target
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci

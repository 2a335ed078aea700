"""The conntrack collector on netlink replies recorded from a real kernel (tests/fixtures).

Values are checked against pyroute2's generic decoder of the same bytes, an independent implementation
of the ctnetlink message format, so a parsing slip in ours shows up as a mismatch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from pyroute2.netlink.nfnetlink import nfctsocket
from pyroute2.netlink.nlsocket import Marshal

from exporter.conntrack.collector import ConntrackCollector
from exporter.conntrack.fixtures import FixtureStatsSource, load
from exporter.conntrack.stats import CPU_STAT_NAMES, IPCTNL_MSG_CT_GET_STATS, IPCTNL_MSG_CT_GET_STATS_CPU
from exporter.conntrack.sysctl import StaticSysctlSource
from exporter.core.scrape import ScrapeWrapper
from tests.support.golden import check_golden

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
INCIDENT = FIXTURES / "conntrack-incident.json"
GROWING = FIXTURES / "conntrack-insert-failed.json"


def reference_decode(sample: dict[str, Any]) -> tuple[dict[int, dict[str, int]], int, int]:
    """Decode one recorded sample with pyroute2 (the reference)."""
    m = Marshal()
    m.msg_map[(1 << 8) | IPCTNL_MSG_CT_GET_STATS_CPU] = nfctsocket.nfct_stats_cpu
    m.msg_map[(1 << 8) | IPCTNL_MSG_CT_GET_STATS] = nfctsocket.nfct_stats
    per_cpu: dict[int, dict[str, int]] = {}
    for h in sample["stats_cpu"]:
        for msg in m.parse(bytes.fromhex(h)):
            if msg["header"]["type"] != (1 << 8) | IPCTNL_MSG_CT_GET_STATS_CPU:
                continue
            per_cpu[msg["res_id"]] = {s: msg.get_attr(f"CTA_STATS_{s.upper()}") or 0 for s in CPU_STAT_NAMES}
    entries = limit = -1
    for h in sample["stats"]:
        for msg in m.parse(bytes.fromhex(h)):
            if msg["header"]["type"] == (1 << 8) | IPCTNL_MSG_CT_GET_STATS:
                entries = msg.get_attr("CTA_STATS_GLOBAL_ENTRIES")
                limit = msg.get_attr("CTA_STATS_GLOBAL_MAX_ENTRIES")
    return per_cpu, entries, limit


def registry_for(path: Path, per_cpu: bool = False) -> tuple[CollectorRegistry, ConntrackCollector]:
    src = FixtureStatsSource(load(path))
    collector = ConntrackCollector(src, StaticSysctlSource(src.sysctl), per_cpu=per_cpu)
    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector)  # type: ignore[arg-type]
    return reg, collector


def test_incident_fixture_matches_reference_decoder() -> None:
    data = json.loads(INCIDENT.read_text())
    per_cpu, entries, limit = reference_decode(data["samples"][0])
    reg, _ = registry_for(INCIDENT)
    assert reg.get_sample_value("conntrack_entries") == entries
    assert reg.get_sample_value("conntrack_entries_limit") == limit
    for stat in CPU_STAT_NAMES:
        want = sum(c[stat] for c in per_cpu.values())
        assert reg.get_sample_value(f"conntrack_stat_{stat}_total") == want, stat
    # the recording really holds the incident's fingerprints
    for stat in ("insert_failed", "drop", "clash_resolve"):
        assert (reg.get_sample_value(f"conntrack_stat_{stat}_total") or 0) > 0, stat
    assert entries == limit  # recorded with the table full


def test_per_cpu_mode_labels_each_cpu_and_sums_to_totals() -> None:
    data = json.loads(INCIDENT.read_text())
    per_cpu, _, _ = reference_decode(data["samples"][0])
    reg, _ = registry_for(INCIDENT, per_cpu=True)
    assert len(per_cpu) >= 2
    for cpu, stats in per_cpu.items():
        for stat in CPU_STAT_NAMES:
            assert reg.get_sample_value(f"conntrack_stat_{stat}_total", {"cpu": str(cpu)}) == stats[stat]
    assert reg.get_sample_value("conntrack_stat_drop_total") is None  # no unlabelled series in per-CPU mode


def test_growing_fixture_replays_a_rising_counter_then_holds() -> None:
    data = json.loads(GROWING.read_text())
    reg, _ = registry_for(GROWING)
    seen = []
    for _ in range(len(data["samples"]) + 2):
        seen.append(reg.get_sample_value("conntrack_stat_insert_failed_total"))
    assert seen == sorted(seen), "a counter must never go down"
    assert seen[len(data["samples"]) - 1] > seen[0]
    assert seen[-1] == seen[-2] == seen[len(data["samples"]) - 1]  # holds the last sample


def test_timeouts_and_buckets_come_from_the_recorded_sysctls() -> None:
    data = json.loads(INCIDENT.read_text())
    reg, _ = registry_for(INCIDENT)
    assert reg.get_sample_value("conntrack_buckets") == data["sysctl"]["nf_conntrack_buckets"]
    tw = reg.get_sample_value("conntrack_timeout_seconds", {"protocol": "tcp", "state": "time_wait"})
    assert tw == data["sysctl"]["nf_conntrack_tcp_timeout_time_wait"]
    udp = reg.get_sample_value("conntrack_timeout_seconds", {"protocol": "udp", "state": "unreplied"})
    assert udp == data["sysctl"]["nf_conntrack_udp_timeout"]


def scrape_once(reg: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """One collection (each get_sample_value call would be a scrape of its own)."""
    out = {}
    for fam in reg.collect():
        for smp in fam.samples:
            out[(smp.name, tuple(sorted(smp.labels.items())))] = smp.value
    return out


def test_golden_exposition(tmp_path: Path) -> None:
    """The exposition format is a contract (alerts and dashboards parse it): compare with the golden file.

    UPDATE_GOLDEN=1 rewrites it; `promtool check metrics` lints it when promtool is installed.
    """
    reg, _ = registry_for(INCIDENT)
    check_golden(generate_latest(reg).decode(), "conntrack-incident.prom")


def test_garbled_reply_fails_the_collector_but_not_the_scrape(tmp_path: Path) -> None:
    data = json.loads(INCIDENT.read_text())
    sample = data["samples"][0]
    sample["stats_cpu"][0] = sample["stats_cpu"][0][: len(sample["stats_cpu"][0]) // 2 - 6]  # cut mid-message
    bad = tmp_path / "garbled.json"
    bad.write_text(json.dumps(data))
    src = FixtureStatsSource(load(bad))
    reg = CollectorRegistry(auto_describe=False)
    reg.register(ScrapeWrapper([ConntrackCollector(src, StaticSysctlSource(src.sysctl))]))
    got = scrape_once(reg)
    parse_errors = ("conntrack_dns_exporter_collector_errors_total", (("collector", "conntrack"), ("reason", "parse")))
    assert got[("conntrack_dns_exporter_collector_success", (("collector", "conntrack"),))] == 0
    assert got[parse_errors] == 1
    # what could still be read is still served
    assert got[("conntrack_buckets", ())] == data["sysctl"]["nf_conntrack_buckets"]
    assert ("conntrack_stat_drop_total", ()) not in got
    assert scrape_once(reg)[parse_errors] == 2


def test_a_broken_collector_never_breaks_the_others() -> None:
    class Boom:
        name = "boom"

        def collect(self) -> list[Any]:
            raise RuntimeError("bug")

    src = FixtureStatsSource(load(INCIDENT))
    reg = CollectorRegistry(auto_describe=False)
    reg.register(ScrapeWrapper([Boom(), ConntrackCollector(src)]))  # type: ignore[list-item]
    text = generate_latest(reg).decode()
    assert "Traceback" not in text and "bug" not in text
    got = scrape_once(reg)
    assert got[("conntrack_dns_exporter_collector_success", (("collector", "boom"),))] == 0
    assert got[("conntrack_dns_exporter_collector_errors_total", (("collector", "boom"), ("reason", "internal")))] == 2
    assert got[("conntrack_dns_exporter_collector_success", (("collector", "conntrack"),))] == 1
    assert got[("conntrack_entries_limit", ())] == 262144

"""The table breakdown on recorded kernel dumps (no root needed).

`tests/fixtures/table-mixed.json` holds the raw netlink datagrams of one dump of a namespace with real
TCP/UDP/ICMP flows, and `conntrack -L -o extended` taken at the same moment: every count the parser
derives must equal what the C tool listed. `table-truncated.json` / `table-garbled.json` are the same
dump cut or corrupted on purpose (their descriptions say how).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import struct
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import CollectorRegistry

from exporter.core.scrape import ScrapeWrapper
from exporter.discovery import Discovery
from exporter.discovery.pods import PodIndex
from exporter.discovery.targets import Target, TargetRegistry
from exporter.netlink import NLMSGHDR
from exporter.table import parse as ctdump
from exporter.table.collector import TableCollector
from exporter.table.fixtures import ReplaySocket
from exporter.table.parse import DumpParser, ip_key
from exporter.table.scan import Scanner
from exporter.table.service import TableScanService, summarize
from tests.integration.test_table_scan import reference
from tests.support.golden import check_golden

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    return data


def datagrams(name: str) -> list[bytes]:
    return [bytes.fromhex(h) for h in load(name)["datagrams"]]


def replay(dgrams: list[bytes], **kw: Any) -> Scanner:
    return Scanner(lambda: ReplaySocket(dgrams), pace=0, **kw)


def registry_for(service: TableScanService) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(ScrapeWrapper([TableCollector(service)]))
    return reg


def test_recorded_dump_matches_conntrack_list() -> None:
    data = load("table-mixed.json")
    result = replay(datagrams("table-mixed.json")).scan()
    ref = reference(data["conntrack_list"])
    assert not result.partial
    assert result.agg.entries == ref["entries"] == data["entries"]
    assert result.agg.named_states() == ref["states"]
    assert result.agg.dns_by_transport() == ref["dns"]
    assert len(ref["states"]) >= 8  # tcp in 5 states, udp in 3, icmp, icmpv6


def test_walk_and_fast_path_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fixed-offset fast path must give exactly what the attribute walk gives."""
    dgrams = datagrams("table-mixed.json")
    servers = [ip_key("10.96.0.10"), ip_key("127.0.0.1")]
    fast = DumpParser([ip_key("127.0.0.1"), ip_key("::1")], servers)  # type: ignore[list-item]
    for d in dgrams:
        fast.feed(d)
    monkeypatch.setattr(ctdump, "_ORIG4", -1)  # no message matches the fast layout any more
    monkeypatch.setattr(ctdump, "_ORIG6", -1)
    monkeypatch.setattr(ctdump, "_TCP_HDR", -1)
    slow = DumpParser([ip_key("127.0.0.1"), ip_key("::1")], servers)  # type: ignore[list-item]
    for d in dgrams:
        slow.feed(d)
    assert fast.done and slow.done
    assert fast.agg == slow.agg
    assert fast.agg.sources[ip_key("127.0.0.1")] > 10  # type: ignore[index]
    # the two queries to the "Service IP" 10.96.0.10 were DNAT'ed to 10.244.0.5, which is no server given
    ref = reference(load("table-mixed.json")["conntrack_list"], servers={"10.96.0.10", "127.0.0.1"})
    assert fast.agg.stale_dns == ref["stale"] == 2
    assert slow.agg.entries == load("table-mixed.json")["entries"]


def test_stale_dns_follows_the_targets() -> None:
    data = load("table-mixed.json")
    dgrams = datagrams("table-mixed.json")
    seen = set()
    for servers in (["10.96.0.10"], ["10.96.0.10", "10.244.0.5"], ["127.0.0.1"], ["10.0.0.1"],
                    ["10.96.0.10", "127.0.0.1", "::1"]):
        agg = replay(dgrams).scan(dns_servers=[ip_key(s) for s in servers]).agg  # type: ignore[misc]
        assert agg.stale_dns == reference(data["conntrack_list"], servers=set(servers))["stale"], servers
        seen.add(agg.stale_dns)
    assert seen == {0, 2}  # the DNAT'ed pair: stale unless its endpoint 10.244.0.5 is a target
    assert replay(dgrams).scan().stale_checked is False


@pytest.mark.parametrize("name", ["table-truncated.json", "table-garbled.json"])
def test_cut_or_garbled_dump_is_a_partial_scan_and_one_log_line(name: str, caplog: pytest.LogCaptureFixture) -> None:
    data = load(name)
    assert "ON PURPOSE" in data["description"]
    svc = TableScanService(replay(datagrams(name)))
    with caplog.at_level(logging.DEBUG, logger="exporter"):
        first = svc.scan_once()
        second = svc.scan_once()
    assert first is not None and second is not None
    assert first.partial and first.reason == "parse"
    assert first.entries == data["complete_messages"]  # what came before the damage is kept
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]  # not one per scan
    assert "partial table scan" in warnings[0].getMessage()
    reg = registry_for(svc)
    assert reg.get_sample_value("conntrack_table_scan_partial") == 1
    assert reg.get_sample_value("conntrack_table_scan_entries") == data["complete_messages"]
    assert reg.get_sample_value("conntrack_dns_exporter_collector_success", {"collector": "table"}) == 1


def test_scan_recovers_after_a_partial_one(caplog: pytest.LogCaptureFixture) -> None:
    feeds = [datagrams("table-garbled.json"), datagrams("table-mixed.json")]
    svc = TableScanService(Scanner(lambda: ReplaySocket(feeds.pop(0) if len(feeds) > 1 else feeds[0]), pace=0))
    with caplog.at_level(logging.INFO, logger="exporter"):
        assert svc.scan_once().partial  # type: ignore[union-attr]
        assert not svc.scan_once().partial  # type: ignore[union-attr]
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.INFO]


class FlakySocket(ReplaySocket):
    """The recorded dump, but recv fails with `err` after `after` datagrams, `times` times in all."""

    failures = 0

    def __init__(self, dgrams: list[bytes], err: int, after: int, times: int) -> None:
        super().__init__(dgrams)
        self.err, self.after, self.times = err, after, times

    def recv_into(self, buffer: bytearray, /) -> int:
        if self._next == self.after and FlakySocket.failures < self.times:
            FlakySocket.failures += 1
            raise OSError(self.err, "injected")
        return super().recv_into(buffer)


@pytest.mark.parametrize("err", [errno.ENOBUFS, errno.EINTR])
def test_interrupted_dump_is_restarted_once(err: int) -> None:
    dgrams = datagrams("table-mixed.json")
    FlakySocket.failures = 0
    result = Scanner(lambda: FlakySocket(dgrams, err, 1, 1), pace=0).scan()
    assert not result.partial and result.restarts == 1
    assert result.agg.entries == load("table-mixed.json")["entries"]  # counted once, not twice
    FlakySocket.failures = 0
    result = Scanner(lambda: FlakySocket(dgrams, err, 1, 2), pace=0).scan()
    assert result.partial and result.reason == "interrupted" and result.restarts == 1


def error_reply(err: int) -> bytes:
    payload = struct.pack("=i", -err) + NLMSGHDR.pack(20, 0x101, 0x301, 1, 0)
    return NLMSGHDR.pack(16 + len(payload), 2, 0, 1, 0) + payload


def test_permission_error_fails_the_collector_not_the_scrape() -> None:
    svc = TableScanService(replay([error_reply(errno.EPERM)]))
    snap = svc.scan_once()
    assert snap is not None and snap.partial and snap.reason == "permission"
    reg = registry_for(svc)
    assert reg.get_sample_value("conntrack_dns_exporter_collector_success", {"collector": "table"}) == 0
    assert reg.get_sample_value("conntrack_dns_exporter_collector_errors_total",
                                {"collector": "table", "reason": "permission"}) >= 1  # type: ignore[operator]
    assert reg.get_sample_value("conntrack_table_scan_partial") == 1
    assert reg.get_sample_value("conntrack_table_entries", {"protocol": "tcp", "state": "established"}) is None


def test_metrics_from_the_last_scan() -> None:
    data = load("table-mixed.json")
    pod_map = {"127.0.0.1": ("default", "web-0"), "::1": ("default", "web-0"), "198.18.0.1": ("shop", "cart"),
               "198.18.0.2": ("shop", "cart"), "198.18.0.3": ("dns", "coredns"), "10.9.9.9": ("idle", "none")}
    ref = reference(data["conntrack_list"], servers={"127.0.0.1", "10.96.0.10"}, pods=pod_map)
    pods = PodIndex()
    pods.replace([(ip, ns, pod) for ip, (ns, pod) in pod_map.items()])
    targets = TargetRegistry()
    targets.set("static", [Target("127.0.0.1"), Target("10.96.0.10", kind="service")])
    svc = TableScanService(replay(datagrams("table-mixed.json")), top_n=2, discovery=Discovery(targets, pods))
    reg = registry_for(svc)
    assert reg.get_sample_value("conntrack_table_scan_entries") is None  # nothing before the first scan
    svc.scan_once()
    for (proto, state), n in ref["states"].items():
        assert reg.get_sample_value("conntrack_table_entries", {"protocol": proto, "state": state}) == n
    assert reg.get_sample_value("conntrack_table_entries", {"protocol": "tcp", "state": "last_ack"}) == 0
    for transport, n in ref["dns"].items():
        assert reg.get_sample_value("conntrack_table_dns_entries", {"transport": transport}) == n
    assert reg.get_sample_value("conntrack_table_stale_dns_entries") == ref["stale"] > 0  # the DNAT'ed pair
    # top 2 pods by entries, then the unknown sources, then the rest of the pods as "other"
    ranked = sorted(((n, p) for p, n in ref["sources"].items() if p != ("", "")), reverse=True)
    assert [p for _, p in ranked] == [("shop", "cart"), ("default", "web-0"), ("dns", "coredns")]
    expected = {p: n for n, p in ranked[:2]}
    expected[("", "")] = ref["sources"][("", "")]
    expected[("", "other")] = sum(n for n, _ in ranked[2:])
    fam = next(m for m in reg.collect() if m.name == "conntrack_table_top_sources")
    got = {(s.labels["namespace"], s.labels["pod"]): s.value for s in fam.samples}
    assert got == expected
    assert sum(got.values()) == data["entries"]
    assert reg.get_sample_value("conntrack_table_scan_partial") == 0
    assert reg.get_sample_value("conntrack_table_scan_entries") == data["entries"]
    assert reg.get_sample_value("conntrack_table_last_scan_timestamp_seconds") > 1.7e9  # type: ignore[operator]


def test_service_thread_scans_and_stops() -> None:
    svc = TableScanService(replay(datagrams("table-mixed.json")), interval=0.01)
    seen: list[Any] = []
    svc._on_scan = seen.append
    svc.start()
    try:
        for _ in range(200):
            if len(seen) >= 3:
                break
            time.sleep(0.01)
    finally:
        svc.stop(timeout=2)
    assert len(seen) >= 3 and all(not s.partial for s in seen)
    assert svc._thread is not None and not svc._thread.is_alive()


def test_internal_error_never_escapes_the_service(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> ReplaySocket:
        raise RuntimeError("boom")

    svc = TableScanService(Scanner(broken))
    with caplog.at_level(logging.ERROR, logger="exporter"):
        snap = svc.scan_once()
    assert snap is not None and snap.partial and snap.reason == "internal"
    assert any("boom" in r.getMessage() for r in caplog.records)
    reg = registry_for(svc)
    assert reg.get_sample_value("conntrack_dns_exporter_collector_errors_total",
                                {"collector": "table", "reason": "internal"}) >= 1  # type: ignore[operator]






def test_golden_exposition() -> None:
    """The exposition is a contract (alerts, dashboard): compare with tests/golden/table-mixed.prom.

    UPDATE_GOLDEN=1 rewrites it; `promtool check metrics` lints it when promtool is installed.
    """
    pods = PodIndex()
    pods.replace([("127.0.0.1", "default", "web-0"), ("198.18.0.1", "shop", "cart")])
    keys = {ip_key(ip): pod for ip, pod in pods.snapshot().items()}
    servers = [ip_key("127.0.0.1"), ip_key("10.96.0.10")]
    result = replay(datagrams("table-mixed.json")).scan(keys, servers)  # type: ignore[arg-type]
    result = dataclasses.replace(result, started=1_790_000_000.0, duration=0.25)
    svc = TableScanService(replay([]))
    svc._latest = summarize(result, keys, 10)  # type: ignore[arg-type]
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Adapter(TableCollector(svc)))
    check_golden(generate_latest(reg).decode(), "table-mixed.prom")


class _Adapter:
    def __init__(self, collector: TableCollector) -> None:
        self._c = collector

    def collect(self) -> Any:
        return self._c.collect()

    def describe(self) -> list[Any]:
        return []


def test_changed_dns_targets_trigger_a_rescan_with_the_new_rule() -> None:
    """A rollout (targets change) is rescanned within seconds, not an interval later; the first scan waits
    briefly for targets to appear rather than publishing a scan that cannot judge stale entries."""
    discovery = Discovery()
    targets = discovery.targets
    discovery.expect("kubernetes")
    seen: list[Any] = []
    svc = TableScanService(replay(datagrams("table-mixed.json")), interval=600, discovery=discovery,
                           on_scan=seen.append)
    svc.start()
    try:
        time.sleep(0.3)
        assert seen == []  # discovery has not answered yet: the first scan waits for it
        targets.set("kubernetes", [Target("10.96.0.10", kind="service"), Target("10.244.0.5", kind="endpoint")])
        discovery.done("kubernetes")
        deadline = time.monotonic() + 5
        while not seen and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(seen) == 1 and seen[0].stale_dns == 0
        # rollout: the endpoint 10.244.0.5 is gone; the DNAT'ed pair in the fixture is now stale
        changed = time.monotonic()
        targets.set("kubernetes", [Target("10.96.0.10", kind="service"), Target("10.244.0.9", kind="endpoint")])
        while len(seen) < 2 and time.monotonic() < changed + 10:
            time.sleep(0.05)
        assert len(seen) == 2 and seen[1].stale_dns == 2
    finally:
        svc.stop(timeout=2)

"""The probe loop (`ProbeService`) and the `dns` collector together, against in-process DNS servers:
targets coming and going, the resolv.conf fallback, NodeLocal presence, the search-path walk, the
cardinality budget, and the real exporter process serving the probe metrics.
"""

from __future__ import annotations

import time
from pathlib import Path

from tests.support.dnsserver import Behaviour, DnsServer
from tests.support.exporter_proc import Exporter, value


def test_exporter_process_serves_probe_metrics_and_stops_promptly(tmp_path: Path) -> None:
    with DnsServer(Behaviour(only="A")) as s:
        exp = Exporter(["--collector.dns", "--no-collector.conntrack", f"--probe.server={s.address}",
                        "--probe.modes=parallel,sequential,tcp", "--probe.timeout=0.2s", "--probe.interval=0.3s",
                        f"--probe.resolv-conf={tmp_path / 'none'}"])
        with exp:
            deadline = time.monotonic() + 5
            samples = exp.scrape()
            while time.monotonic() < deadline and not value(samples, "dns_probe_partial_pairs_total",
                                                            server=s.address, kind="static", lost_qtype="AAAA"):
                time.sleep(0.2)
                samples = exp.scrape()
            assert (value(samples, "dns_probe_partial_pairs_total", server=s.address, kind="static",
                          lost_qtype="AAAA") or 0) >= 1
            assert (value(samples, "dns_probe_failures_total", server=s.address, kind="static", mode="tcp",
                          qtype="AAAA", zone="cluster", reason="timeout") or 0) >= 1
            assert value(samples, "conntrack_dns_exporter_collector_success", collector="dns") == 1
            t0 = time.monotonic()
            assert exp.stop() == 0
            assert time.monotonic() - t0 < 2.5, "SIGTERM must not wait for probes in flight"

"""Issue 8: the exporter stays scrapeable while its node's conntrack table is 100% full.

Real components only: the exporter runs in namespace "node" (its own conntrack table, filled to the
global nf_conntrack_max with real kernel entries by tests.support.ctfill); the Debian `prometheus` binary
runs in namespace "mon" and scrapes it across a veth, so every scrape packet crosses the node namespace's
conntrack exactly as a Prometheus pod's scrape crosses a node's.

Three exporters share the node namespace:
- :19101 keep-alive on (the default)      -> Prometheus's tracked connection survives the fill: `up` stays 1;
- :19102 `--no-web.keepalive`             -> every scrape needs a new connection: `up` drops to 0
  (the measured failure of prometheus_client's HTTP/1.0 server, so the test can fail);
- :19103 `--web.notrack`                  -> even brand-new connections work at 100% (and a new
  connection to :19101, whose port is tracked, does not).
With the project's alert rules loaded (`for` shortened), ConntrackTableNearFull and
ConntrackTableFull fire for the keep-alive instance.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import ctfill
from tests.support.exporter_proc import Exporter, parse, value
from tests.support.netns import Netns, in_netns, skip_reason

pytestmark = [pytest.mark.netns, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "alerts" / "conntrack-dns-exporter.rules.yaml"
NODE_IP, MON_IP = "10.88.0.1", "10.88.0.2"
KEEPALIVE, NO_KEEPALIVE, NOTRACK = 19101, 19102, 19103
JOB = "conntrack-dns-exporter"  # the job name the shipped alert rules select


def _limit() -> int:
    return int(Path("/proc/sys/net/netfilter/nf_conntrack_max").read_text())


class Prometheus:
    def __init__(self, ns: Netns, tmp: Path, targets: list[str], rules: Path | None) -> None:
        self.ns = ns
        cfg = {
            "global": {"scrape_interval": "2s", "scrape_timeout": "1500ms", "evaluation_interval": "1s"},
            "rule_files": [str(rules)] if rules else [],
            "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": targets}]}],
        }
        (tmp / "prometheus.yml").write_text(json.dumps(cfg))  # JSON is YAML
        self.log = (tmp / "prometheus.log").open("w")
        self.proc = ns.popen(["prometheus", f"--config.file={tmp / 'prometheus.yml'}",
                              f"--storage.tsdb.path={tmp / 'data'}", "--web.listen-address=127.0.0.1:9090"],
                             stdout=self.log, stderr=subprocess.STDOUT)

    def api(self, path: str, **params: str) -> Any:
        def get() -> Any:
            conn = http.client.HTTPConnection("127.0.0.1", 9090, timeout=5)
            try:
                conn.request("GET", f"/api/v1/{path}?{urllib.parse.urlencode(params)}")
                return json.loads(conn.getresponse().read())
            finally:
                conn.close()

        return in_netns(self.ns.name, get)

    def query(self, expr: str) -> dict[str, float]:
        """instance -> value of an instant query."""
        data = self.api("query", query=expr)
        assert data["status"] == "success", data
        return {r["metric"].get("instance", ""): float(r["value"][1]) for r in data["data"]["result"]}

    def wait(self, expr: str, want: dict[str, float], timeout: float) -> dict[str, float]:
        deadline = time.monotonic() + timeout
        got: dict[str, float] = {}
        while time.monotonic() < deadline:
            try:
                got = self.query(expr)
                if all(got.get(k) == v for k, v in want.items()):
                    return got
            except OSError:
                pass
            time.sleep(0.5)
        return got

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def _shortened_rules(tmp: Path) -> Path | None:
    """The shipped rules with every `for:` cut to 2s, so a test can watch them fire."""
    if not RULES.exists():
        return None
    out = tmp / "rules.yaml"
    out.write_text(re.sub(r"(\n\s*for:\s*)\S+", r"\g<1>2s", RULES.read_text()))
    return out


def _keep_full(ns: str, stop: threading.Event) -> None:
    """Take every slot the kernel frees, as a busy node's other traffic does.

    At 100% the kernel evicts closing TCP entries (TIME_WAIT of earlier scrape connections, for one) to
    make room; on a real full node other new flows grab those slots at once. Without this a lone test
    would find a free slot after each eviction and the failure would not reproduce.
    """
    limit, index = _limit(), 4 * _limit()
    while not stop.wait(0.02):
        need = limit - ctfill.count(ns)
        if need > 0:
            ctfill.fill(ns, need + 8, start=index)
            index += need + 8


def _new_connection_get(ns: Netns, host: str, port: int, timeout: float = 2.0) -> int:
    """Status of GET /metrics over a brand-new TCP connection made from namespace `ns`."""

    def go() -> int:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            conn.request("GET", "/metrics")
            r = conn.getresponse()
            r.read()
            return r.status
        finally:
            conn.close()

    return int(in_netns(ns.name, go))


@pytest.fixture(scope="module")
def fulltable() -> Iterator[dict[str, Any]]:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    if shutil.which("prometheus") is None:
        pytest.skip("needs the Debian `prometheus` binary (scripts/bootstrap.sh installs it)")
    if shutil.which("nft") is None:
        pytest.skip("needs nftables (`nft`) for --web.notrack")
    node, mon = Netns(), Netns()
    tmpdir = tempfile.TemporaryDirectory(prefix="web-fulltable-")
    tmp = Path(tmpdir.name)
    exporters: list[Exporter] = []
    prom: Prometheus | None = None
    stop_topup = threading.Event()
    try:
        node.exec(["ip", "link", "add", "n0", "type", "veth", "peer", "name", "m0", "netns", mon.name])
        node.exec(["ip", "addr", "add", f"{NODE_IP}/24", "dev", "n0"])
        node.exec(["ip", "link", "set", "n0", "up"])
        mon.exec(["ip", "addr", "add", f"{MON_IP}/24", "dev", "m0"])
        mon.exec(["ip", "link", "set", "m0", "up"])
        # A node's firewall (kube-proxy, kubelet) uses conntrack; without any rule that does, the kernel
        # does not track a namespace's traffic at all and a full table would not matter.
        node.exec(["nft", "add table inet node_fw; "
                   "add chain inet node_fw input { type filter hook input priority 0; }; "
                   "add rule inet node_fw input ct state established,related accept"])
        for port, extra in ((KEEPALIVE, []), (NO_KEEPALIVE, ["--no-web.keepalive"]), (NOTRACK, ["--web.notrack"])):
            exporters.append(Exporter([f"--web.listen-address=:{port}", *extra], netns=node, port=port))
        for e in exporters:
            e.wait_ready()
        rules = _shortened_rules(tmp)
        prom = Prometheus(mon, tmp, [f"{NODE_IP}:{KEEPALIVE}", f"{NODE_IP}:{NO_KEEPALIVE}"], rules)
        a, b = f"{NODE_IP}:{KEEPALIVE}", f"{NODE_IP}:{NO_KEEPALIVE}"
        got = prom.wait("up", {a: 1.0, b: 1.0}, timeout=20)
        assert got.get(a) == 1.0 and got.get(b) == 1.0, f"targets never came up before the fill: {got}"
        # Sanity: before the fill, a new connection to the tracked port works (the "without" case below
        # must fail because of the full table, not because of the topology).
        assert _new_connection_get(mon, NODE_IP, KEEPALIVE) == 200

        t0 = time.monotonic()
        have = ctfill.fill_to(node.name, _limit())
        fill_seconds = time.monotonic() - t0
        assert have >= _limit(), f"could not fill the table: {have}/{_limit()}"
        topup = threading.Thread(target=_keep_full, args=(node.name, stop_topup), daemon=True)
        topup.start()
        # Traffic that needs new entries now: each datagram is dropped by conntrack (drop counter).
        udp = node.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for _ in range(20):
            with contextlib.suppress(PermissionError):  # EPERM: conntrack dropped it on output, as intended
                udp.sendto(b"x", (MON_IP, 53))
        udp.close()
        fill_end = time.time()
        yield {"node": node, "mon": mon, "prom": prom, "exporters": exporters, "rules": rules,
               "fill_end": fill_end, "fill_seconds": fill_seconds, "a": a, "b": b}
    finally:
        stop_topup.set()
        if prom is not None:
            prom.stop()
        for e in exporters:
            e.stop()
        node.delete()
        mon.delete()
        tmpdir.cleanup()


def test_keepalive_scrapes_keep_succeeding_at_full_table(fulltable: dict[str, Any]) -> None:
    prom: Prometheus = fulltable["prom"]
    a, b = fulltable["a"], fulltable["b"]
    # Wait until at least 3 scrapes of each target happened after the fill, then look at all of them.
    time.sleep(max(0.0, fulltable["fill_end"] + 9.0 - time.time()))
    window = f"{int(time.time() - fulltable['fill_end'])}s"
    ok = prom.query(f"min_over_time(up[{window}])")
    control = prom.query(f"avg_over_time(up[{window}])")
    samples = prom.query(f"count_over_time(up[{window}])")
    assert samples.get(a, 0) >= 3 and samples.get(b, 0) >= 3, samples
    assert ok.get(a) == 1.0, f"keep-alive target missed a scrape with the table full: {ok}"
    # The control needs a new connection per scrape. The kernel may evict one of its own old TIME_WAIT
    # entries (early drop) and let a rare SYN through, so "fails" means: most scrapes fail.
    assert control.get(b, 1.0) <= 0.34, (
        f"the keep-alive-off control mostly scraped fine at 100% (up avg {control.get(b)}): this test proves nothing")
    # What Prometheus scraped says "table full", not "exporter down".
    full = prom.query("conntrack_entries - conntrack_entries_limit")
    assert full.get(a) == 0.0, f"scraped conntrack_entries != conntrack_entries_limit: {full}"


def test_alerts_fire_at_full_table(fulltable: dict[str, Any]) -> None:
    assert fulltable["rules"] is not None, f"{RULES} is missing: the shipped alert rules are part of the project"
    prom: Prometheus = fulltable["prom"]
    deadline = time.monotonic() + 20
    firing: set[str] = set()
    want = {"ConntrackTableNearFull", "ConntrackTableFull"}
    while time.monotonic() < deadline and not want <= firing:
        alerts = prom.api("alerts")["data"]["alerts"]
        firing = {al["labels"]["alertname"] for al in alerts
                  if al["state"] == "firing" and al["labels"].get("instance") == fulltable["a"]}
        time.sleep(0.5)
    assert want <= firing, f"firing for {fulltable['a']}: {sorted(firing)}"


def test_notrack_new_connections_work_at_full_table(fulltable: dict[str, Any]) -> None:
    mon: Netns = fulltable["mon"]
    assert ctfill.count(fulltable["node"].name) >= _limit()
    assert _new_connection_get(mon, NODE_IP, NOTRACK) == 200
    samples = parse(_metrics_via_new_connection(mon, NOTRACK))
    assert value(samples, "conntrack_dns_exporter_web_notrack_rule_present") == 1.0
    assert value(samples, "conntrack_entries") == value(samples, "conntrack_entries_limit")
    with pytest.raises(OSError):  # the same request to a tracked port: the SYN is dropped
        _new_connection_get(mon, NODE_IP, KEEPALIVE, timeout=2.0)


def _metrics_via_new_connection(ns: Netns, port: int) -> str:
    def go() -> str:
        conn = http.client.HTTPConnection(NODE_IP, port, timeout=3)
        try:
            conn.request("GET", "/metrics")
            return conn.getresponse().read().decode()
        finally:
            conn.close()

    return str(in_netns(ns.name, go))

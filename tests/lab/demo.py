"""`make demo`: the exporter watching a live lab, scraped by real Prometheus with real Alertmanager behind it,
and a one-screen summary every few seconds. With a scenario it walks through one incident:
healthy -> fault injected -> the cause alert pending, firing, at Alertmanager (its symptoms held back by the
shipped inhibit_rules) -> healed -> the cause alert resolved. Without `--seconds` a scenario heals once the
cause reached Alertmanager and ends once it resolved.

The exporter discovers the DNS Service and its two endpoints (with their pods) from the project's Kubernetes
API stand-in (tests/support/fakeapi.py), as the DaemonSet does from the API server, so causes on the
Service-IP path and on one CoreDNS pod can be told apart.

Prometheus and Alertmanager run in the root namespace on 127.0.0.1 and scrape the exporter across the
lab's root<->node veth, so every scrape crosses the node's conntrack table as a real scrape does.
Everything lives in the lab's run dir and goes away with the lab, also on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from collections import deque
from pathlib import Path
from typing import Any

import yaml

from tests.lab import faults
from tests.lab.dnsq import query
from tests.lab.topology import REPO, Lab
from tests.support import fakeapi
from tests.support.exporter_proc import free_port

EXPORTER_PORT = 19153
SCRAPE_INTERVAL = "5s"
NODE = "lab-node"
INHIBIT_RULES = REPO / "alerts" / "alertmanager" / "inhibit-rules.yaml"
# The cause alert each scenario should name (docs/alerts.md); the race names whichever this kernel shows.
CAUSES: dict[str, tuple[str, ...]] = {
    "table-full": ("ConntrackTableFull",), "race": ("ConntrackClashResolving", "ConntrackInsertFailed"),
    "backend-down": ("CoreDNSPodNotAnswering",), "stale-endpoint": ("DNSServiceIPPathBroken",),
    "loss": ("DNSNodePacketLoss",), "upstream-down": ("DNSUpstreamFailing",), "slow-backend": ("CoreDNSPodSlow",),
    "nodelocal-down": ("NodeLocalDNSCacheDown",),
}
HEAL_AT_THE_LATEST = 240.0  # s after the fault, if the cause never reached Alertmanager
END_AT_THE_LATEST = 300.0  # s after the heal, if it never resolved


class Stop(Exception):
    """SIGTERM: leave the main loop and clean up, like Ctrl-C."""


def _http_json(port: int, path: str, timeout: float = 3.0) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        body = r.read()
        if r.status != 200:
            return None
        return json.loads(body) if body.strip().startswith((b"{", b"[")) else body.decode()
    except (OSError, ValueError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def _exporter_flags(kubeconfig: str | None = None) -> list[str]:
    """Probe flags for the lab's targets, each only if this exporter has it (`--help` lists it). With a
    kubeconfig the DNS Service and its endpoints come from Kubernetes discovery, else the Service IP is a
    static target."""
    helptext = subprocess.run([sys.executable, "-m", "exporter", "--help"], cwd=REPO, capture_output=True,
                              text=True, timeout=30).stdout
    wanted = [
        ("--collector.dns", "--collector.dns"),
        *([("--kubernetes.kubeconfig", "--kubernetes.enabled=true"),
           ("--kubernetes.kubeconfig", f"--kubernetes.kubeconfig={kubeconfig}"),
           ("--kubernetes.node-name", f"--kubernetes.node-name={NODE}")] if kubeconfig
          else [("--probe.server", f"--probe.server={Lab.service_ip}")]),
        ("--probe.nodelocal", f"--probe.nodelocal={Lab.nodelocal_ip}"),
        ("--probe.name", f"--probe.name={Lab.cluster_name}"),
        ("--probe.name", f"--probe.name={Lab.external_name}"),
        ("--probe.modes", "--probe.modes=parallel,tcp"),
        ("--probe.interval", "--probe.interval=2s"),
        ("--probe.timeout", "--probe.timeout=1s"),
        ("--probe.attempts", "--probe.attempts=1"),
        # as in the DaemonSet: scrapes are exempt from conntrack, so even Prometheus's first connection
        # gets through when the node's table is full
        ("--web.notrack", "--web.notrack"),
    ]
    return [flag for name, flag in wanted if name + " " in helptext or name + "," in helptext
            or name + "\n" in helptext]


def _rule_files(run_dir: Path) -> tuple[list[str], list[str]]:
    """alerts/*.yaml that promtool accepts (others are skipped with a note)."""
    good, notes = [], []
    promtool = shutil.which("promtool")
    for f in sorted([*(REPO / "alerts").glob("*.yaml"), *(REPO / "alerts").glob("*.yml")]):
        if promtool is None:
            notes.append("promtool missing: no alert rules loaded")
            break
        r = subprocess.run([promtool, "check", "rules", str(f)], capture_output=True, text=True, timeout=30)
        if r.returncode == 0:
            good.append(str(f))
        else:
            notes.append(f"skipped {f.name}: promtool check rules failed")
    if not good and not notes:
        notes.append("no alerts/*.yaml yet: no alert rules loaded")
    return good, notes


class PodClient:
    """What a pod sees: a lookup of the cluster name through the Service IP every 0.25 s."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.window: deque[tuple[float, str, float]] = deque(maxlen=400)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._t = threading.Thread(target=self._run, daemon=True, name="pod-client")

    def start(self) -> None:
        self._t.start()

    def stop(self) -> None:
        self._stop.set()
        self._t.join(3)

    def _run(self) -> None:
        names = [self.lab.cluster_name, self.lab.external_name]
        i = 0
        while not self._stop.is_set():
            a = query(self.lab.pod.name, self.lab.service_ip, names[i % 2], timeout=1.0)
            with self._lock:
                self.window.append((time.monotonic(), a.outcome, a.seconds))
            i += 1
            self._stop.wait(0.25)

    def summary(self, seconds: float) -> str:
        cutoff = time.monotonic() - seconds
        with self._lock:
            recent = [(o, s) for t, o, s in self.window if t >= cutoff]
        if not recent:
            return "no lookups yet"
        ok = sorted(s for o, s in recent if o == "NOERROR")
        bad: dict[str, int] = {}
        for o, _ in recent:
            if o != "NOERROR":
                bad[o] = bad.get(o, 0) + 1
        p50 = f"{ok[len(ok) // 2] * 1000:.1f} ms" if ok else "-"
        mx = f"{ok[-1] * 1000:.1f} ms" if ok else "-"
        fails = ", ".join(f"{k} {v}" for k, v in sorted(bad.items())) or "none"
        return f"{len(ok)}/{len(recent)} ok, p50 {p50}, max {mx}; failures: {fails}"


class Prom:
    def __init__(self, port: int) -> None:
        self.port = port

    def query(self, promql: str) -> list[dict[str, Any]]:
        data = _http_json(self.port, "/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        if not isinstance(data, dict) or data.get("status") != "success":
            return []
        return list(data["data"]["result"])

    def scalar(self, promql: str) -> float | None:
        res = self.query(promql)
        if not res:
            return None
        v = float(res[0]["value"][1])
        return None if math.isnan(v) else v


class Timeline:
    """When each alert was first pending and firing in Prometheus, reached Alertmanager (active, or held back
    by inhibition) and resolved, in seconds since the demo started."""

    def __init__(self, prom_port: int, am_port: int, start: float) -> None:
        self.prom_port, self.am_port, self.start = prom_port, am_port, start
        self.events: dict[str, dict[str, float]] = {}  # alertname -> event -> t
        self.role: dict[str, str] = {}
        self.suppressed: set[str] = set()
        self._at_am: set[str] = set()

    def _mark(self, name: str, event: str, t: float) -> None:
        self.events.setdefault(name, {}).setdefault(event, t)

    def poll(self) -> None:
        t = time.monotonic() - self.start
        prom = _http_json(self.prom_port, "/api/v1/alerts")
        if isinstance(prom, dict):
            for a in prom.get("data", {}).get("alerts", []):
                name = a["labels"].get("alertname", "?")
                self.role[name] = a["labels"].get("role", "")
                self._mark(name, a.get("state", "?"), t)
        am = _http_json(self.am_port, "/api/v2/alerts")
        if isinstance(am, list):
            now_active, now_suppressed = set(), set()
            for a in am:
                name = a["labels"].get("alertname", "?")
                if a.get("status", {}).get("state") == "suppressed":
                    now_suppressed.add(name)
                else:
                    now_active.add(name)
                    self._mark(name, "alertmanager", t)
            for name in self._at_am - now_active:
                self.events[name]["resolved"] = t
            for name in now_active - self._at_am:
                if "resolved" in self.events.get(name, {}):
                    self.events[name].pop("resolved")
            self._at_am = now_active
            self.suppressed |= now_suppressed

    def line(self, name: str) -> str:
        ev = self.events.get(name, {})
        parts = [f"{e} t={ev[e]:.0f}s" for e in ("pending", "firing", "alertmanager", "resolved") if e in ev]
        return f"{name}: " + (", ".join(parts) if parts else "not seen")

    def lines(self) -> list[str]:
        causes = sorted(n for n, r in self.role.items() if r == "cause")
        out = [f"  cause {self.line(n)}" for n in causes]
        held = sorted(self.suppressed)
        if held:
            out.append(f"  held back at Alertmanager by inhibition (symptoms of a cause): {', '.join(held)}")
        return out


def _timeline(seconds: float | None) -> tuple[float, float]:
    """When the fault goes in and when it is healed (seconds from start)."""
    if seconds is None:
        return 30.0, 150.0
    return max(5.0, seconds * 0.2), max(10.0, seconds * 0.7)


def _fmt(v: float | None, unit: str = "") -> str:
    if v is None:
        return "-"
    return f"{v:.0f}{unit}" if abs(v) >= 10 or v == int(v) else f"{v:.2f}{unit}"


def summary(lab: Lab, prom: Prom, am_port: int, client: PodClient, prev: dict[str, float], elapsed: float,
            phase: str, urls: str, notes: list[str], interval: float, timeline: Timeline | None = None) -> str:
    lines = [f"== conntrack-dns-exporter demo | lab {lab.prefix} | t={elapsed:.0f}s | {phase}", urls]
    lines += [f"   note: {n}" for n in notes]
    entries = prom.scalar("sum(conntrack_entries)")
    limit = prom.scalar("max(conntrack_entries_limit)")
    up = prom.scalar(f'up{{instance="{lab.host_node_ip}:{EXPORTER_PORT}"}}')
    usage = f"{100 * entries / limit:.1f}%" if entries is not None and limit else "-"
    lines.append(f"exporter (scraped by Prometheus, up={_fmt(up)}): table {_fmt(entries)} / {_fmt(limit)} = {usage}")
    stats = {r["metric"]["__name__"]: float(r["value"][1])
             for r in prom.query('sum by (__name__) ({__name__=~"conntrack_stat_.+_total"})')}
    deltas = []
    for name in ("drop", "early_drop", "insert_failed", "clash_resolve", "invalid", "found", "search_restart"):
        key = f"conntrack_stat_{name}_total"
        if key in stats:
            d = stats[key] - prev[key] if key in prev else None
            deltas.append(f"{name} {'+' + _fmt(d) if d is not None else _fmt(stats[key])}")
            prev[key] = stats[key]
    lines.append("  conntrack stats (since last screen): " + (", ".join(deltas) if deltas else "not scraped yet"))
    lines.append(f"pod {lab.pod_ip} -> {lab.service_ip} (last {interval:.0f}s): {client.summary(interval)}")
    lat = prom.query("histogram_quantile(0.9, sum by (server, kind, mode, le) "
                     "(rate(dns_probe_duration_seconds_bucket[30s])))")
    fails = prom.query("sum by (server, kind, mode, reason) (increase(dns_probe_failures_total[30s]))")
    # sampled CoreDNS endpoints carry results only (no histogram): show them by result
    eps = prom.query("sum by (server, kind, result) (increase(dns_probe_endpoint_queries_total[30s]))")
    if lat or fails or eps:
        lines.append("probes (last 30s): server kind mode: p90 latency / failures by reason")
        rows: dict[tuple[str, str, str], list[str]] = {}
        for r in lat:
            m = r["metric"]
            v = float(r["value"][1])
            rows.setdefault((m.get("server", "?"), m.get("kind", "?"), m.get("mode", "?")), []).insert(
                0, "p90 -" if math.isnan(v) else f"p90 {v * 1000:.0f} ms")
        for r in fails:
            m = r["metric"]
            v = float(r["value"][1])
            if v >= 0.5:
                rows.setdefault((m.get("server", "?"), m.get("kind", "?"), m.get("mode", "?")), []).append(
                    f"{m.get('reason', '?')} {v:.0f}")
        for r in eps:
            m = r["metric"]
            v = float(r["value"][1])
            if v >= 0.5:
                rows.setdefault((m.get("server", "?"), m.get("kind", "endpoint"), "sampled"), []).append(
                    f"{m.get('result', '?')} {v:.0f}")
        for (server, kind, mode), vals in sorted(rows.items())[:12]:
            lines.append(f"  {server:<20} {kind:<10} {mode:<10} {', '.join(vals)}")
    alerts = _http_json(prom.port, "/api/v1/alerts")
    if isinstance(alerts, dict):
        items = alerts.get("data", {}).get("alerts", [])
        firing = sorted({a["labels"].get("alertname", "?") for a in items if a.get("state") == "firing"})
        pending = sorted({a["labels"].get("alertname", "?") for a in items if a.get("state") == "pending"})
        lines.append(f"alerts: firing {', '.join(firing) or 'none'}; pending {', '.join(pending) or 'none'}")
    am = _http_json(am_port, "/api/v2/alerts")
    if isinstance(am, list):
        active = sorted({a["labels"].get("alertname", "?") for a in am
                         if a.get("status", {}).get("state") != "suppressed"})
        held = sorted({a["labels"].get("alertname", "?") for a in am
                       if a.get("status", {}).get("state") == "suppressed"})
        lines.append(f"alertmanager: notifying {', '.join(active) or 'nothing'}"
                     + (f"; held back by inhibition: {', '.join(held)}" if held else ""))
    if timeline is not None and timeline.role:
        lines.append("alert timeline (t = seconds since start):")
        lines += timeline.lines()
    return "\n".join(lines)


def _wait_http(port: int, path: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _http_json(port, path, timeout=1.0) is not None:
            return True
        time.sleep(0.3)
    return False


def run_demo(scenario: str | None = None, seconds: float | None = None, interval: float = 5.0) -> int:
    if scenario is not None and scenario not in faults.SCENARIOS:
        print(f"lab: unknown scenario {scenario!r}; known: {', '.join(faults.SCENARIOS)}", file=sys.stderr)
        return 2
    if seconds is not None and seconds <= 0:
        print("lab: --seconds must be positive", file=sys.stderr)
        return 2
    for binary in ("prometheus", "prometheus-alertmanager"):
        if shutil.which(binary) is None:
            print(f"lab: {binary} is not installed (make deps installs it)", file=sys.stderr)
            return 2

    def on_term(*_: object) -> None:
        raise Stop()

    old_term = signal.signal(signal.SIGTERM, on_term)
    lab: Lab | None = None
    client: PodClient | None = None
    api: fakeapi.FakeAPI | None = None
    tty = sys.stdout.isatty()
    try:
        lab = Lab.up(prefix=f"cdlabdemo{os.getpid()}")
        print(f"lab {lab.prefix} up: pod {lab.pod_ip}, service {lab.service_ip}, "
              f"backends {', '.join(b.ip for b in lab.backends)}, nodelocal {lab.nodelocal_ip}", flush=True)
        api = fakeapi.FakeAPI(host=lab.host_root_ip).start()
        api.put(fakeapi.service("kube-system", "kube-dns", lab.service_ip))
        api.put(fakeapi.endpoint_slice("kube-system", "kube-dns", "kube-dns-lab", [
            fakeapi.Endpoint(b.ip, f"coredns-lab-{b.index}", node=NODE) for b in lab.backends]))
        flags = _exporter_flags(api.write_kubeconfig(str(lab.run_dir / "kubeconfig")))
        lab.start_exporter(*flags, port=EXPORTER_PORT)
        prom_port, am_port = free_port(), free_port()
        rules, notes = _rule_files(lab.run_dir)
        pdir, adir = lab.run_dir / "prometheus", lab.run_dir / "alertmanager"
        pdir.mkdir()
        adir.mkdir()
        am_config: dict[str, Any] = {
            "route": {"receiver": "lab", "group_by": ["alertname", "node"], "group_wait": "5s",
                      "group_interval": "10s", "repeat_interval": "1h"},
            "receivers": [{"name": "lab"}]}
        if INHIBIT_RULES.exists():
            am_config["inhibit_rules"] = yaml.safe_load(INHIBIT_RULES.read_text())["inhibit_rules"]
        (adir / "alertmanager.yml").write_text(yaml.safe_dump(am_config))
        rule_yaml = "".join(f"  - {json.dumps(r)}\n" for r in rules) or "  []\n"
        (pdir / "prometheus.yml").write_text(
            f"global:\n  scrape_interval: {SCRAPE_INTERVAL}\n  evaluation_interval: {SCRAPE_INTERVAL}\n"
            f"rule_files:\n{rule_yaml}"
            f"alerting:\n  alertmanagers:\n    - static_configs:\n        - targets: ['127.0.0.1:{am_port}']\n"
            f"scrape_configs:\n  - job_name: conntrack-dns-exporter\n    static_configs:\n"
            f"      - targets: ['{lab.host_node_ip}:{EXPORTER_PORT}']\n        labels: {{node: {NODE}}}\n")
        lab.spawn("alertmanager", None, [
            "prometheus-alertmanager", f"--config.file={adir / 'alertmanager.yml'}", f"--storage.path={adir}",
            f"--web.listen-address=127.0.0.1:{am_port}", "--cluster.listen-address=", "--log.level=warn"])
        lab.spawn("prometheus", None, [
            "prometheus", f"--config.file={pdir / 'prometheus.yml'}", f"--storage.tsdb.path={pdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn",
            f"--web.console.templates={pdir}", f"--web.console.libraries={pdir}"])
        for port, what in ((prom_port, "Prometheus"), (am_port, "Alertmanager")):
            if not _wait_http(port, "/-/ready", 30):
                raise RuntimeError(f"{what} did not become ready; see {lab.run_dir}")
        urls = (f"Prometheus http://127.0.0.1:{prom_port}  Alertmanager http://127.0.0.1:{am_port}  "
                f"exporter http://{lab.host_node_ip}:{EXPORTER_PORT}/metrics")
        print(urls, flush=True)
        if len(flags) == 0 or "--collector.dns" not in flags:
            notes.append("this exporter has no DNS probes yet: probe rows stay empty")
        client = PodClient(lab)
        client.start()
        fault_at, heal_at = _timeline(seconds)
        args = faults.SCENARIOS.get(scenario or "", [])
        phase = "healthy" + (f" (fault {scenario} at t={fault_at:.0f}s)" if scenario else "")
        state = "healthy"
        prom = Prom(prom_port)
        prev: dict[str, float] = {}
        start = time.monotonic()
        timeline = Timeline(prom_port, am_port, start)
        causes = CAUSES.get(scenario or "", ())
        auto = scenario is not None and seconds is None  # heal once the cause is at Alertmanager, end once resolved
        fault_t = healed_t = earliest_heal = 0.0
        next_screen = start + min(interval, 3.0)
        next_poll = start
        while True:
            now = time.monotonic()
            elapsed = now - start
            if seconds is not None and elapsed >= seconds:
                break
            if now >= next_poll:
                timeline.poll()
                next_poll = now + 1.0
            named = [c for c in causes if c in timeline.events]
            if auto and state == "fault" and (
                    (any("alertmanager" in timeline.events[c] for c in named) and elapsed >= earliest_heal)
                    or elapsed >= fault_t + HEAL_AT_THE_LATEST):
                heal_at = elapsed
            if auto and state == "healed" and (
                    (any(timeline.events[c].get("resolved", -1) >= healed_t for c in named)
                     and elapsed >= healed_t + 10) or elapsed >= healed_t + END_AT_THE_LATEST):
                break
            # The healthy phase ends once Prometheus has scraped the exporter (so there is a "before" to
            # compare with), or 10 s after the planned time at the latest.
            if scenario and state == "healthy" and elapsed >= fault_at and (
                    elapsed >= fault_at + 10 or prom.scalar('up{job="conntrack-dns-exporter"}') == 1):
                print(f"--- t={elapsed:.0f}s injecting fault: {scenario} {' '.join(args)}", flush=True)
                lab.fault(scenario, *args)
                state = "fault"
                fault_t = elapsed
                # Injecting can take a while (filling the table); leave two scrapes after it before healing,
                # so Prometheus and the summary show the fault, but heal before the end.
                done = time.monotonic() - start
                limit = seconds - 7 if seconds is not None else float("inf")
                heal_at = max(heal_at, min(done + 2 * 5 + 1, limit))
                if auto:
                    heal_at = float("inf")  # once the cause alert reached Alertmanager (15 s at the earliest)
                    earliest_heal = done + 15
                    phase = (f"FAULT {scenario} {' '.join(args)} (healed once {' or '.join(causes)} reaches "
                             "Alertmanager)")
                else:
                    phase = f"FAULT {scenario} {' '.join(args)} (heal at t={heal_at:.0f}s)"
            elif state == "fault" and elapsed >= heal_at:
                print(f"--- t={elapsed:.0f}s healing: {scenario}", flush=True)
                lab.heal_all()
                state = "healed"
                healed_t = time.monotonic() - start
                phase = f"healed {scenario}" + (" (ends once the cause alert resolved)" if auto else "")
            if now >= next_screen:
                text = summary(lab, prom, am_port, client, prev, elapsed, phase, urls, notes, interval, timeline)
                print(("\033[H\033[2J" if tty else "\n") + text, flush=True)
                next_screen = now + interval
            time.sleep(0.2)
        if scenario:
            for c in causes or ():
                if c in timeline.events:
                    ev = timeline.events[c]
                    after = (f", {ev['resolved'] - healed_t:.0f}s after the heal"
                             if "resolved" in ev and state == "healed" else "")
                    print(f"cause alert {timeline.line(c)} (fault at t={fault_t:.0f}s, healed at "
                          f"t={healed_t:.0f}s{after})", flush=True)
            if not any(c in timeline.events for c in causes):
                print(f"cause alert {' or '.join(causes)}: not seen in this run", flush=True)
        print(f"demo finished after {time.monotonic() - start:.0f}s", flush=True)
    except (KeyboardInterrupt, Stop):
        print("\ndemo interrupted", flush=True)
    except (RuntimeError, ValueError, OSError) as e:
        print(f"lab: demo failed: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            if client is not None:
                client.stop()
            if api is not None:
                api.stop()
            if lab is not None:
                with contextlib.suppress(Exception):
                    lab.heal_all()
                lab.down()
                print(f"lab {lab.prefix} removed", flush=True)
        finally:
            signal.signal(signal.SIGTERM, old_term)
            signal.signal(signal.SIGINT, signal.default_int_handler)
    return 0

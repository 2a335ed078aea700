"""Real Prometheus and Alertmanager (Debian packages) around an exporter, plus a webhook receiver, for the
end-to-end tests. Both servers run in the test's (root) namespace on 127.0.0.1; Prometheus scrapes the
exporter in the lab's node namespace over the lab's own link-local veth, so nothing leaves the machine.

Prometheus loads the shipped rule file unchanged (with their real windows and `for`), optionally next to an
accelerated copy of the same rules (scripts/gen_alerts.py `time_scale=1/60`, labelled `ruleset="accelerated"`).
Alertmanager carries the shipped `inhibit_rules` (alerts/alertmanager/inhibit-rules.yaml), so a cause alert
holds back its symptoms as in production, and routes everything to `Webhook`, a small HTTP server in the test
that records each notification.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from tests.support.exporter_proc import free_port
from tests.support.wait import wait_until as _wait_until

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_RULES = ROOT / "alerts" / "conntrack-dns-exporter.rules.yaml"
SHIPPED_INHIBIT = ROOT / "alerts" / "alertmanager" / "inhibit-rules.yaml"
JOB = "conntrack-dns-exporter"
ACCELERATED = {"ruleset": "accelerated"}
SCRAPE_INTERVAL = "1s"

Alert = dict[str, Any]


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_alerts_e2e", ROOT / "scripts" / "gen_alerts.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def missing_binaries() -> list[str]:
    return [b for b in ("prometheus", "prometheus-alertmanager") if shutil.which(b) is None]


def wait_until(what: str, fn: Callable[[], Any], timeout: float, interval: float = 0.5) -> Any:
    return _wait_until(what, fn, timeout, interval)


class Webhook:
    """Alertmanager's webhook receiver: records every notification's alerts with their status."""

    def __init__(self) -> None:
        self.alerts: list[Alert] = []
        self._lock = threading.Lock()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                payload = json.loads(body)
                with hook._lock:
                    for a in payload.get("alerts", []):
                        hook.alerts.append({**a, "receiver": payload.get("receiver"),
                                            "received": time.monotonic()})
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()

    def matching(self, status: str, **labels: str) -> list[Alert]:
        with self._lock:
            return [a for a in self.alerts
                    if a["status"] == status and all(a["labels"].get(k) == v for k, v in labels.items())]

    def wait(self, status: str, timeout: float = 60.0, after: float = 0.0, **labels: str) -> Alert:
        def found() -> Alert | None:
            hits = [a for a in self.matching(status, **labels) if a["received"] >= after]
            return hits[-1] if hits else None

        return wait_until(f"webhook {status} {labels}", found, timeout)  # type: ignore[no-any-return]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class Stack:
    """Alertmanager -> webhook, Prometheus scraping `target` (labelled node=`node`) plus a file_sd file for
    extra exporters added while running."""

    def __init__(self, workdir: Path, target: str, node: str, accelerated: bool = True,
                 interval: str = SCRAPE_INTERVAL) -> None:
        self.dir = workdir
        self.webhook = Webhook()
        self.prom_port, self.am_port = free_port(), free_port()
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        gen = generator()
        accelerated_rules = gen.render_groups(time_scale=1 / 60, extra_labels=ACCELERATED,
                                              group_prefix="accelerated.")
        (workdir / "accelerated.rules.yaml").write_text(gen.rule_file_text(accelerated_rules))
        (workdir / "extra-targets.json").write_text("[]")
        (workdir / "alertmanager.yml").write_text(yaml.safe_dump({
            "route": {"receiver": "webhook", "group_by": ["alertname", "node", "ruleset"], "group_wait": "1s",
                      "group_interval": "1s", "repeat_interval": "1h"},
            "receivers": [{"name": "webhook", "webhook_configs": [
                {"url": f"http://127.0.0.1:{self.webhook.port}/", "send_resolved": True}]}],
            "inhibit_rules": yaml.safe_load(SHIPPED_INHIBIT.read_text())["inhibit_rules"],
        }))
        rule_files = [str(SHIPPED_RULES)] + ([str(workdir / "accelerated.rules.yaml")] if accelerated else [])
        timeout = "10s" if interval.endswith("s") and int(interval[:-1]) > 10 else interval
        (workdir / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": interval, "scrape_timeout": timeout, "evaluation_interval": interval},
            "rule_files": rule_files,
            "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{self.am_port}"]}]}]},
            "scrape_configs": [{
                "job_name": JOB,
                "static_configs": [{"targets": [target], "labels": {"node": node}}],
                "file_sd_configs": [{"files": [str(workdir / "extra-targets.json")], "refresh_interval": "1s"}],
            }],
        }))

    def start(self) -> Stack:
        self._spawn("alertmanager", [
            "prometheus-alertmanager", f"--config.file={self.dir / 'alertmanager.yml'}",
            f"--storage.path={self.dir / 'am-data'}", f"--web.listen-address=127.0.0.1:{self.am_port}",
            "--cluster.listen-address=", "--log.level=warn"])
        self._spawn("prometheus", [
            "prometheus", f"--config.file={self.dir / 'prometheus.yml'}",
            f"--storage.tsdb.path={self.dir / 'prom-data'}", f"--web.listen-address=127.0.0.1:{self.prom_port}",
            "--rules.alert.resend-delay=1s", "--log.level=warn"])
        for port, name in ((self.am_port, "alertmanager"), (self.prom_port, "prometheus")):
            wait_until(f"{name} ready", lambda p=port, n=name: self._ready(p, n), 60)
        return self

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = (self.dir / f"{name}.log").open("wb")
        self._procs[name] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                             cwd=self.dir)
        log.close()

    def _ready(self, port: int, name: str) -> bool:
        if self._procs[name].poll() is not None:
            raise AssertionError(f"{name} exited: {(self.dir / f'{name}.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        for p in self._procs.values():
            p.terminate()
        for p in self._procs.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.webhook.close()

    # -- Prometheus API --
    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.prom_port}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("/api/v1/query", query=expr)
        return list(data["result"])

    def active(self) -> list[Alert]:
        """Every alert Prometheus holds now (pending or firing)."""
        return list(self.api("/api/v1/alerts")["alerts"])

    def alerts(self, name: str, state: str, accelerated: bool, **labels: str) -> list[Alert]:
        """Alerts Prometheus itself holds (pending included), from the shipped or the accelerated rules."""
        out = []
        for a in self.api("/api/v1/alerts")["alerts"]:
            lab = a["labels"]
            if (lab.get("alertname") == name and a["state"] == state
                    and (lab.get("ruleset") == "accelerated") == accelerated
                    and all(lab.get(k) == v for k, v in labels.items())):
                out.append(a)
        return out

    def add_target(self, target: str, **labels: str) -> None:
        f = self.dir / "extra-targets.json"
        current = json.loads(f.read_text())
        current.append({"targets": [target], "labels": labels})
        tmp = f.with_suffix(".tmp")
        tmp.write_text(json.dumps(current))
        tmp.replace(f)

    def target_health(self, instance: str) -> str | None:
        for t in self.api("/api/v1/targets")["activeTargets"]:
            if t["labels"].get("instance") == instance:
                return str(t["health"])
        return None

    def logs(self) -> str:
        out = []
        for name in self._procs:
            with contextlib.suppress(OSError):
                out.append(f"--- {name}\n" + (self.dir / f"{name}.log").read_text()[-3000:])
        return "\n".join(out)

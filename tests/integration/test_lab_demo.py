"""`make demo`: the exporter in a live lab, scraped by real Prometheus with Alertmanager, walking through an
incident, then exiting 0 with nothing left behind (also when stopped with SIGTERM)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.test_lab import _leftovers
from tests.lab import missing_binaries
from tests.support.netns import skip_reason

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.netns, pytest.mark.lab, pytest.mark.e2e]


@pytest.fixture(autouse=True)
def _needs() -> None:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    missing = missing_binaries() + [b for b in ("prometheus", "prometheus-alertmanager", "make")
                                    if shutil.which(b) is None]
    if missing:
        pytest.skip(f"make demo needs {', '.join(missing)} (scripts/bootstrap.sh installs them)")


def _screens(out: str) -> list[str]:
    return [s for s in out.split("\n== ") if s.startswith("conntrack-dns-exporter demo")]


@pytest.mark.slow
def test_make_demo_table_full_walkthrough_exits_clean() -> None:
    env = {**os.environ, "DEMO_INTERVAL": "3"}
    r = subprocess.run(["make", "-s", "demo", "DEMO_SECONDS=30", "SCENARIO=table-full"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=150)
    out = r.stdout
    assert r.returncode == 0, out[-3000:] + r.stderr[-3000:]
    prefix = re.search(r"lab (cdlabdemo\d+) up", out)
    assert prefix, out[-2000:]
    assert re.search(r"Prometheus http://127\.0\.0\.1:\d+ +Alertmanager http://127\.0\.0\.1:\d+", out)
    before, _, rest = out.partition("injecting fault: table-full 100")
    during, _, after = rest.partition("healing: table-full")
    assert during and after, out[-3000:]
    # healthy: the pod's lookups all succeed; during the fault Prometheus still scrapes the exporter
    # (keep-alive) and sees the table at 100% while the pod's lookups time out; healed: lookups succeed again
    assert any("failures: none" in s for s in _screens(before))
    fault_screens = _screens(during)
    assert any("up=1): table 262144 / 262144 = 100.0%" in s for s in fault_screens), during
    assert any(re.search(r"-> 10\.96\.0\.10 .*: 0/\d+ ok.*timeout", s) for s in fault_screens), during
    assert any(re.search(r"-> 10\.96\.0\.10 .*: (\d+)/\1 ok.*failures: none", s) for s in _screens(after)), after
    assert "demo finished after 30s" in out and f"lab {prefix.group(1)} removed" in out
    assert _leftovers(prefix.group(1)) == []


@pytest.mark.slow
def test_make_demo_names_the_cause_and_shows_it_resolve_after_the_heal() -> None:
    """The default walkthrough of backend-down: the exporter discovers the Service and its two endpoints from
    the Kubernetes stand-in, the cause alert (CoreDNSPodNotAnswering, the dead pod named) goes pending, fires,
    reaches Alertmanager; the lab heals and the demo ends once the alert resolved, printing the timeline."""
    env = {**os.environ, "DEMO_INTERVAL": "20"}
    r = subprocess.run(["make", "-s", "demo", "SCENARIO=backend-down"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=720)
    out = r.stdout
    assert r.returncode == 0, out[-3000:] + r.stderr[-3000:]
    assert "endpoint" in out and "service" in out  # both target kinds are probed
    m = re.search(r"cause alert CoreDNSPodNotAnswering: pending t=(\d+)s, firing t=(\d+)s, alertmanager t=(\d+)s, "
                  r"resolved t=(\d+)s \(fault at t=(\d+)s, healed at t=(\d+)s, (\d+)s after the heal\)", out)
    assert m, out[-3000:]
    pending, firing, at_am, resolved, fault, healed, after = map(int, m.groups())
    assert fault <= pending <= firing <= at_am <= healed < resolved
    assert firing - fault <= 180 and after <= 300
    assert "cause DNSServiceIPPathBroken" not in out and "cause DNSNodePacketLoss" not in out
    prefix = re.search(r"lab (cdlabdemo\d+) up", out)
    assert prefix and _leftovers(prefix.group(1)) == []


def test_demo_stops_cleanly_on_sigterm() -> None:
    p = subprocess.Popen([sys.executable, "-m", "tests.lab", "demo", "--interval", "2"], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert p.stdout is not None
    prefix = ""
    lines = []
    deadline = time.monotonic() + 60
    try:
        for line in p.stdout:
            lines.append(line)
            m = re.search(r"lab (cdlabdemo\d+) up", line)
            prefix = m.group(1) if m else prefix
            if line.startswith("== conntrack-dns-exporter demo") or time.monotonic() > deadline:
                break
        assert prefix, "".join(lines)
        assert _leftovers(prefix), "the demo should be running"
        p.send_signal(signal.SIGTERM)
        rest, _ = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, "".join(lines) + rest
    assert f"lab {prefix} removed" in rest
    assert _leftovers(prefix) == []

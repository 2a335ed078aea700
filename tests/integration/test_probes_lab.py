"""The probes on the lab's DNS path (tests/lab): the exporter runs in the node namespace (hostNetwork) and
probes the DNAT'd Service IP, a backend directly, and the NodeLocal cache, all real daemons (dnsmasq,
unbound) behind real nftables DNAT and kernel conntrack, while the lab injects the field's faults.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from tests.lab import Lab
from tests.support.exporter_proc import Samples, parse, value

TIMEOUT = "0.5s"
COMMON = ("--collector.dns", "--no-collector.table", "--web.notrack", f"--probe.timeout={TIMEOUT}",
          "--probe.interval=0.25s")


def svc(lab: Lab) -> str:
    return f"{lab.service_ip}:53"


def start(lab: Lab, *args: str) -> Any:
    return lab.start_exporter(*COMMON, f"--probe.name={lab.cluster_name}", *args)


def total(samples: Samples, metric: str, **labels: str) -> float:
    """Sum of a metric over every series matching the labels given."""
    want = set(labels.items())
    return sum(v for (name, lbls), v in samples.items() if name == metric and want <= set(lbls))


def wait_for(what: str, fn: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.25)


def test_healthy_lab_every_mode_succeeds(healthy_lab: Lab) -> None:
    lab = healthy_lab
    backend = f"{lab.backends[0].ip}:53"
    exp = start(lab, f"--probe.server={lab.service_ip}", f"--probe.server={lab.backends[0].ip}",
                f"--probe.nodelocal={lab.nodelocal_ip}", "--probe.modes=parallel,sequential,tcp")
    try:
        def enough() -> Samples | None:
            s = exp.scrape()
            ok = all(total(s, "dns_probe_requests_total", server=srv, mode=m, qtype="AAAA") >= 4
                     for srv in (svc(lab), backend) for m in ("parallel", "sequential", "tcp"))
            ok = ok and total(s, "dns_probe_requests_total", kind="nodelocal") >= 8
            return s if ok else None

        s = wait_for("4 probes per target and mode", enough)
        assert total(s, "dns_probe_failures_total") == 0, {k: v for k, v in s.items() if "failures" in k[0]}
        assert total(s, "dns_probe_retries_total") == 0
        assert total(s, "dns_probe_partial_pairs_total") == 0
        assert value(s, "dns_probe_nodelocal_present", server=f"{lab.nodelocal_ip}:53") == 1
        # Answers through DNAT on loopback-speed links: well under the first retry plateau.
        for m in ("parallel", "sequential", "tcp"):
            n = value(s, "dns_probe_duration_seconds_count", server=svc(lab), kind="static", mode=m) or 0
            fast = value(s, "dns_probe_duration_seconds_bucket", server=svc(lab), kind="static", mode=m, le="0.1")
            assert n > 0 and fast == n
    finally:
        exp.stop()


class KeepAlive:
    """Scrapes over one HTTP/1.1 connection opened before the table fills (a new one would need an entry)."""

    def __init__(self, exp: Any) -> None:
        self.conn = exp.connect(timeout=5.0)

    def scrape(self) -> Samples:
        self.conn.request("GET", "/metrics")
        r = self.conn.getresponse()
        assert r.status == 200
        return parse(r.read().decode())


def test_full_table_probes_fail_in_every_mode(healthy_lab: Lab) -> None:
    lab = healthy_lab
    exp = start(lab, f"--probe.server={lab.service_ip}", "--probe.modes=parallel,sequential,tcp",
                "--probe.attempts=1")
    try:
        web = KeepAlive(exp)
        wait_for("a first healthy probe", lambda: total(web.scrape(), "dns_probe_requests_total", mode="tcp") >= 2)
        lab.fault("table-full", 100)
        s = wait_for("failures in every mode", lambda: (lambda s: s if all(
            total(s, "dns_probe_failures_total", mode=m, qtype="A") >= 2
            for m in ("parallel", "sequential", "tcp")) else None)(web.scrape()))
        reasons = {(dict(lbls)["mode"], dict(lbls)["reason"]) for (name, lbls), v in s.items()
                   if name == "dns_probe_failures_total" and v}
        # From a pod, the dropped query just times out. From the node's own network namespace (hostNetwork),
        # conntrack drops the packet in the OUTPUT hook and the kernel refuses the UDP send at once (EPERM):
        # reason network. A TCP SYN dropped the same way is retransmitted by the kernel: reason timeout.
        assert reasons == {("parallel", "network"), ("sequential", "network"), ("tcp", "timeout")}, reasons
        assert (value(s, "conntrack_entries") or 0) >= (value(s, "conntrack_entries_limit") or 1) * 0.99
    finally:
        lab.heal("table-full")
        exp.stop()


def test_backend_down_service_ip_needs_retries_direct_backend_does_not(healthy_lab: Lab) -> None:
    lab = healthy_lab
    live = f"{lab.backends[0].ip}:53"
    exp = start(lab, f"--probe.server={lab.service_ip}", f"--probe.server={lab.backends[0].ip}",
                "--probe.modes=parallel", "--probe.attempts=3", "--probe.interval=0.1s")
    try:
        lab.fault("backend-down", 1)
        base = exp.scrape()
        s = wait_for("30 service-IP probes", lambda: (lambda s: s if total(
            s, "dns_probe_requests_total", server=svc(lab), qtype="A")
            - total(base, "dns_probe_requests_total", server=svc(lab), qtype="A") >= 30 else None)(exp.scrape()),
            timeout=40)

        def delta(metric: str, server: str) -> float:
            return total(s, metric, server=server, qtype="A") - total(base, metric, server=server, qtype="A")

        n = delta("dns_probe_requests_total", svc(lab))
        needed_retry = delta("dns_probe_retries_total", svc(lab)) + delta("dns_probe_failures_total", svc(lab))
        # Each new socket is a new conntrack entry, DNAT'd to a random backend: about half hit the dead one.
        assert 0.2 * n <= needed_retry <= 0.8 * n, (needed_retry, n)
        assert delta("dns_probe_retries_total", svc(lab)) > 0
        assert delta("dns_probe_requests_total", live) >= 10
        assert delta("dns_probe_retries_total", live) == 0
        assert delta("dns_probe_failures_total", live) == 0
    finally:
        lab.heal("backend-down")
        exp.stop()


def test_race_is_resolved_by_the_kernel_and_no_probe_loses_an_answer(healthy_lab: Lab) -> None:
    lab = healthy_lab
    exp = start(lab, f"--probe.server={lab.service_ip}", "--probe.modes=parallel", "--probe.interval=0.1s")
    try:
        before = lab.ct_stats()
        base = exp.scrape()
        for _ in range(20):  # the race is probabilistic (tests/lab/racer.c makes clashes within the first
            # second here): bounded rounds, stopping at the first clash
            race = lab.fault("race", "2s")  # long enough for the probes every 0.1 s to run through it
            race.wait(60)
            assert race.error is None, f"the race threads failed: {race.error!r}"
            lab.heal("race")
            after = lab.ct_stats()
            if after["clash_resolve"] > before["clash_resolve"]:
                break
        s = exp.scrape()
        assert after["clash_resolve"] > before["clash_resolve"], f"no clash: {before} -> {after}, {race.result}"
        probes = total(s, "dns_probe_requests_total", qtype="A") - total(base, "dns_probe_requests_total", qtype="A")
        assert probes >= 5
        for metric in ("dns_probe_failures_total", "dns_probe_partial_pairs_total", "dns_probe_retries_total"):
            assert total(s, metric) - total(base, metric) == 0, metric
    finally:
        lab.heal("race")
        exp.stop()


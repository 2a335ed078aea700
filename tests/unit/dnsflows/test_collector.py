"""The dnsflows accounting and collector, fed with conntrack events recorded from the real kernel
(tests/fixtures/dnsflows-events.json) through the real listener loop (a replay socket stands in for the
netlink socket): per-backend counts, unanswered flows, top pods, the exporter's own probes left out,
lost events and the resync, nf_conntrack_events=0."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import time
from collections.abc import Callable

import pytest
from prometheus_client import CollectorRegistry

from exporter.app import build_registry
from exporter.discovery import Discovery, Target
from exporter.dnsflows.collector import DnsFlowsCollector
from exporter.dnsflows.flows import FlowStats
from exporter.dnsflows.listener import FlowListener
from exporter.dnsflows.parse import iter_flows
from tests.unit.dnsflows.test_parse_bpf import events


class Replay:
    """Hands out recorded datagrams (or raises a recorded error) like the event socket, then nothing. Its
    fileno() is a pipe that is always readable, so the listener's wait for events never blocks on it."""

    def __init__(self, items: list[bytes | OSError]) -> None:
        self.items = list(items)
        self._pipe = os.pipe()
        os.write(self._pipe[1], b"x")

    def fileno(self) -> int:
        return self._pipe[0]

    def recv_into(self, buf: bytearray, nbytes: int = 0, flags: int = 0, /) -> int:
        if not self.items:
            time.sleep(0.01)
            raise BlockingIOError(errno.EAGAIN, "no data")
        item = self.items.pop(0)
        if isinstance(item, OSError):
            raise item
        buf[: len(item)] = item
        return len(item)

    def close(self) -> None:
        for fd in self._pipe:
            with contextlib.suppress(OSError):
                os.close(fd)


def discovery() -> Discovery:
    d = Discovery()
    d.targets.set("kubernetes", [Target("10.96.0.10", kind="service"), Target("127.0.0.9", kind="endpoint")])
    d.pods.replace([("127.0.0.1", "shop", "cart-7d9f-x2")])
    return d


Resync = Callable[[FlowStats, float], list[int]]


def run_listener(d: Discovery, items: list[bytes | OSError], *, sysctl: Callable[[], int | None] = lambda: 2,
                 resync: Resync | None = None) -> tuple[FlowListener, CollectorRegistry]:
    stats = FlowStats(d, top_n=10, window=60)
    sock = Replay(items)
    listener = FlowListener(stats, open_socket=lambda: sock, events_sysctl=sysctl,
                            resync=resync or (lambda s, deadline: []))
    listener.start()
    deadline = time.monotonic() + 5
    while sock.items and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    listener.stop(2)
    return listener, build_registry([DnsFlowsCollector(listener)])


def test_flows_are_counted_by_server_kind_and_backend_and_unanswered_ones_charged_to_the_pod() -> None:
    _, reg = run_listener(discovery(), list(events()))
    v = reg.get_sample_value
    assert v("conntrack_dns_flows_total", {"server_kind": "service", "backend": "127.0.0.1"}) == 2  # UDP + TCP
    assert v("conntrack_dns_flows_total", {"server_kind": "endpoint", "backend": "127.0.0.9"}) == 1
    assert v("conntrack_dns_flows_total", {"server_kind": "other", "backend": "other"}) == 1  # ::1, no target
    assert v("conntrack_dns_unanswered_flows_total", {"server_kind": "service", "backend": "127.0.0.1"}) is None
    assert v("conntrack_dns_unanswered_flows_total", {"server_kind": "endpoint", "backend": "127.0.0.9"}) == 1
    assert v("conntrack_dns_unanswered_flows_total", {"server_kind": "other", "backend": "other"}) == 1
    assert v("conntrack_dns_unanswered_top_pods", {"namespace": "shop", "pod": "cart-7d9f-x2"}) == 1
    assert v("conntrack_dns_unanswered_top_pods", {"namespace": "", "pod": ""}) == 1  # ::1 is no pod
    assert v("conntrack_dns_unanswered_top_pods", {"namespace": "", "pod": "other"}) == 0
    assert v("conntrack_dns_events_total", {"type": "new"}) == 4
    assert v("conntrack_dns_events_total", {"type": "destroy"}) == 4
    assert v("conntrack_dns_events_total", {"type": "other"}) == 6  # the recording has no filter
    assert v("conntrack_dns_excluded_flows_total") == 0
    assert v("conntrack_dns_events_enabled") == 1
    assert v("conntrack_dns_exporter_collector_success", {"collector": "dnsflows"}) == 1


def own_flow_port() -> int:
    """The source port of the recorded IPv6 flow (::1 is no pod)."""
    for d in events():
        for _, f in iter_flows(d, len(d)):
            if f is not None and len(f[1]) == 16:
                return f[3]
    raise AssertionError("no IPv6 flow in the recording")


def test_the_exporters_own_probe_flows_are_left_out() -> None:
    d = discovery()
    d.own_ports.register(socket.IPPROTO_UDP, own_flow_port())
    _, reg = run_listener(d, list(events()))
    v = reg.get_sample_value
    assert v("conntrack_dns_flows_total", {"server_kind": "other", "backend": "other"}) is None
    assert v("conntrack_dns_unanswered_flows_total", {"server_kind": "other", "backend": "other"}) is None
    assert v("conntrack_dns_unanswered_top_pods", {"namespace": "", "pod": ""}) == 0
    assert v("conntrack_dns_excluded_flows_total") == 1
    # a pod's flow is never taken for a probe, even from a registered port
    d = discovery()
    pod_port = next(f[3] for e in events() for _, f in iter_flows(e, len(e)) if f is not None and f[1] == b"\x7f\0\0\1")
    d.own_ports.register(socket.IPPROTO_UDP, pod_port)
    _, reg = run_listener(d, list(events()))
    assert reg.get_sample_value("conntrack_dns_unanswered_top_pods", {"namespace": "shop", "pod": "cart-7d9f-x2"}) == 1


def test_lost_events_are_counted_and_followed_by_one_resync(caplog: pytest.LogCaptureFixture) -> None:
    calls = []

    def resync(stats: FlowStats, deadline: float) -> list[int]:
        calls.append(deadline)
        return [12345]

    enobufs = OSError(errno.ENOBUFS, "No buffer space available")
    with caplog.at_level(logging.INFO):
        _, reg = run_listener(discovery(), [enobufs, enobufs, *events()], resync=resync)
    assert reg.get_sample_value("conntrack_dns_events_lost_total") == 2
    assert reg.get_sample_value("conntrack_dns_resyncs_total") == 1 and len(calls) == 1  # rate-limited
    assert reg.get_sample_value("conntrack_dns_events_total", {"type": "new"}) == 4  # and it kept listening
    assert sum("conntrack events lost" in r.getMessage() for r in caplog.records) == 1


def test_events_disabled_is_one_log_line_and_a_metric(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        listener, reg = run_listener(discovery(), [], sysctl=lambda: 0)
        listener.check_sysctl()
        listener.check_sysctl()
    assert reg.get_sample_value("conntrack_dns_events_enabled") == 0
    assert sum("nf_conntrack_events is 0" in r.getMessage() for r in caplog.records) == 1


def test_a_listener_that_cannot_subscribe_is_down_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    from exporter.netlink import NetlinkError

    def refuse() -> Replay:
        raise NetlinkError(errno.EPERM, "joining netlink multicast group 1")

    stats = FlowStats(discovery())
    listener = FlowListener(stats, open_socket=refuse, events_sysctl=lambda: 2)
    with caplog.at_level(logging.WARNING):
        listener.start()
        time.sleep(0.2)
        listener.stop(2)
    reg = build_registry([DnsFlowsCollector(listener)])
    assert reg.get_sample_value("conntrack_dns_listener_up") == 0
    assert reg.get_sample_value("conntrack_dns_exporter_collector_success", {"collector": "dnsflows"}) == 1
    lines = [r.getMessage() for r in caplog.records if "listener down" in r.getMessage()]
    assert len(lines) == 1 and "CAP_NET_ADMIN" in lines[0]


def test_backend_labels_are_bounded() -> None:
    from exporter.dnsflows import flows as flows_mod

    d = Discovery()
    d.targets.set("kubernetes", [Target("10.96.0.10", kind="service")])
    stats = FlowStats(d)
    svc = socket.inet_aton("10.96.0.10")
    for i in range(flows_mod.MAX_BACKENDS + 20):
        client, backend = socket.inet_aton("10.244.1.2"), socket.inet_aton(f"10.244.{i // 250}.{i % 250}")
        public = socket.inet_aton(f"8.8.{i // 250}.{i % 250}")
        stats.new((17, client, svc, 40000 + i, 53, backend, 8, i))
        stats.new((17, client, public, 40000 + i, 53, public, 8, 10000 + i))
    snap = stats.snapshot()
    assert len(snap.flows) == flows_mod.MAX_BACKENDS + 2  # 64 backends + service/other + other/other
    assert snap.flows[("service", "other")] == 20 and snap.flows[("other", "other")] == flows_mod.MAX_BACKENDS + 20


def test_series_stay_within_the_documented_cardinality() -> None:
    """docs/metrics.md: series <= 2 x sum_k B_k + (P + 2) + 8; the typical node there has at most 28."""
    d = Discovery()
    d.targets.set("kubernetes", [Target("10.96.0.10", kind="service"), Target("10.244.10.2", kind="endpoint"),
                                 Target("10.244.11.2", kind="endpoint")])
    d.pods.replace([(f"10.244.1.{i}", "shop", f"pod-{i}") for i in range(2, 40)])
    stats = FlowStats(d, top_n=10)
    svc, ep = socket.inet_aton("10.96.0.10"), socket.inet_aton("10.244.10.2")
    backends = [socket.inet_aton("10.244.10.2"), socket.inet_aton("10.244.11.2")]
    for i in range(2000):  # 38 pods, through the Service, straight to one pod, to public resolvers; half lost
        client = socket.inet_aton(f"10.244.1.{2 + i % 38}")
        public = socket.inet_aton(f"9.9.{i % 200}.{i % 7}")
        for dst, backend in ((svc, backends[i % 2]), (ep, ep), (public, public)):
            flow = (17, client, dst, 30000 + i, 53, backend, 0x208 if i % 2 else 0x20A, i)
            stats.new(flow)
            stats.destroy(flow)
    listener = FlowListener(stats, events_sysctl=lambda: 2)
    listener.check_sysctl()
    reg = build_registry([DnsFlowsCollector(listener)])
    series = [s for fam in reg.collect() if fam.name.startswith("conntrack_dns_")
              and not fam.name.startswith("conntrack_dns_exporter") for s in fam.samples]
    assert len(series) <= 2 * 4 + (10 + 2) + 8 == 28
    assert len(series) >= 20  # the scenario does fill the rows (a check that could not fail would be worthless)


def test_an_idle_listener_stops_at_once() -> None:
    """The listener waits for events without a timeout (an idle one costs no wake-ups, docs/dnsflows.md);
    stop() must still end it at once, well within the exporter's shutdown budget, not at the next sysctl
    re-read 30 s later. A socket that never receives anything stands in for a quiet event socket."""
    quiet, other_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener = FlowListener(FlowStats(discovery()), open_socket=lambda: quiet, events_sysctl=lambda: 2)
    try:
        listener.start()
        time.sleep(0.3)
        assert listener.up and listener._thread is not None and listener._thread.is_alive()
        started = time.monotonic()
        listener.stop(5)
        assert not listener._thread.is_alive() and time.monotonic() - started < 1.0
    finally:
        other_end.close()


def test_a_listener_pausing_between_drains_stops_at_once() -> None:
    """Under a steady stream the listener pauses between drains (on its wake pipe, docs/dnsflows.md), for
    up to half a second with the default buffer; stop() must end a pause at once. The pause is stretched
    to 30 s here, so a stop that waited for it would be seen."""
    stream, sender = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener = FlowListener(FlowStats(discovery()), open_socket=lambda: stream, events_sysctl=lambda: 2)
    listener._pause = 30.0
    try:
        listener.start()
        for _ in range(10):  # one datagram per 20 ms: every drain finds some, so the listener pauses
            sender.send(b"\0" * 20)
            time.sleep(0.02)
        time.sleep(0.3)  # in a pause: the rate seen asks for a long one
        assert listener.stats.events["other"] >= 1 and listener._thread is not None
        started = time.monotonic()
        listener.stop(5)
        assert not listener._thread.is_alive() and time.monotonic() - started < 1.0
    finally:
        sender.close()


def test_a_garbled_reply_source_is_counted_as_backend_other_not_a_crash() -> None:
    """A message whose reply-tuple source is no 4- or 16-byte address (a garbled event that still parsed:
    the attribute walk takes an address attribute of any length) to a known server: the flow is counted with
    `backend="other"`; naming the backend raised in inet_ntop and the exception ended the listener thread."""
    d = Discovery()
    d.targets.set("kubernetes", [Target("10.96.0.10", kind="service")])
    stats = FlowStats(d)
    svc, client = socket.inet_aton("10.96.0.10"), socket.inet_aton("10.244.1.2")
    stats.new((17, client, svc, 40000, 53, b"\x0a\xf4\x01\x02\x09", 8, 1))
    stats.destroy((17, client, svc, 40000, 53, b"\x0a\xf4", 0, 1))
    snap = stats.snapshot()
    assert snap.flows == {("service", "other"): 1} and snap.unanswered == {("service", "other"): 1}

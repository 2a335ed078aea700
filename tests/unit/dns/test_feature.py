"""Probe flags: bad values exit 2 with one line before anything starts; good ones reach the target registry."""

from __future__ import annotations

import pytest

from exporter.cli import parse_args
from exporter.core.feature import AppContext
from exporter.dns import feature


@pytest.mark.parametrize("argv,needle", [
    (["--probe.interval=-1s"], "--probe.interval"),
    (["--probe.interval=0"], "positive"),
    (["--probe.timeout=soon"], "invalid duration"),
    (["--probe.server=dns.example:53"], "IP address"),
    (["--probe.server=10.0.0.1:99999"], "invalid port"),
    (["--probe.server=[fd00::1"], "missing ']'"),
    (["--probe.modes=parallel,udp"], "unknown probe mode 'udp'"),
    (["--probe.attempts=0"], "positive"),
    (["--probe.concurrency=many"], "not an integer"),
    (["--probe.name=bad..name"], "invalid DNS name"),
    (["--probe.nodelocal=169.254.20.10:x"], "invalid port"),
])
def test_bad_probe_flag_exits_2_with_one_line(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert needle in err




def test_flags_become_targets_and_config() -> None:
    args = parse_args(["--collector.dns", "--probe.server=10.96.0.10", "--probe.server=[fd00::a]:5353",
                       "--probe.nodelocal=169.254.20.10", "--probe.modes=tcp,parallel,tcp",
                       "--probe.name=example.org", "--probe.search-name=api.example.com",
                       "--probe.timeout=500ms", "--probe.attempts=3"])
    ctx = AppContext()
    built = feature.build(args, ctx)
    assert [c.name for c in built.collectors] == ["dns"]
    assert {(t.server, t.kind) for t in ctx.targets.snapshot()} == {
        ("10.96.0.10:53", "static"), ("[fd00::a]:5353", "static"), ("169.254.20.10:53", "nodelocal")}
    config = built.services[0].config  # type: ignore[attr-defined]
    assert config.modes == ("tcp", "parallel")
    assert config.names == ("example.org.",)
    assert config.search_names == ("api.example.com",)
    assert (config.timeout, config.attempts, config.interval) == (0.5, 3, 5.0)


def test_defaults_follow_the_issue() -> None:
    args = parse_args(["--collector.dns"])
    built = feature.build(args, AppContext())
    config = built.services[0].config  # type: ignore[attr-defined]
    assert config.modes == ("parallel", "tcp")
    assert config.names == ("kubernetes.default.svc.cluster.local.",)
    assert (config.timeout, config.attempts, config.interval) == (5.0, 2, 5.0)
    assert config.resolv_conf == "/etc/resolv.conf"


def test_no_collector_dns_builds_nothing() -> None:
    ctx = AppContext()
    built = feature.build(parse_args(["--no-collector.dns", "--probe.server=10.0.0.1"]), ctx)
    assert built.collectors == [] and built.services == []
    assert ctx.targets.snapshot() == ()

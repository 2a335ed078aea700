"""Flags, environment twins and bad input: one clear line and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from subprocess import CompletedProcess

import pytest

from exporter import cli
from exporter.core import logs
from exporter.core.flags import env_name, parse_duration, parse_hostport


def run_exporter(*args: str, env: dict[str, str] | None = None, timeout: float = 20) -> CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "exporter", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_env_twin_names() -> None:
    assert env_name("--web.listen-address") == "CONNTRACK_DNS_EXPORTER_WEB_LISTEN_ADDRESS"
    assert env_name("--collector.conntrack.per-cpu") == "CONNTRACK_DNS_EXPORTER_COLLECTOR_CONNTRACK_PER_CPU"


def test_env_sets_a_default_and_the_flag_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONNTRACK_DNS_EXPORTER_WEB_LISTEN_ADDRESS", "127.0.0.1:9999")
    monkeypatch.setenv("CONNTRACK_DNS_EXPORTER_COLLECTOR_CONNTRACK_PER_CPU", "true")
    args = cli.parse_args([])
    assert args.web_listen_address == ("127.0.0.1", 9999)
    assert args.collector_conntrack_per_cpu is True
    args = cli.parse_args(["--web.listen-address=:8080", "--no-collector.conntrack.per-cpu"])
    assert args.web_listen_address == ("", 8080)
    assert args.collector_conntrack_per_cpu is False


def test_defaults() -> None:
    args = cli.parse_args([])
    assert args.web_listen_address == ("", cli.DEFAULT_PORT)
    assert args.collector_conntrack is True and args.collector_conntrack_per_cpu is False
    assert (args.log_level, args.log_format) == ("info", "logfmt")


@pytest.mark.parametrize(("text", "seconds"), [("5s", 5), ("500ms", 0.5), ("1m30s", 90), ("2", 2), ("1h", 3600)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["-1s", "0", "5 s", "fast", "1x", "", "nan", "NaN", "inf", "-inf", "1e400",
                                  "9999999999h"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_duration(text)


@pytest.mark.parametrize(("text", "want"), [(":9100", ("", 9100)), ("127.0.0.1:80", ("127.0.0.1", 80)),
                                            ("[::1]:53", ("::1", 53)), ("node-1.local:1", ("node-1.local", 1))])
def test_hostports(text: str, want: tuple[str, int]) -> None:
    assert parse_hostport(text) == want








def test_logfmt_and_json_lines(capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup("debug", "logfmt")
    logs.get("t").warning('a "quoted" thing', extra={"kv": {"collector": "conntrack", "n": 3}})
    err = capsys.readouterr().err.strip()
    assert 'level=warn logger=exporter.t msg="a \\"quoted\\" thing" collector=conntrack n=3' in err
    logs.setup("info", "json")
    logs.get("t").debug("hidden")
    logs.get("t").error("shown", extra={"kv": {"x": 1}})
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    rec = json.loads(lines[0])
    assert rec["level"] == "error" and rec["msg"] == "shown" and rec["x"] == 1
    logging.getLogger("exporter").handlers.clear()


def test_bounded_flag_types() -> None:
    """Issue 13: every numeric flag has a range (glibc caps attempts at 5, timeout at 30 s)."""
    from exporter.core.flags import duration, int_range

    attempts, interval = int_range(1, 5), duration(0.1, 86400)
    assert attempts("5") == 5 and interval("100ms") == pytest.approx(0.1)
    for bad in ("0", "6", "1000000", "1.5", "nan"):
        with pytest.raises(argparse.ArgumentTypeError):
            attempts(bad)
    for bad in ("50ms", "25h", "nan", "inf"):
        with pytest.raises(argparse.ArgumentTypeError):
            interval(bad)
    helps = {a.option_strings[0]: a.help or "" for a in cli.build_parser()._actions if a.option_strings}
    assert "Range: 1 to 5." in helps["--probe.attempts"]
    assert "Range: 100ms to 24h." in helps["--probe.interval"]


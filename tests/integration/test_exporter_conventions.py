"""Exporter conventions (node_exporter and the exporter-toolkit are the reference): `--web.telemetry-path`,
`--web.disable-exporter-metrics`, `name[]` filtering on the metrics path, `build_info` with revision and
branch, prometheus_client's GC and platform collectors, defaults shown in `--help`, and a bad environment
twin that the command line overrides not aborting the start. The end-to-end cases run the real exporter
(`python -m exporter`, no collectors that need root) and scrape it over loopback."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from exporter import __version__, cli
from exporter.app import BuildInfo, build_registry
from tests.support.exporter_proc import Exporter

QUIET = ["--no-collector.dns", "--kubernetes.enabled=false", "--no-collector.table", "--no-collector.conntrack"]


def _families(body: bytes) -> dict[str, list[tuple[str, dict[str, str]]]]:
    return {f.name: [(s.name, s.labels) for s in f.samples] for f in text_string_to_metric_families(body.decode())}


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("CONNTRACK_DNS_EXPORTER_")}


@pytest.fixture
def exporter(request: pytest.FixtureRequest) -> Iterator[Exporter]:
    args, env = getattr(request, "param", ([], {}))
    exp = Exporter([*QUIET, *args], env={**_clean_env(), **env})
    try:
        exp.wait_ready()
        yield exp
    finally:
        exp.stop()


# --- --help ---------------------------------------------------------------------------------------------

def test_help_shows_every_default_and_twin() -> None:
    r = subprocess.run([sys.executable, "-m", "exporter", "--help"], capture_output=True, text=True, timeout=30,
                       env={**_clean_env(), "COLUMNS": "400"})
    assert r.returncode == 0
    out = r.stdout
    for text in ("[default: :19153; env CONNTRACK_DNS_EXPORTER_WEB_LISTEN_ADDRESS]",
                 "[default: 300s; env CONNTRACK_DNS_EXPORTER_WEB_IDLE_TIMEOUT]",
                 "[default: /metrics; env CONNTRACK_DNS_EXPORTER_WEB_TELEMETRY_PATH]",
                 "[default: off; env CONNTRACK_DNS_EXPORTER_WEB_DISABLE_EXPORTER_METRICS]",
                 "[default: info; env CONNTRACK_DNS_EXPORTER_LOG_LEVEL]"):
        assert text in " ".join(out.split()), text


def test_help_shows_built_in_defaults_not_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONNTRACK_DNS_EXPORTER_WEB_IDLE_TIMEOUT", "42s")
    help_text = " ".join(cli.build_parser().format_help().split())
    assert "[default: 300s; env CONNTRACK_DNS_EXPORTER_WEB_IDLE_TIMEOUT]" in help_text
    assert cli.parse_args([]).web_idle_timeout == 42.0


# --- a bad environment twin ------------------------------------------------------------------------------

@pytest.mark.parametrize(("env", "value", "flag", "dest", "want"), [
    ("CONNTRACK_DNS_EXPORTER_WEB_IDLE_TIMEOUT", "forever", "--web.idle-timeout=5s", "web_idle_timeout", 5.0),
    ("CONNTRACK_DNS_EXPORTER_WEB_NOTRACK", "maybe", "--no-web.notrack", "web_notrack", False),
    ("CONNTRACK_DNS_EXPORTER_LOG_LEVEL", "loud", "--log.level=debug", "log_level", "debug"),
    ("CONNTRACK_DNS_EXPORTER_PROBE_SERVER", "not-an-ip", "--probe.server=10.0.0.1", "probe_server", None),
], ids=["duration", "bool", "choice", "repeatable"])
def test_a_bad_twin_overridden_on_the_command_line_does_not_abort(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], env: str, value: str, flag: str,
        dest: str, want: object) -> None:
    monkeypatch.setenv(env, value)
    args = cli.parse_args([flag])
    if want is not None:
        assert getattr(args, dest) == want
    else:
        assert getattr(args, dest)
    # Left unset on the command line, the bad twin still stops the start with one line naming it.
    with pytest.raises(SystemExit) as exc:
        cli.parse_args([])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and env in err and "Traceback" not in err


def test_the_real_exporter_starts_with_a_bad_twin_it_was_told_to_ignore() -> None:
    env = {**_clean_env(), "CONNTRACK_DNS_EXPORTER_WEB_MAX_CONNECTIONS": "lots"}
    with Exporter([*QUIET, "--web.max-connections=8"], env=env) as exp:
        assert exp.get("/metrics")[0] == 200
    r = subprocess.run([sys.executable, "-m", "exporter", *QUIET], capture_output=True, text=True, timeout=30,
                       env=env)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "CONNTRACK_DNS_EXPORTER_WEB_MAX_CONNECTIONS" in r.stderr


# --- --web.telemetry-path --------------------------------------------------------------------------------

@pytest.mark.parametrize("exporter", [(["--web.telemetry-path=/scrape/here"], {})], indirect=True)
def test_telemetry_path_moves_the_metrics(exporter: Exporter) -> None:
    status, _, body = exporter.get("/scrape/here")
    assert status == 200 and b"conntrack_dns_exporter_build_info" in body
    assert exporter.get("/metrics")[0] == 404
    assert b'href="scrape/here"' in exporter.get("/")[2], "the landing page links the real path"
    assert exporter.get("/-/healthy")[0] == 200


@pytest.mark.parametrize("path", ["metrics", "/", "/-/ready", "/a b", "/m?x=1"])
def test_telemetry_path_must_be_a_free_absolute_path(path: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.parse_args([f"--web.telemetry-path={path}"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


# --- name[] ----------------------------------------------------------------------------------------------

def test_name_filter_returns_only_the_named_samples(exporter: Exporter) -> None:
    q = "name[]=conntrack_dns_exporter_build_info&name[]=process_cpu_seconds_total&name[]=python_gc_objects_collected"
    status, _, body = exporter.get(f"/metrics?{q}")
    assert status == 200
    fams = _families(body)
    assert set(fams) == {"conntrack_dns_exporter_build_info", "process_cpu_seconds", "python_gc_objects_collected"}
    # A family's name selects all of its samples (one per GC generation here).
    assert len(fams["python_gc_objects_collected"]) == 3
    # Unfiltered, the same scrape has everything.
    assert len(_families(exporter.get("/metrics")[2])) > 10
    # A name nobody exports: an empty, valid exposition.
    status, _, body = exporter.get("/metrics?name[]=no_such_metric")
    assert status == 200 and _families(body) == {}


def test_name_filter_in_openmetrics_too(exporter: Exporter) -> None:
    status, headers, body = exporter.get("/metrics?name[]=conntrack_dns_exporter_build_info",
                                         headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert status == 200 and headers["content-type"].startswith("application/openmetrics-text")
    lines = [line for line in body.decode().splitlines() if not line.startswith("#")]
    assert len(lines) == 1 and lines[0].startswith("conntrack_dns_exporter_build_info{")
    assert body.decode().endswith("# EOF\n")


# --- exporter metrics: GC, platform, --web.disable-exporter-metrics --------------------------------------

def test_gc_and_platform_collectors_are_served(exporter: Exporter) -> None:
    fams = _families(exporter.get("/metrics")[2])
    for name in ("python_gc_objects_collected", "python_gc_collections", "python_info", "process_cpu_seconds",
                 "conntrack_dns_exporter_web_scrapes"):
        assert name in fams, name


def test_disable_exporter_metrics_leaves_out_the_process_runtime_and_web_server() -> None:
    # The conntrack collector stays on (it succeeds as root, fails without CAP_NET_ADMIN: either way its
    # success gauge is served).
    with Exporter([*QUIET[:-1], "--web.disable-exporter-metrics"], env=_clean_env()) as exp:
        fams = _families(exp.get("/metrics")[2])
    left = [n for n in fams if n.startswith(("process_", "python_", "conntrack_dns_exporter_web_"))]
    assert left == []
    # What dashboards and alerts rely on stays.
    assert "conntrack_dns_exporter_build_info" in fams
    assert ("conntrack_dns_exporter_collector_success", {"collector": "conntrack"}) in fams[
        "conntrack_dns_exporter_collector_success"]


def test_build_registry_without_exporter_metrics() -> None:
    with_ = {f.name for f in build_registry([]).collect()}
    without = {f.name for f in build_registry([], exporter_metrics=False).collect()}
    assert {"process_cpu_seconds", "python_info", "python_gc_objects_collected"} <= with_
    assert without == {"conntrack_dns_exporter_build_info"} | {n for n in with_ if n.startswith("conntrack_dns")}


# --- build_info ------------------------------------------------------------------------------------------

def _build_labels() -> dict[str, str]:
    (fam,) = BuildInfo().collect()
    (sample,) = fam.samples
    return dict(sample.labels)


def test_build_info_has_revision_and_branch_from_the_image_build(monkeypatch: pytest.MonkeyPatch) -> None:
    # The image build writes exporter/_build.py from its REVISION/BRANCH build args (tests/unit/test_dockerfile.py
    # builds a wheel that way); here the module is put in place directly.
    monkeypatch.setitem(sys.modules, "exporter._build", types.SimpleNamespace(REVISION="0123abc", BRANCH="main"))
    labels = _build_labels()
    assert labels["revision"] == "0123abc" and labels["branch"] == "main"
    assert labels["version"] == __version__ and labels["python_version"]


def test_build_info_from_a_source_checkout_says_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "exporter._build", None)  # import fails, as without the generated file
    labels = _build_labels()
    assert labels["revision"] == "unknown" and labels["branch"] == "unknown"

"""The alerting rules: generated files match their source, promtool accepts them and their unit tests pass,
every alert carries what on-call needs (severity, summary, a description naming the node and the value, a
runbook that exists), every alert has a firing and a silent promtool case, and the job selector is one knob."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "alerts" / "conntrack-dns-exporter.rules.yaml"
PROMRULE = ROOT / "deploy" / "components" / "prometheusrule" / "prometheusrule.yaml"
TESTS = sorted((ROOT / "alerts" / "tests").glob("*.yaml"))
RUNBOOKS = ROOT / "docs" / "runbooks"

EXPECTED_ALERTS = {
    "ConntrackTableNearFull", "ConntrackTableFilling", "ConntrackInsertFailed", "ConntrackDroppingPackets",
    "DNSProbeFailures", "DNSServiceIPPathBroken", "DNSProbeSlow", "DNSParallelQueryRetries",
    "ConntrackClashResolving", "ConntrackDNSExporterDown", "ConntrackDNSExporterCollectorFailing",
    "DNSBackendUnanswered",
}
# The metric contract of the exporter (issues 2, 4, 5): a typo in a rule would make the alert silently dead.
CONTRACT_METRICS = {
    "up", "conntrack_entries", "conntrack_entries_limit", "conntrack_stat_insert_failed_total",
    "conntrack_stat_drop_total", "conntrack_stat_clash_resolve_total", "dns_probe_requests_total",
    "dns_probe_failures_total", "dns_probe_retries_total", "dns_probe_partial_pairs_total",
    "dns_probe_duration_seconds_bucket", "conntrack_dns_exporter_collector_success",
    "conntrack_dns_exporter_kubernetes_up", "dns_probe_endpoint_queries_total",
    "conntrack_dns_flows_total", "conntrack_dns_unanswered_flows_total",
}
PROMQL_WORDS = {"sum", "by", "without", "increase", "rate", "or", "and", "on", "histogram_quantile", "le",
                "label_replace", "job", "instance", "node", "server", "kind", "mode", "cpu", "result",
                "count", "server_kind", "backend"}

needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool missing (Debian package prometheus; make deps installs it)")


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_alerts", ROOT / "scripts" / "gen_alerts.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gen_alerts"] = mod
    spec.loader.exec_module(mod)
    return mod


def all_rules(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The alerting rules (recording rules: `records`)."""
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


def records(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for g in doc["groups"] for r in g["rules"] if "record" in r]


def test_fleet_recording_rules_use_contract_metrics_or_earlier_records_and_select_the_job() -> None:
    """Issue 17: one self-contained group; each rule reads exporter metrics or a record defined before it in the
    group (rules of a group are evaluated in order), selects the job, and is named level:metric:operations."""
    doc = yaml.safe_load(RULES.read_text())
    groups = [g for g in doc["groups"] if any("record" in r for r in g["rules"])]
    assert [g["name"] for g in groups] == ["conntrack-dns-exporter.fleet"]
    defined: set[str] = set()
    for r in records(doc):
        assert re.fullmatch(r"[a-z_]+:[a-z_]+:[a-z0-9_]+", r["record"]), r["record"]
        no_strings = re.sub(r"\[[0-9a-z]+\]", "", re.sub(r'"[^"]*"', '""', r["expr"]))
        names = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", no_strings)) - PROMQL_WORDS
        assert names <= CONTRACT_METRICS | defined, f"{r['record']}: unknown names {names - CONTRACT_METRICS - defined}"
        for metric, sel in re.findall(r"([a-z_:]+)\{([^}]*)\}", r["expr"]):
            assert 'job="conntrack-dns-exporter"' in sel, f"{r['record']}: {metric} without the job selector"
        defined.add(r["record"])
    levels = {r["record"].split(":")[0] for r in records(doc)}
    assert {"node", "server"} <= levels  # per node across endpoints, per endpoint across nodes


def test_generated_files_match_the_source() -> None:
    r = subprocess.run([sys.executable, "scripts/gen_alerts.py", "--check"], cwd=ROOT, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stderr


def test_prometheusrule_carries_exactly_the_rule_file_groups() -> None:
    plain = yaml.safe_load(RULES.read_text())
    crd = yaml.safe_load(PROMRULE.read_text())
    assert crd["apiVersion"] == "monitoring.coreos.com/v1" and crd["kind"] == "PrometheusRule"
    assert crd["metadata"]["name"]
    assert crd["spec"]["groups"] == plain["groups"]


def test_check_mode_detects_a_hand_edited_rule_file(tmp_path: Path) -> None:
    gen = load_generator()
    edited = RULES.read_text().replace("> 0.9", "> 0.95", 1)
    assert edited != RULES.read_text()
    (tmp_path / "rules.yaml").write_text(edited)
    gen.RULES_FILE, saved = tmp_path / "rules.yaml", gen.RULES_FILE
    try:
        assert gen.main(["--check"]) == 1
    finally:
        gen.RULES_FILE = saved


@needs_promtool
def test_promtool_accepts_both_rule_files(tmp_path: Path) -> None:
    spec_only = tmp_path / "from-prometheusrule.yaml"
    spec_only.write_text(yaml.safe_dump({"groups": yaml.safe_load(PROMRULE.read_text())["spec"]["groups"]}))
    r = subprocess.run(["promtool", "check", "rules", str(RULES), str(spec_only)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    n_records = len(records(yaml.safe_load(RULES.read_text())))
    assert r.stdout.count(f"SUCCESS: {len(EXPECTED_ALERTS) + n_records} rules found") == 2, r.stdout


@needs_promtool
def test_promtool_unit_tests_pass() -> None:
    assert TESTS
    r = subprocess.run(["promtool", "test", "rules", *map(str, TESTS)], capture_output=True, text=True,
                       timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_alert_is_there_with_severity_annotations_and_runbook() -> None:
    rules = all_rules(yaml.safe_load(RULES.read_text()))
    names = [r["alert"] for r in rules]
    assert sorted(names) == sorted(EXPECTED_ALERTS)
    gen = load_generator()
    for r in rules:
        name = r["alert"]
        assert r["labels"]["severity"] in {"critical", "warning", "info"}, name
        ann = r["annotations"]
        assert ann["summary"].strip(), name
        assert "$labels.node" in ann["description"] and "$labels.instance" in ann["description"], name
        if r["expr"].rstrip().endswith("== 0") or "== 0\n" in r["expr"]:
            # Down/failing alerts: the value is always 0, the node (and collector) are what matter.
            assert "$labels.collector" in ann["description"] or name == "ConntrackDNSExporterDown", name
        else:
            assert "$value" in ann["description"], name
        assert ann["runbook_url"] == f"{gen.RUNBOOK_BASE_URL}{name}.md"
        runbook = RUNBOOKS / f"{name}.md"
        assert runbook.is_file(), f"missing runbook {runbook}"
        assert name in runbook.read_text().splitlines()[0], f"{runbook} does not start with its alert name"


def test_severities_match_the_issue() -> None:
    sev = {r["alert"]: r["labels"]["severity"] for r in all_rules(yaml.safe_load(RULES.read_text()))}
    assert sev["ConntrackTableNearFull"] == sev["ConntrackDroppingPackets"] == "critical"
    assert sev["DNSServiceIPPathBroken"] == "critical"
    assert sev["ConntrackTableFilling"] == sev["ConntrackInsertFailed"] == sev["DNSParallelQueryRetries"] == "warning"
    assert sev["ConntrackClashResolving"] == "info"


def test_rules_only_use_contract_metrics_and_always_select_the_job() -> None:
    for r in all_rules(yaml.safe_load(RULES.read_text())):
        expr = r["expr"]
        no_strings = re.sub(r'"[^"]*"', '""', expr)
        no_strings = re.sub(r"\[[0-9a-z]+\]", "", no_strings)
        names = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", no_strings)) - PROMQL_WORDS
        assert names <= CONTRACT_METRICS, f"{r['alert']}: unknown metric names {names - CONTRACT_METRICS}"
        selectors = re.findall(r"([a-z_:]+)\{([^}]*)\}", expr)
        assert selectors, r["alert"]
        for metric, sel in selectors:
            assert 'job="conntrack-dns-exporter"' in sel, f"{r['alert']}: {metric} without the job selector"


def test_job_selector_is_one_parameter() -> None:
    gen = load_generator()
    groups = gen.render_groups(job="node-dns")
    text = gen.rule_file_text(groups)
    assert 'job="conntrack-dns-exporter"' not in text
    n_selectors = len(re.findall(r"[a-z_]+\{", text))
    assert text.count('job="node-dns"') == n_selectors > 11


def test_for_override_shortens_only_alerts_that_wait() -> None:
    gen = load_generator()
    fast = {r["alert"]: r.get("for") for r in all_rules({"groups": gen.render_groups(for_override="2s")})}
    normal = {r["alert"]: r.get("for") for r in all_rules(yaml.safe_load(RULES.read_text()))}
    assert fast["ConntrackTableNearFull"] == "2s" and normal["ConntrackTableNearFull"] == "5m"
    assert normal["ConntrackTableFilling"] == "15m"
    assert fast["ConntrackDroppingPackets"] is None and normal["ConntrackDroppingPackets"] is None


def _alert_cases() -> dict[str, dict[str, bool]]:
    """alertname -> {"fires": has a case expecting it, "silent": has a test group where it never fires}."""
    seen: dict[str, dict[str, bool]] = {}
    for f in TESTS:
        for group in yaml.safe_load(f.read_text())["tests"]:
            per_alert: dict[str, list[bool]] = {}
            for case in group.get("alert_rule_test", []):
                per_alert.setdefault(case["alertname"], []).append(bool(case["exp_alerts"]))
            for name, results in per_alert.items():
                s = seen.setdefault(name, {"fires": False, "silent": False})
                s["fires"] |= any(results)
                s["silent"] |= not any(results)
    return seen


def test_every_alert_has_a_firing_and_a_silent_promtool_case() -> None:
    cases = _alert_cases()
    for name in EXPECTED_ALERTS:
        assert cases.get(name, {}).get("fires"), f"{name}: no promtool case where it fires"
        assert cases.get(name, {}).get("silent"), f"{name}: no promtool case where it stays silent"


def test_waiting_alerts_are_checked_pending_before_their_for() -> None:
    """A firing case evaluated only long after `for` would pass even if `for` were dropped: every alert with a
    `for` has a group where it is silent at most `for` before it fires."""
    fors = {r["alert"]: r.get("for") for r in all_rules(yaml.safe_load(RULES.read_text()))}
    for name, for_ in fors.items():
        if not for_:
            continue
        minutes = int(for_.rstrip("m"))
        found = False
        for f in TESTS:
            for group in yaml.safe_load(f.read_text())["tests"]:
                cases = [c for c in group.get("alert_rule_test", []) if c["alertname"] == name]
                times = [(int(str(c["eval_time"]).rstrip("m")), bool(c["exp_alerts"])) for c in cases]
                firing = [t for t, fires in times if fires]
                if firing:
                    silent_before = [t for t, fires in times if not fires and t < min(firing)]
                    found |= bool(silent_before) and min(firing) - max(silent_before) <= minutes
        assert found, f"{name}: no silent evaluation less than its for ({for_}) before it fires"


@needs_promtool
def test_accelerated_copy_scales_every_window_and_for_and_stays_valid(tmp_path: Path) -> None:
    """The end-to-end test's copy: same rules with time divided by 60, labelled apart from the shipped ones."""
    gen = load_generator()
    fast = gen.render_groups(time_scale=1 / 60, extra_labels={"ruleset": "accelerated"}, group_prefix="fast.")
    shipped = yaml.safe_load(RULES.read_text())["groups"]
    for g_fast, g in zip(fast, shipped, strict=True):
        assert g_fast["name"] == "fast." + g["name"]
        for r_fast, r in zip(g_fast["rules"], g["rules"], strict=True):
            assert (r_fast.get("alert"), r_fast.get("record")) == (r.get("alert"), r.get("record"))
            assert r_fast["labels"] == {**r.get("labels", {}), "ruleset": "accelerated"}
            windows = re.findall(r"\[(\d+)m\]", r["expr"])
            assert re.findall(r"\[(\d+)s\]", r_fast["expr"]) == windows, r.get("alert", r.get("record"))
            if "for" in r:
                assert r_fast["for"] == r["for"].replace("m", "s")
    f = tmp_path / "fast.yaml"
    f.write_text(gen.rule_file_text(fast))
    r = subprocess.run(["promtool", "check", "rules", str(f)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_runbooks_give_commands_and_cover_the_field_fixes() -> None:
    """Each runbook has runnable commands; together they cover what the field reports needed on call."""
    texts = {}
    for name in EXPECTED_ALERTS:
        text = (RUNBOOKS / f"{name}.md").read_text()
        assert "```" in text or "`" in text.split("## ")[-1], f"{name}: no commands"
        texts[name] = text
    every = "\n".join(texts.values())
    for topic in ("conntrack -S", "conntrack -C", "nf_conntrack_max", "nf_conntrack_tcp_timeout_time_wait",
                  "requests.Session()", "NodeLocal DNSCache", "ndots", "single-request-reopen", "use-vc",
                  "force_tcp", "kubeproxy_sync_proxy_rules_last_timestamp_seconds", "uname -r", "clash_resolve",
                  "--conntrack-max-per-core"):
        assert topic in every, f"no runbook mentions {topic}"
    assert "conntrack -S" in texts["ConntrackInsertFailed"] and "NodeLocal DNSCache" in texts["DNSParallelQueryRetries"]
    assert "kubeproxy_sync_proxy_rules_last_timestamp_seconds" in texts["DNSServiceIPPathBroken"]

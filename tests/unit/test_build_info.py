"""conntrack_dns_exporter_build_info says which parser each native piece uses: an image without the C
library still works, at about twice (table scan) or 1.7 times (DNS-flow events) the CPU, and the label is
where an operator sees that."""

from __future__ import annotations

from types import ModuleType

import pytest

from exporter.app import BuildInfo
from exporter.dnsflows import native as events_native
from exporter.table import native as table_native


@pytest.mark.parametrize(("module", "label"), [(table_native, "table_parser"), (events_native, "event_parser")])
def test_build_info_says_which_parser(monkeypatch: pytest.MonkeyPatch, module: ModuleType, label: str) -> None:
    def value() -> str:
        (fam,) = BuildInfo().collect()
        return str(fam.samples[0].labels[label])

    assert value() == "native"
    monkeypatch.setattr(module, "_LIB", None)
    assert value() == "python"

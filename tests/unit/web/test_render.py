"""Family templates (exporter/web/render.py) give exactly prometheus_client's bytes, in both formats, for
the shapes the exporter serves and for awkward values and labels; a new label set gets a new template."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from exporter.web.render import FamilyTemplates, _Families, format_value

FORMATS = {"text": "", "openmetrics": "application/openmetrics-text;version=1.0.0"}


def families(v: float) -> list[Metric]:
    c = CounterMetricFamily("conntrack_stat_drop", "Packets dropped.", value=v)
    g = GaugeMetricFamily("conntrack_timeout_seconds", 'Help with "quotes", a \\ and\na newline.',
                          labels=["protocol", "state"])
    g.add_metric(["tcp", "established"], v * 3)
    g.add_metric(['we"ird\\', "new\nline"], -v)
    h = HistogramMetricFamily("dns_probe_duration_seconds", "Probe time.", labels=["server", "kind", "mode"])
    h.add_metric(["10.96.0.10:53", "service", "parallel"], [("0.005", v), ("+Inf", v + 1)], v / 7)
    i = InfoMetricFamily("conntrack_dns_exporter_build", "Build.", value={"version": "1.0"})
    return [c, g, h, i, GaugeMetricFamily("empty_family", "No samples.", labels=["x"])]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("v", [0.0, 1.0, 12345678.0, 1e-9, 3.3e21, math.inf, -math.inf, math.nan, 2**53 + 1.0])
def test_templates_match_the_encoder(fmt: str, v: float) -> None:
    encoder, content_type = choose_encoder(FORMATS[fmt])
    t = FamilyTemplates(encoder, content_type.startswith("application/openmetrics-text"))
    t.encode(families(1.5))  # templates made from other values
    want = encoder(_Families(families(v)))
    got = t.encode(families(v)) + (b"# EOF\n" if fmt == "openmetrics" else b"")
    assert got == want


def test_a_new_label_set_is_not_served_with_an_old_template() -> None:
    encoder, _ = choose_encoder("")
    t = FamilyTemplates(encoder, False)
    g = GaugeMetricFamily("dns_probe_target_info", "Targets.", labels=["server"])
    g.add_metric(["10.0.0.1:53"], 1)
    assert t.encode([g]) == encoder(_Families([g]))
    g2 = GaugeMetricFamily("dns_probe_target_info", "Targets.", labels=["server"])
    g2.add_metric(["10.0.0.2:53"], 1)
    g2.add_metric(["10.0.0.3:53"], 1)
    assert t.encode([g2]) == encoder(_Families([g2]))
    assert b"10.0.0.1" not in t.encode([g2])


@settings(max_examples=500, deadline=None)
@given(st.lists(st.one_of(st.floats(), st.integers(-(2**70), 2**70), st.sampled_from([0.0, -0.0, 0, 1, True])),
                min_size=1, max_size=30))
def test_remembered_values_print_as_the_encoder_prints_them(values: list[float]) -> None:
    """Values seen before come from the cache: the same text as floatToGoString, -0.0 and 0.0 apart."""
    for v in values + values[::-1]:
        assert format_value(v) == floatToGoString(v)

"""Formatting metric families fast, byte for byte as prometheus_client's encoders do (issue 16).

The encoders spend most of a scrape escaping metric and label names, the same ones every time: only the
values change between two scrapes of one family. `FamilyTemplates` has the real encoder format a family
once with sentinel values, keeps the text between the values as a template (keyed by the family's name,
help, type and the names and labels of its samples), and from then on fills in the values with the
encoder's own float formatting. A template is checked against the encoder on creation and dropped (the
encoder is then used for that shape) if the two ever differ; families with timestamps or exemplars always
go through the encoder.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client.metrics_core import Metric
from prometheus_client.utils import floatToGoString

EOF = b"# EOF\n"
OPENMETRICS = "application/openmetrics-text"
MAX_TEMPLATES = 4096  # shapes kept; label churn (rollouts) beyond this starts over
MAX_VALUES = 8192     # formatted values kept (most values are the same from one scrape to the next)

Template = tuple[tuple[tuple[str, int], ...], str]  # ((text before value, sample index), ...), tail


class _Families:
    """A registry-shaped view of some families, for an encoder."""

    __slots__ = ("_families",)

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


_formatted: dict[float, str] = {}


def format_value(v: float) -> str:
    """floatToGoString(v), remembered: most samples keep their value from one scrape to the next."""
    s = _formatted.get(v)
    if s is None:
        s = floatToGoString(v)
        if v != 0:  # 0.0 and -0.0 are one key but two texts; NaN is never found, so never kept
            if len(_formatted) >= MAX_VALUES:
                _formatted.clear()
            _formatted[v] = s
    return s


def _sentinel(i: int) -> float:
    return float(f"7.{i:07d}31415927e+299")


class FamilyTemplates:
    """`encode(families)` for one encoder (one exposition format)."""

    def __init__(self, encoder: Callable[[Any], bytes], openmetrics: bool) -> None:
        self.encoder = encoder
        self._openmetrics = openmetrics
        self._templates: dict[tuple[Any, ...], Template | None] = {}
        self._lock = threading.Lock()

    def plain(self, families: Iterable[Metric]) -> bytes:
        """The encoder's own output, without OpenMetrics' `# EOF` (the exposition adds one at the end)."""
        body = self.encoder(_Families(families))
        return body[:-len(EOF)] if self._openmetrics and body.endswith(EOF) else body

    def encode(self, families: Iterable[Metric]) -> bytes:
        out: list[str] = []
        for fam in families:
            samples = fam.samples
            if any(s.timestamp is not None or s.exemplar is not None or s.native_histogram is not None
                   for s in samples):
                out.append(self.plain([fam]).decode())
                continue
            key = (fam.name, fam.type, fam.documentation, fam.unit,
                   tuple([(s.name, tuple(s.labels.items())) for s in samples]))
            with self._lock:
                known = key in self._templates
                template = self._templates.get(key)
            if not known:
                template = self._make(fam)
                with self._lock:
                    if len(self._templates) >= MAX_TEMPLATES:
                        self._templates.clear()
                    self._templates[key] = template
            if template is None:
                out.append(self.plain([fam]).decode())
                continue
            parts, tail = template
            for text, i in parts:
                out.append(text)
                out.append(format_value(samples[i].value))
            out.append(tail)
        return "".join(out).encode()

    def _make(self, fam: Metric) -> Template | None:
        probe = Metric(fam.name, fam.documentation, fam.type, fam.unit)
        probe.samples = [s._replace(value=_sentinel(i)) for i, s in enumerate(fam.samples)]
        text = self.plain([probe]).decode()
        found = []
        for i in range(len(fam.samples)):
            mark = floatToGoString(_sentinel(i))
            at = text.find(mark)
            if at < 0 or text.find(mark, at + 1) >= 0:
                return None
            found.append((at, len(mark), i))
        found.sort()
        parts, pos = [], 0
        for at, n, i in found:
            parts.append((text[pos:at], i))
            pos = at + n
        template: Template = (tuple(parts), text[pos:])
        # The template must give exactly the encoder's bytes for this family's real values.
        real = self.plain([fam])
        filled = "".join(t + floatToGoString(fam.samples[i].value) for t, i in template[0]) + template[1]
        return template if filled.encode() == real else None


def render_registry(registry: Any, key: str, templates: FamilyTemplates) -> bytes:
    """The whole exposition of `registry` in format `key`: its collectors in registration order, as
    `registry.collect()` walks them; a collector with `render_parts` (the scrape wrapper) returns ready
    bytes, reusing what did not change. Byte for byte what the encoder gives for the whole registry."""
    lock = getattr(registry, "_lock", None)
    if lock is None or not hasattr(registry, "_collector_to_names") or registry._target_info:
        return templates.encoder(registry)
    with lock:
        collectors = list(registry._collector_to_names)
    parts: list[bytes] = []
    for c in collectors:
        render_parts = getattr(c, "render_parts", None)
        if render_parts is not None:
            parts += render_parts(templates.encode, key)
        else:
            parts.append(templates.encode(c.collect()))
    if key.startswith(OPENMETRICS):
        parts.append(EOF)
    return b"".join(parts)

"""The scrape wrapper every collector runs under, and the Collector/Service interfaces.

Emits, for each collector (node_exporter's scrape wrapper is the model):
- `conntrack_dns_exporter_collector_duration_seconds{collector}` (gauge): time its last collect took;
- `conntrack_dns_exporter_collector_success{collector}` (gauge): 1 if it collected without error;
- `conntrack_dns_exporter_collector_errors_total{collector,reason}` (counter): failed collections by
  bounded reason (`permission`, `unavailable`, `timeout`, `parse`, `internal`, ...).
One failing collector never fails the scrape: what it yielded before failing is still served.

Rendering once per change (issue 16): a collector whose output only background work changes (probes,
table scans, Kubernetes watches) has a `version()` that changes whenever its `collect()` would yield
something else. `render_parts` then formats its families once per version and format and serves the
bytes; the others (the conntrack statistics, sampled per scrape) are collected and formatted every
time. The bytes are exactly what formatting the same families would give (`tests/unit/web`). A part is
also re-rendered once it is RENDER_MAX_AGE old: a dependency a future change forgets to put into a
`version()` then shows seconds late, never forever.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector as _PromCollector

from exporter.core import logs
from exporter.core.errors import ExporterError

PREFIX = "conntrack_dns_exporter"
RENDER_MAX_AGE = 10.0  # seconds


class Collector(Protocol):
    """A named source of metric families, called at scrape time (possibly concurrently)."""

    name: str

    def collect(self) -> Iterable[Metric]: ...


class Versioned(Protocol):
    """A collector that says when its output changes (`version()` is cheap and thread-safe)."""

    def version(self) -> Any: ...


Encode = Callable[[list[Metric]], bytes]


class Service(Protocol):
    """A background worker (probe scheduler, table scanner, Kubernetes watches)."""

    name: str

    def start(self) -> None: ...

    def stop(self, timeout: float) -> None: ...


class ScrapeWrapper(_PromCollector):
    """Runs every collector at scrape time, times it, and turns its failures into metrics and logs."""

    def __init__(self, collectors: Sequence[Collector]) -> None:
        self._collectors = list(collectors)
        self._errors: dict[tuple[str, str], int] = {}
        self._failing: dict[str, str] = {}
        self._lock = threading.Lock()
        self._log = logs.get("scrape")
        # (collector name, format) -> (version, rendered bytes, exception its collect() raised, when)
        self._rendered: dict[tuple[str, str], tuple[Any, bytes, BaseException | None, float]] = {}

    def describe(self) -> Iterable[Metric]:
        # Registration must never touch the kernel: describe nothing, so the registry does not call
        # collect() at register time.
        return []

    def collect(self) -> Iterator[Metric]:
        duration, success = _wrapper_families()
        for c in self._collectors:
            start = time.perf_counter()
            ok = True
            families: list[Metric] = []
            try:
                for fam in c.collect():
                    families.append(fam)
            except Exception as e:  # the collector boundary: nothing escapes into the HTTP response
                ok = False
                self._record_failure(c.name, e)
            else:
                self._record_success(c.name)
            duration.add_metric([c.name], time.perf_counter() - start)
            success.add_metric([c.name], 1.0 if ok else 0.0)
            yield from families
        yield duration
        yield success
        errors = CounterMetricFamily(
            f"{PREFIX}_collector_errors",
            "Failed collections, by collector and reason.",
            labels=["collector", "reason"],
        )
        with self._lock:
            for (name, reason), n in sorted(self._errors.items()):
                errors.add_metric([name, reason], n)
        yield errors

    def render_parts(self, encode: Encode, fmt: str) -> list[bytes]:
        """What `collect()` yields, formatted by `encode`, one part per collector plus the wrapper's own
        families; a `Versioned` collector's part is reused while its version stands."""
        duration, success = _wrapper_families()
        parts = []
        for c in self._collectors:
            start = time.perf_counter()
            version_of = getattr(c, "version", None)
            version = version_of() if version_of is not None else None
            cached = self._rendered.get((c.name, fmt)) if version_of is not None else None
            if cached is not None and cached[0] == version and start - cached[3] < RENDER_MAX_AGE:
                _, part, exc, _ = cached
            else:
                families: list[Metric] = []
                exc = None
                try:
                    for fam in c.collect():
                        families.append(fam)
                except Exception as e:  # the collector boundary, as in collect()
                    exc = e
                part = encode(families)
                if version_of is not None:
                    self._rendered[(c.name, fmt)] = (version, part, exc, start)
            if exc is not None:
                self._record_failure(c.name, exc)
            else:
                self._record_success(c.name)
            duration.add_metric([c.name], time.perf_counter() - start)
            success.add_metric([c.name], 0.0 if exc is not None else 1.0)
            parts.append(part)
        errors = CounterMetricFamily(
            f"{PREFIX}_collector_errors",
            "Failed collections, by collector and reason.",
            labels=["collector", "reason"],
        )
        with self._lock:
            for (name, reason), n in sorted(self._errors.items()):
                errors.add_metric([name, reason], n)
        parts.append(encode([duration, success, errors]))
        return parts

    def _record_failure(self, name: str, exc: BaseException) -> None:
        reason = exc.reason if isinstance(exc, ExporterError) else "internal"
        message = str(exc) if isinstance(exc, ExporterError) else f"{type(exc).__name__}: {exc}"
        with self._lock:
            self._errors[(name, reason)] = self._errors.get((name, reason), 0) + 1
            changed = self._failing.get(name) != message
            self._failing[name] = message
        level = logging.WARNING if changed else logging.DEBUG
        self._log.log(level, "collector failed: %s", message, extra={"kv": {"collector": name, "reason": reason}},
                      exc_info=not isinstance(exc, ExporterError))

    def _record_success(self, name: str) -> None:
        with self._lock:
            was_failing = self._failing.pop(name, None)
        if was_failing is not None:
            self._log.warning("collector recovered", extra={"kv": {"collector": name}})


def _wrapper_families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
    """The wrapper's per-collector duration and success families, empty."""
    duration = GaugeMetricFamily(f"{PREFIX}_collector_duration_seconds",
                                 "Time the collector's last collection took, in seconds.", labels=["collector"])
    success = GaugeMetricFamily(f"{PREFIX}_collector_success",
                                "1 if the collector's last collection succeeded, 0 if it failed.", labels=["collector"])
    return duration, success

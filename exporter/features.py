"""The data paths of the process, in start order (Kubernetes discovery before the probes and the table
scan that use its targets)."""

from __future__ import annotations

from exporter.conntrack.feature import FEATURE as CONNTRACK
from exporter.core.feature import Feature
from exporter.dns.feature import FEATURE as DNS
from exporter.dnsflows.feature import FEATURE as DNSFLOWS
from exporter.kubernetes.feature import FEATURE as KUBERNETES
from exporter.table.feature import FEATURE as TABLE


def all_features() -> list[Feature]:
    return [CONNTRACK, KUBERNETES, DNS, TABLE, DNSFLOWS]

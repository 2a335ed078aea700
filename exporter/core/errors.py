"""One error family for the whole exporter.

- `ExporterError`: a failure the code understands; its message is one line a user can act on, its
  `reason` a bounded label value (`permission`, `unavailable`, `timeout`, `parse`, ...).
- `CollectorError`: raised at scrape or scan time; the scrape wrapper turns it into
  `conntrack_dns_exporter_collector_errors_total{reason}` and one log line.
- `ConfigError`: raised while building features at start-up; the process exits 2 with the message.
"""

from __future__ import annotations


class ExporterError(Exception):
    """Base of the family: `reason` is a bounded label value, the message one line."""

    reason = "error"

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class CollectorError(ExporterError):
    """A collection (scrape, scan, netlink request) failed."""


class ConfigError(ExporterError):
    """Bad start-up input (a flag, a file): exit 2 with this one line."""

    reason = "config"

"""Recorded table dumps replayed instead of the kernel (`--collector.table.fixtures`, tests).

The format is `exporter.core.fixtures` (the `datagrams` part); `conntrack-dns-exporter record` writes it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from exporter.core import fixtures
from exporter.core.errors import CollectorError
from exporter.table.scan import DumpSocket, Scanner


class ReplaySocket:
    """Replays recorded dump datagrams as if they came from the kernel (fixtures, tests)."""

    def __init__(self, datagrams: list[bytes]) -> None:
        self._datagrams = datagrams
        self._next = 0

    def send(self, data: bytes, /) -> int:
        return len(data)

    def recv_into(self, buffer: bytearray, /) -> int:
        if self._next >= len(self._datagrams):
            return 0
        d = self._datagrams[self._next]
        self._next += 1
        n = min(len(d), len(buffer))
        buffer[:n] = d[:n]
        return n

    def close(self) -> None:
        pass


def load_fixture(path: str | Path) -> list[bytes]:
    """The dump datagrams of a table fixture (start-up: a bad file is FixtureError, exit 2)."""
    data = fixtures.load(path, "table fixture")
    if "datagrams" not in data:
        raise fixtures.FixtureError(f"table fixture {path} has no datagrams")
    return fixtures.hex_datagrams(data["datagrams"], f"table fixture {path}: datagrams")


def fixture_socket_factory(datagrams: list[bytes]) -> Callable[[], DumpSocket]:
    return lambda: ReplaySocket(datagrams)


def record() -> dict[str, Any]:
    """Dump this namespace's table once; the `datagrams`/`entries` part of a fixture."""
    raw: list[bytes] = []
    result = Scanner(record=raw, pace=0).scan()
    if result.partial:
        raise CollectorError(f"recording the table failed: {result.message}", result.reason)
    return {"entries": result.agg.entries, "datagrams": [d.hex() for d in raw]}

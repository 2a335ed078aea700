"""The one fixture format: raw netlink replies recorded from a real kernel, replayed instead of it.

A fixture is a JSON object:
- `description`, `kernel` (uname -r), `recorded_at` (UTC): where the bytes come from;
- `sysctl`: the netfilter sysctls at recording time ({name: integer});
- `samples`: conntrack statistics, one object per sample with the hex-encoded reply datagrams of
  `stats_cpu` (GET_STATS_CPU) and `stats` (GET_STATS) (replayed by `--collector.conntrack.fixtures`);
- `datagrams` (+ `entries`): one whole table dump, hex-encoded datagrams (`--collector.table.fixtures`).
A file may carry either part or both; `conntrack-dns-exporter record` writes both. Every loader checks
the shape it needs at start-up, so a bad file is one line and exit 2, never a traceback at scrape time.
"""

from __future__ import annotations

import binascii
import json
import platform
import time
from pathlib import Path
from typing import Any

from exporter.core import files
from exporter.core.errors import ConfigError

MAX_SIZE = 512 * files.MIB  # a full 262,144-entry table dump is about 110 MB of hex


class FixtureError(ConfigError):
    reason = "fixture"


def load(path: str | Path, what: str) -> dict[str, Any]:
    """The fixture at `path` as a dict; FixtureError (one line naming `what` and the path) otherwise."""
    try:
        raw, _ = files.read_regular(path, MAX_SIZE)
    except OSError as e:
        raise FixtureError(f"cannot read {what} {path}: {e.strerror}") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise FixtureError(f"{what} {path} is not UTF-8 text (want the JSON a recording writes)") from None
    except json.JSONDecodeError as e:
        raise FixtureError(f"{what} {path} is not valid JSON: {e}") from None
    except RecursionError:
        raise FixtureError(f"{what} {path} is nested too deeply") from None
    if not isinstance(data, dict):
        raise FixtureError(f"{what} {path}: want a JSON object, got {type(data).__name__}")
    return data


def hex_datagrams(value: Any, where: str) -> list[bytes]:
    """A list of hex strings -> bytes; FixtureError naming `where` for any other shape."""
    if not isinstance(value, list):
        raise FixtureError(f"{where}: want a list of hex strings, got {type(value).__name__}")
    out: list[bytes] = []
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise FixtureError(f"{where}[{i}]: want a hex string, got {type(item).__name__}")
        try:
            out.append(bytes.fromhex(item))
        except (ValueError, binascii.Error):
            raise FixtureError(f"{where}[{i}]: not hex") from None
    return out


def int_map(value: Any, where: str) -> dict[str, int]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise FixtureError(f"{where}: want an object of integers, got {type(value).__name__}")
    out: dict[str, int] = {}
    for k, v in value.items():
        if isinstance(v, bool) or not isinstance(v, int):
            raise FixtureError(f"{where}.{k}: want an integer, got {v!r:.40}")
        out[str(k)] = v
    return out


def header(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "kernel": platform.release(),
        "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n")

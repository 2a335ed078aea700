"""Golden exposition files (tests/golden/*.prom): compare, rewrite with UPDATE_GOLDEN=1, lint with promtool."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

GOLDEN = Path(__file__).resolve().parent.parent / "golden"


def check_golden(text: str, name: str) -> None:
    """Assert `text` equals tests/golden/<name> and passes `promtool check metrics` (skips the lint, with
    the reason, when promtool is not installed)."""
    golden = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text(), f"exposition differs from {golden} (UPDATE_GOLDEN=1 rewrites it)"
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (Debian package prometheus) not installed: golden compared, not linted")
    r = subprocess.run([promtool, "check", "metrics"], input=text, text=True, capture_output=True, timeout=30)
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr

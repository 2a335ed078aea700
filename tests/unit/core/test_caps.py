"""exporter/core/caps.py reads the calling thread's capability sets as the kernel reports them, and says
why NET_ADMIN is missing in words a person deploying the DaemonSet can act on. (Raising the capability from
the image's permitted-only file capability needs another uid and an exec: tests/integration/test_deploy_capabilities.py
and tests/integration/test_image.py run that for real.)"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from exporter.core import caps

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux capabilities")


def _status_bit(field: str) -> bool:
    for line in Path("/proc/thread-self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return bool(int(line.split()[1], 16) >> caps.CAP_NET_ADMIN & 1)
    raise AssertionError(field)


def test_state_is_what_the_kernel_reports_for_this_thread() -> None:
    s = caps.raise_net_admin()
    assert s is not None
    assert (s.effective, s.permitted, s.bounding, s.ambient) == (
        _status_bit("CapEff"), _status_bit("CapPrm"), _status_bit("CapBnd"), _status_bit("CapAmb"))
    assert caps.state() == s
    assert caps.net_admin_missing() is (not s.effective)


@pytest.mark.parametrize(("state", "words"), [
    (caps.State(effective=False, permitted=False, bounding=False, ambient=False), "not in the container's"),
    (caps.State(effective=False, permitted=False, bounding=True, ambient=False), "not permitted"),
    (caps.State(effective=True, permitted=True, bounding=True, ambient=False), ""),
])
def test_why_missing_names_the_cause(state: caps.State, words: str) -> None:
    assert words in state.why_missing()
    assert bool(state.why_missing()) is not state.effective

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.netns import Netns, skip_reason


@pytest.fixture
def netns() -> Iterator[Netns]:
    """A fresh network namespace (its own conntrack table), deleted afterwards."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    ns = Netns()
    try:
        yield ns
    finally:
        ns.delete()

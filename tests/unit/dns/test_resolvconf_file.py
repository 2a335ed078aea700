"""Issue 13 item 6: resolv.conf is read like a file that can be hostile, and only when it changed.

A user would notice: a FIFO at `--probe.resolv-conf` silently stopping every probe (the loop blocks in
`open()`), a 50 MB file re-read and re-parsed every round (89 MB RSS, 18% of a core), or a rewritten
file (kubelet, a ConfigMap update) whose new nameservers are never picked up.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from exporter.dns import resolvconf


def _load_in_thread(path: str, budget: float) -> BaseException | resolvconf.ResolvConf | None:
    out: list[BaseException | resolvconf.ResolvConf] = []

    def run() -> None:
        try:
            out.append(resolvconf.load(path))
        except BaseException as e:  # handed back to the test
            out.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(budget)
    return out[0] if out else None


def test_unchanged_file_is_not_read_again_and_a_change_is_picked_up(tmp_path: Path) -> None:
    f = tmp_path / "resolv.conf"
    f.write_text("nameserver 10.0.0.1\noptions ndots:5\n" + "# padding\n" * 20000)  # ~200 kB, like a bad mount
    before = resolvconf.reads
    for _ in range(50):
        assert resolvconf.load(str(f)).nameservers == ["10.0.0.1"]
    assert resolvconf.reads - before == 1, "re-read although nothing changed"
    f.write_text("nameserver 10.0.0.2\noptions ndots:5\n")  # a rewrite (different size, new mtime)
    assert resolvconf.load(str(f)).nameservers == ["10.0.0.2"]
    tmp = tmp_path / "new"
    tmp.write_text("nameserver 10.0.0.3\noptions ndots:5\n")  # same size, replaced by rename (kubelet)
    os.replace(tmp, f)
    assert resolvconf.load(str(f)).nameservers == ["10.0.0.3"]
    assert resolvconf.reads - before == 3


def test_a_caller_cannot_corrupt_the_cached_copy(tmp_path: Path) -> None:
    f = tmp_path / "resolv.conf"
    f.write_text("nameserver 10.0.0.1\nsearch a.example\n")
    resolvconf.load(str(f)).search.append("evil.example")
    assert resolvconf.load(str(f)).search == ["a.example"]


def test_fifo_is_refused_at_once_instead_of_blocking_the_probe_loop(tmp_path: Path) -> None:
    fifo = tmp_path / "resolv.conf"
    os.mkfifo(fifo)
    t0 = time.monotonic()
    r = _load_in_thread(str(fifo), 2.0)
    assert r is not None, "load() blocked on a FIFO"
    assert isinstance(r, OSError) and "FIFO" in (r.strerror or ""), r
    assert time.monotonic() - t0 < 1.0
    assert resolvconf.check(str(fifo)) == "is a FIFO, not a regular file"


@pytest.mark.parametrize("path", ["/dev/zero", "/dev/null"])
def test_devices_are_refused(path: str) -> None:
    r = _load_in_thread(path, 2.0)
    assert isinstance(r, OSError) and "character device" in (r.strerror or ""), r


def test_oversized_file_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "resolv.conf"
    f.write_bytes(b"nameserver 10.0.0.1\n" + b"#" * (resolvconf.MAX_SIZE + 1))
    with pytest.raises(OSError, match="too large"):
        resolvconf.load(str(f))


def test_file_replaced_by_a_fifo_after_a_good_read_is_refused_too(tmp_path: Path) -> None:
    f = tmp_path / "resolv.conf"
    f.write_text("nameserver 10.0.0.1\n")
    assert resolvconf.load(str(f)).nameservers == ["10.0.0.1"]
    f.unlink()
    os.mkfifo(f)
    r = _load_in_thread(str(f), 2.0)
    assert isinstance(r, OSError), r

"""Issue 13 item 5: signals. SIGHUP reloads the web config instead of killing the process (and leaving
the NOTRACK table behind); every signal whose default action would end the process shuts down cleanly
and removes the table.

The real process, in a fresh network namespace with the real `nft`. A user would notice a `kill -HUP`
(or a config-reloader sidecar) taking the exporter down, or a leftover NOTRACK table: the port stays
untracked after the exporter is gone, and the next exporter on another port leaves it behind for good.
"""

from __future__ import annotations

import base64
import ctypes
import json
import platform
import shutil
import signal
import time
from pathlib import Path

import bcrypt
import pytest

from tests.support.exporter_proc import Exporter
from tests.support.netns import Netns

TABLE = "conntrack_dns_exporter_notrack"


def _need_nft() -> None:
    if shutil.which("nft") is None:
        pytest.skip("needs nftables (`nft`) for --web.notrack")


def _table_present(ns: Netns) -> bool:
    return TABLE in ns.exec(["nft", "list", "ruleset"]).stdout


def _wait_log(e: Exporter, needle: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while needle not in e.stderr():
        assert e.proc.poll() is None, f"exporter exited: {e.stderr()}"
        assert time.monotonic() < deadline, f"{needle!r} not logged: {e.stderr()}"
        time.sleep(0.05)


@pytest.mark.netns
def test_sighup_keeps_serving_and_keeps_the_table_then_sigterm_removes_it(netns: Netns) -> None:
    _need_nft()
    e = Exporter(["--web.notrack"], netns=netns)
    try:
        e.wait_ready()
        assert _table_present(netns)
        e.proc.send_signal(signal.SIGHUP)
        _wait_log(e, "received SIGHUP")
        time.sleep(0.3)
        assert e.proc.poll() is None, f"SIGHUP ended the process: {e.stderr()}"
        assert e.get("/-/healthy")[0] == 200
        assert _table_present(netns)
        e.proc.send_signal(signal.SIGTERM)
        e.proc.wait(5)
        assert e.proc.returncode == 0
        assert not _table_present(netns), "NOTRACK table left behind"
    finally:
        e.stop()


@pytest.mark.netns
@pytest.mark.parametrize("sig", [signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM, signal.SIGPWR],
                         ids=lambda s: signal.Signals(s).name)
def test_every_terminating_signal_removes_the_table(netns: Netns, sig: int) -> None:
    _need_nft()
    e = Exporter(["--web.notrack"], netns=netns)
    try:
        e.wait_ready()
        assert _table_present(netns)
        t0 = time.monotonic()
        e.proc.send_signal(sig)
        e.proc.wait(5)
        assert time.monotonic() - t0 < 2.0
        assert e.proc.returncode == 0, e.stderr()
        assert not _table_present(netns), f"NOTRACK table left behind after {signal.Signals(sig).name}"
        assert f"received {signal.Signals(sig).name}, shutting down" in e.stderr()
    finally:
        e.stop()


def _auth(password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"prometheus:{password}".encode()).decode()}


def _write(path: Path, password: str) -> None:
    path.write_text(json.dumps({"basic_auth_users": {
        "prometheus": bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()}}))


def test_sighup_reloads_the_web_config_and_a_broken_one_keeps_the_previous(tmp_path: Path) -> None:
    cfg = tmp_path / "web.yml"
    _write(cfg, "old-secret")
    e = Exporter([f"--web.config.file={cfg}"])
    try:
        e.wait_ready()
        assert e.get("/metrics", _auth("old-secret"))[0] == 200
        _write(cfg, "new-secret")
        e.proc.send_signal(signal.SIGHUP)
        _wait_log(e, "reloaded (SIGHUP)")
        assert e.get("/metrics", _auth("old-secret"))[0] == 401
        assert e.get("/metrics", _auth("new-secret"))[0] == 200

        cfg.write_text("basic_auth_users:\n  prometheus: plaintext\n")
        e.proc.send_signal(signal.SIGHUP)
        _wait_log(e, "keeping the previous web config")
        assert e.get("/metrics", _auth("new-secret"))[0] == 200
        assert e.proc.poll() is None
        lines = [ln for ln in e.stderr().splitlines() if "keeping the previous web config" in ln]
        assert len(lines) == 1 and "not a bcrypt hash" in lines[0] and "Traceback" not in e.stderr()
    finally:
        e.stop()


def _signal_another_thread(pid: int, sig: int) -> None:
    """Send `sig` to one thread of the process other than the main one (tgkill; the kernel otherwise picks
    any thread that does not block it). Threads come and go (a scrape's connection thread): try each."""
    libc = ctypes.CDLL(None, use_errno=True)
    for task in sorted(Path(f"/proc/{pid}/task").iterdir()):
        if int(task.name) != pid and libc.syscall(234, pid, int(task.name), sig) == 0:  # SYS_tgkill (x86_64)
            return
    raise AssertionError("no thread but the main one to send the signal to")


def test_a_signal_landing_on_another_thread_than_the_main_one_is_acted_on_at_once(netns: Netns) -> None:
    """The main loop sleeps without a timeout until a signal comes (no idle wake-ups); Python runs signal
    handlers on the main thread only, so a SIGHUP or SIGTERM the kernel delivers to another thread (any
    thread may get it: `kill` addresses the process) must still wake it: reload at once, exit within 2 s."""
    if platform.machine() != "x86_64":
        pytest.skip("tgkill's syscall number is x86_64's")
    e = Exporter(["--collector.dnsflows"], netns=netns)
    try:
        e.wait_ready()
        _signal_another_thread(e.proc.pid, signal.SIGHUP)
        _wait_log(e, "no --web.config.file to reload", timeout=1.0)
        t0 = time.monotonic()
        _signal_another_thread(e.proc.pid, signal.SIGTERM)
        e.proc.wait(5)
        assert time.monotonic() - t0 < 2.0 and e.proc.returncode == 0, e.stderr()
    finally:
        e.stop()

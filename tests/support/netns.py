"""Network namespaces for tests: create, run commands in, open sockets in, delete.

Needs root (CAP_SYS_ADMIN + CAP_NET_ADMIN) and iproute2; `skip_reason()` says why a test cannot run.
Namespaces are named with a per-process prefix so parallel runs and the lab never collide, and
`cleanup_prefix()` removes leftovers of a crashed run.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_counter = itertools.count()
PREFIX = f"cdet{os.getpid() % 100000}"


def skip_reason() -> str | None:
    """Why namespace tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces (run make test as root)"
    if shutil.which("ip") is None:
        return "needs iproute2 (`ip`) to create network namespaces"
    if not Path("/proc/sys/net/netfilter/nf_conntrack_max").exists():
        return "needs the nf_conntrack kernel module (modprobe nf_conntrack)"
    return None


def run(cmd: Sequence[str], *, check: bool = True, timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), check=check, text=True, capture_output=True, timeout=timeout, **kw)


class Netns:
    """One network namespace with loopback up."""

    def __init__(self, name: str | None = None) -> None:
        self.name = name or f"{PREFIX}-{next(_counter)}"
        run(["ip", "netns", "add", self.name])
        self.exec(["ip", "link", "set", "lo", "up"])

    def cmd(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def exec(self, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        return run(self.cmd(argv), **kw)

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        return subprocess.Popen(self.cmd(argv), **kw)

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM, proto: int = 0) -> socket.socket:
        return socket_in(self.name, family, type, proto)

    def delete(self) -> None:
        run(["ip", "netns", "pids", self.name], check=False)
        pids = run(["ip", "netns", "pids", self.name], check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), 9)
        run(["ip", "netns", "del", self.name], check=False)

    def __enter__(self) -> Netns:
        return self

    def __exit__(self, *exc: object) -> None:
        self.delete()


def enter(name: str) -> None:
    """Move the calling thread (only it: setns is per thread) into namespace `name`."""
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)


def in_netns(name: str, fn: Any, *args: Any) -> Any:
    """Run fn(*args) on a fresh thread that has entered namespace `name`; return its result.

    Sockets created there stay in that namespace for their whole life, whichever thread uses them.
    """
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            enter(name)
            result["value"] = fn(*args)
        except BaseException as e:
            result["error"] = e

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def socket_in(name: str, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM, proto: int = 0) -> socket.socket:
    return in_netns(name, socket.socket, family, type, proto)


def cleanup_prefix(prefix: str) -> list[str]:
    """Delete every namespace whose name starts with prefix (leftovers of a killed run)."""
    gone = []
    for line in run(["ip", "netns", "list"], check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(prefix):
            Netns.delete(_named(name))
            gone.append(name)
    return gone


def _named(name: str) -> Netns:
    ns = Netns.__new__(Netns)
    ns.name = name
    return ns

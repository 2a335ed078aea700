"""CAP_NET_ADMIN from the image's permitted-only file capability, raised to effective at start.

The image gives its interpreter `cap_net_admin+p` (permitted, no effective bit). At exec the kernel puts
NET_ADMIN into the permitted set only if the container's bounding set holds it; with the effective bit the
kernel would instead refuse the exec outright when it does not (`exec ...: operation not permitted`), so a
pod whose NET_ADMIN was removed by policy could not even print `--version`. Without the effective bit the
process starts either way, and `raise_net_admin()`, called first thing in `cli.main` (before any thread
exists: capabilities are per thread and new threads inherit them), makes NET_ADMIN effective when it is
permitted. For a non-root process it also raises NET_ADMIN into the inheritable and ambient sets, so the
`nft` child of `--web.notrack` receives it without a file capability of its own (ambient capabilities pass
an exec of an ordinary binary, also under no_new_privs). Root needs neither step.

No NET_ADMIN at all is not an error here: collectors that need it report `collector_success 0` with one log
line, and `state()` says why (for `--web.notrack`, and for people reading the log).
"""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass

CAP_NET_ADMIN = 12
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_PR_CAPBSET_READ = 23
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_IS_SET = 1
_PR_CAP_AMBIENT_RAISE = 2


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


@dataclass(frozen=True)
class State:
    """NET_ADMIN in this thread's sets, after `raise_net_admin()`."""

    effective: bool
    permitted: bool
    bounding: bool
    ambient: bool

    def why_missing(self) -> str:
        if self.effective:
            return ""
        if not self.bounding:
            return "NET_ADMIN is not in the container's capability bounding set (securityContext.capabilities.add)"
        if not self.permitted:
            return ("NET_ADMIN is in the bounding set but not permitted (the interpreter lacks the image's file "
                    "capability, or the runtime cleared the permitted set)")
        return "NET_ADMIN is permitted but could not be made effective"


_state: State | None = None


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _capget(libc: ctypes.CDLL) -> tuple[_Header, ctypes.Array[_Data]]:
    hdr = _Header(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_Data * 2)()
    if libc.capget(ctypes.byref(hdr), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    return hdr, data


def _read(libc: ctypes.CDLL) -> State:
    _, data = _capget(libc)
    bit = 1 << CAP_NET_ADMIN
    return State(effective=bool(data[0].effective & bit), permitted=bool(data[0].permitted & bit),
                 bounding=libc.prctl(_PR_CAPBSET_READ, CAP_NET_ADMIN, 0, 0, 0) == 1,
                 ambient=libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_IS_SET, CAP_NET_ADMIN, 0, 0) == 1)


def raise_net_admin() -> State | None:
    """Make a permitted NET_ADMIN effective (and ambient for non-root); None where there are no Linux
    capabilities to read. Never raises: a failure leaves the sets as they were."""
    global _state
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = _libc()
        hdr, data = _capget(libc)
        bit = 1 << CAP_NET_ADMIN
        if data[0].permitted & bit:
            want_ambient = os.geteuid() != 0
            data[0].effective |= bit
            if want_ambient:
                data[0].inheritable |= bit
            hdr.version, hdr.pid = _LINUX_CAPABILITY_VERSION_3, 0
            if libc.capset(ctypes.byref(hdr), data) == 0 and want_ambient:
                libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE, CAP_NET_ADMIN, 0, 0)
        _state = _read(libc)
    except (OSError, AttributeError):
        _state = None
    return _state


def state() -> State | None:
    """The sets as `raise_net_admin()` left them (read now if it was not called)."""
    if _state is None and sys.platform.startswith("linux"):
        try:
            return _read(_libc())
        except (OSError, AttributeError):
            return None
    return _state


def net_admin_missing() -> bool:
    """True when this process certainly cannot use NET_ADMIN (False when unknown)."""
    s = state()
    return s is not None and not s.effective


def why_missing() -> str:
    s = state()
    return s.why_missing() if s is not None else "capabilities unknown"

"""resolv.conf as glibc reads it, and glibc's search-list walk (`res_search` in `res_query.c`).

The walk is what turns `api.example.com` into up to a dozen queries in a pod (ndots:5 and four search
domains): the probe replays it against the probed server and records how many queries it took.

`load()` is called every probe round but reads the file only when it changed (device, inode, size,
mtime, ctime), refuses what is not a regular file (a FIFO would block the probe loop) and anything over
`MAX_SIZE` (glibc's own parser gives up long before: it keeps three nameservers and six search domains).
"""

from __future__ import annotations

import copy
import errno
import ipaddress
import os
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from exporter.core import files

MAXNS = 3       # glibc uses at most three nameservers
MAXDNSRCH = 6   # ... and at most six search domains (older glibc; newer ones allow more)
MAX_SIZE = 256 * files.KIB  # kubelet writes a few hundred bytes


@dataclass
class ResolvConf:
    nameservers: list[str] = field(default_factory=list)
    search: list[str] = field(default_factory=list)
    ndots: int = 1
    timeout: float = 5.0
    attempts: int = 2
    single_request: bool = False
    single_request_reopen: bool = False
    use_vc: bool = False
    rotate: bool = False

    @property
    def mode(self) -> str:
        """The probe mode this file's options make glibc behave like."""
        if self.use_vc:
            return "tcp"
        if self.single_request or self.single_request_reopen:
            return "sequential"
        return "parallel"


def parse(text: str) -> ResolvConf:
    """Parse resolv.conf text. Unknown lines are ignored, as glibc does; the last search/domain wins."""
    rc = ResolvConf()
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].split(";", 1)[0].strip()
        if not line:
            continue
        words = line.split()
        key, args = words[0], words[1:]
        if key == "nameserver" and args and len(rc.nameservers) < MAXNS:
            addr = args[0].split("%", 1)[0]
            try:
                ipaddress.ip_address(addr)
            except ValueError:
                continue
            rc.nameservers.append(addr)
        elif key == "search":
            rc.search = args[:MAXDNSRCH]
        elif key == "domain" and args:
            rc.search = [args[0]]
        elif key == "options":
            for opt in args:
                name, _, value = opt.partition(":")
                try:
                    if name == "ndots":
                        rc.ndots = min(max(int(value), 0), 15)
                    elif name == "timeout":
                        rc.timeout = float(min(max(int(value), 1), 30))
                    elif name == "attempts":
                        rc.attempts = min(max(int(value), 1), 5)
                except ValueError:
                    continue
                if name == "single-request":
                    rc.single_request = True
                elif name == "single-request-reopen":
                    rc.single_request_reopen = True
                elif name == "use-vc":
                    rc.use_vc = True
                elif name == "rotate":
                    rc.rotate = True
    return rc


_cache: dict[str, tuple[tuple[int, ...], ResolvConf]] = {}
_cache_lock = threading.Lock()
reads = 0  # times a file was actually read and parsed (tests, debugging)


def check(path: str) -> str | None:
    """At start-up: why `path` cannot be used as resolv.conf (a FIFO, a device, a directory, over
    MAX_SIZE), else None (a missing file may appear later)."""
    why = files.not_regular(path)
    if why is None:
        try:
            size = os.stat(path).st_size
        except (OSError, ValueError):
            return None
        if size > MAX_SIZE:
            why = f"is too large ({size} bytes; at most {MAX_SIZE})"
    return why


def load(path: str) -> ResolvConf:
    """The parsed file; re-read only when it changed. OSError (one-line strerror) when unusable."""
    global reads
    try:
        with _cache_lock:
            cached = _cache.get(path)
        if cached is not None:
            try:
                if files.stamp(_stat(path)) == cached[0]:
                    return copy.deepcopy(cached[1])
            except OSError:
                pass  # gone or unreadable now: read_regular below says why
        raw, st = files.read_regular(path, MAX_SIZE)
    except OSError:
        with _cache_lock:
            _cache.pop(path, None)
        raise
    conf = parse(raw.decode("utf-8", errors="replace"))
    with _cache_lock:
        _cache[path] = (files.stamp(st), conf)
        reads += 1
    return copy.deepcopy(conf)


def _stat(path: str) -> os.stat_result:
    try:
        return os.stat(path)
    except ValueError:
        raise OSError(errno.EINVAL, "invalid path") from None


# What one name (A+AAAA pair) came back as: ok, nodata, nxdomain, servfail or error (see ProbeResult.status).
Ask = Callable[[str], Awaitable[str]]


@dataclass
class Walk:
    names: list[str] = field(default_factory=list)   # every name queried, in order
    found: str | None = None                          # the name that answered, if any


def _join(name: str, domain: str) -> str:
    domain = domain.strip(".")
    return f"{name}.{domain}." if domain else f"{name}."


async def search(name: str, conf: ResolvConf, ask: Ask) -> Walk:
    """Walk the search list for `name` the way glibc's res_search does, calling `ask` for each candidate.

    - a trailing dot: the name as is, nothing else;
    - at least `ndots` dots: the name as is first;
    - then each search domain in turn; NXDOMAIN, NODATA and SERVFAIL move on to the next domain,
      success ends the walk, any other error (timeout, REFUSED) ends the search-list part;
    - finally the name as is, if not tried yet and the search list did not contain the root.
    """
    walk = Walk()

    async def try_(candidate: str) -> str:
        walk.names.append(candidate)
        status = await ask(candidate)
        if status == "ok":
            walk.found = candidate
        return status

    trailing = name.endswith(".")
    bare = name.rstrip(".")
    dots = bare.count(".")
    tried_as_is = False
    if dots >= conf.ndots or trailing:
        status = await try_(bare + ".")
        if status == "ok" or trailing:
            return walk
        tried_as_is = True
    root_on_list = False
    for domain in conf.search:
        if not domain.strip("."):
            root_on_list = True
        status = await try_(_join(bare, domain))
        if status == "ok":
            return walk
        if status not in ("nxdomain", "nodata", "servfail"):
            break  # glibc stops searching but still falls through to the as-is query below
    if not (tried_as_is or root_on_list):
        await try_(bare + ".")
    return walk

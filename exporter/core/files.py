"""Reading the files a user points the exporter at (web config, resolv.conf, fixtures) safely.

A path can name something other than a file: a FIFO blocks `open()` until a writer appears (the start
hangs with no output; a probe loop stops), `/dev/zero` never ends (gigabytes in seconds), a directory
fails late. So every such file is opened non-blocking, must be a regular file, and is read up to a cap
that no real file of its kind reaches. Errors are `OSError`s with a one-line `strerror`, so callers that
already report `e.strerror` need no change.
"""

from __future__ import annotations

import errno
import os
import stat

KIB = 1024
MIB = 1024 * KIB


def _not_regular(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return f"is {name}, not a regular file"
    return "not a regular file"


def not_regular(path: str | os.PathLike[str]) -> str | None:
    """Why `path` cannot be read as a file (`None` if it is a regular file or does not exist yet)."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    return None if stat.S_ISREG(mode) else _not_regular(mode)


def read_regular(path: str | os.PathLike[str], limit: int) -> tuple[bytes, os.stat_result]:
    """The whole content of the regular file `path` (at most `limit` bytes) and its stat.

    Raises OSError with a one-line strerror: missing, unreadable, not a regular file, too large.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
    except ValueError:  # an embedded NUL byte
        raise OSError(errno.EINVAL, "invalid path (NUL byte)") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, _not_regular(st.st_mode))
        if st.st_size > limit:
            raise OSError(errno.EFBIG, f"too large ({st.st_size} bytes; at most {limit})")
        chunks: list[bytes] = []
        total = 0
        while True:  # read to EOF, but never past the cap (a file that grows while being read)
            chunk = os.read(fd, min(MIB, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise OSError(errno.EFBIG, f"too large (over {limit} bytes)")
        return b"".join(chunks), st
    finally:
        os.close(fd)


def stamp(st: os.stat_result) -> tuple[int, ...]:
    """What changes when a file is replaced or rewritten (for re-reading only on change)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

"""The parallel A/AAAA conntrack race, as glibc and musl cause it.

A resolver sends the A and the AAAA query for one name from the same UDP socket (same 5-tuple) at the same
moment. When the two packets are processed on two CPUs, both create an unconfirmed conntrack entry for the
same tuple and both pass the DNAT (possibly to different backends); only one can be inserted. Kernels from
5.0/5.6 on resolve most such clashes (counter clash_resolve), older ones drop the loser (insert_failed) and
the application waits for its 5 s timeout.

`tests/lab/racer.c` (built with gcc on first use, cached per source) runs in the pod namespace: two threads
pinned to two CPUs spin on a shared counter and send the A and AAAA query for one name from one fresh
socket per pair (a fresh source port, so every pair is a new flow); the first collects both answers. An
earlier Python version met at a `threading.Barrier`: the GIL hand-off and a sleeping vCPU's wake-up put
tens of microseconds between the two sends, and on some runs no clash came in 60,000 pairs.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

SOURCE = Path(__file__).with_name("racer.c")


@dataclass
class RaceResult:
    pairs: int = 0
    answers: int = 0
    lost: int = 0  # queries of a pair that got no answer within the timeout (the 5 s wait in real life)


def build() -> str:
    digest = hashlib.sha1(SOURCE.read_bytes()).hexdigest()[:12]
    out_dir = Path(os.environ.get("XDG_CACHE_HOME", "/tmp")) / f"cde-racer-{os.getuid()}"
    out_dir.mkdir(parents=True, exist_ok=True)
    exe = out_dir / f"racer-{digest}"
    if not exe.exists():
        tmp = out_dir / f"racer-{digest}.{os.getpid()}.tmp"
        subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-pthread", "-o", str(tmp), str(SOURCE)],
                       check=True, capture_output=True, text=True)
        tmp.rename(exe)
    return str(exe)


class Race:
    """Runs pairs until `pairs` are sent, `seconds` pass, or stop() is called (whichever comes first)."""

    def __init__(self, pod_ns: str, server: str, name: str, *, pairs: int | None = None,
                 seconds: float | None = None, timeout: float = 0.5, port: int = 53) -> None:
        self.pod_ns, self.server, self.port, self.timeout = pod_ns, server, port, timeout
        self.name = name.rstrip(".")
        self.limit_pairs, self.limit_seconds = pairs, seconds
        self.result = RaceResult()
        self.error: BaseException | None = None
        cpus = sorted(os.sched_getaffinity(0))
        self._cpus = (cpus[0], cpus[-1])
        self._proc: subprocess.Popen[str] | None = None

    def start(self) -> Race:
        argv = ["ip", "netns", "exec", self.pod_ns, build(), self.server, str(self.port), self.name,
                str(self.limit_pairs or 0), str(self.limit_seconds or 0), str(int(self.timeout * 1000)),
                str(self._cpus[0]), str(self._cpus[1])]
        self._proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return self

    def wait(self, timeout: float | None = None) -> RaceResult:
        p = self._proc
        if p is None:
            return self.result
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            return self.result
        self._finish(p.returncode, out, err)
        return self.result

    def stop(self) -> RaceResult:
        p = self._proc
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGTERM)
        return self.wait(5)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _finish(self, rc: int, out: str, err: str) -> None:
        if self._proc is None:
            return
        self._proc = None
        fields = out.split()
        if rc != 0 or len(fields) != 3 or not all(f.isdigit() for f in fields):
            self.error = RuntimeError(f"racer exited {rc}: {err.strip() or out.strip()}")
            return
        self.result = RaceResult(*(int(f) for f in fields))

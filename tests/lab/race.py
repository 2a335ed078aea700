"""The parallel A/AAAA conntrack race, as glibc and musl cause it.

A resolver sends the A and the AAAA query for one name from the same UDP socket (same 5-tuple) at the same
moment. When the two packets are processed on two CPUs, both create an unconfirmed conntrack entry for the
same tuple and both pass the DNAT (possibly to different backends); only one can be inserted. Kernels from
5.0/5.6 on resolve most such clashes (counter clash_resolve), older ones drop the loser (insert_failed) and
the application waits for its 5 s timeout.

Here two threads, each pinned to its own CPU and living in the pod namespace, send the A and AAAA query for
one name from one fresh socket per pair (a fresh source port, so every pair is a new flow) after meeting at
a barrier; the first thread then collects both answers.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass

import dns.message

from tests.support.netns import enter


@dataclass
class RaceResult:
    pairs: int = 0
    answers: int = 0
    lost: int = 0  # queries of a pair that got no answer within the timeout (the 5 s wait in real life)


class Race:
    """Runs pairs until `pairs` are sent, `seconds` pass, or stop() is called (whichever comes first)."""

    def __init__(self, pod_ns: str, server: str, name: str, *, pairs: int | None = None,
                 seconds: float | None = None, timeout: float = 0.5, port: int = 53) -> None:
        self.pod_ns, self.server, self.port, self.timeout = pod_ns, server, port, timeout
        self.limit_pairs, self.limit_seconds = pairs, seconds
        self.result = RaceResult()
        self._stop = threading.Event()
        self._barrier = threading.Barrier(2)
        self._sock: socket.socket | None = None
        self._qa = dns.message.make_query(name, "A")
        self._qaaaa = dns.message.make_query(name, "AAAA")
        self._threads: list[threading.Thread] = []
        self.error: BaseException | None = None
        cpus = sorted(os.sched_getaffinity(0))
        self._cpus = (cpus[0], cpus[-1])

    def start(self) -> Race:
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True, name=f"race-{i}")
                         for i in (0, 1)]
        for t in self._threads:
            t.start()
        return self

    def wait(self, timeout: float | None = None) -> RaceResult:
        for t in self._threads:
            t.join(timeout)
        return self.result

    def stop(self) -> RaceResult:
        self._stop.set()
        self._barrier.abort()
        return self.wait(5)

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def _done(self, started: float) -> bool:
        if self._stop.is_set():
            return True
        if self.limit_pairs is not None and self.result.pairs >= self.limit_pairs:
            return True
        return self.limit_seconds is not None and time.monotonic() - started >= self.limit_seconds

    def _run(self, me: int) -> None:
        try:
            enter(self.pod_ns)
            os.sched_setaffinity(0, {self._cpus[me]})
            started = time.monotonic()
            while True:
                if me == 0:
                    stop = self._done(started)
                    if not stop:
                        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                        s.connect((self.server, self.port))
                        s.settimeout(self.timeout)
                        self._sock = s
                    else:
                        self._sock = None
                self._barrier.wait()  # the socket is ready (or None: stop)
                sock = self._sock
                if sock is None:
                    return
                q = self._qa if me == 0 else self._qaaaa
                q.id = (q.id + 1) & 0xFFFF
                sock.send(q.to_wire())
                self._barrier.wait()  # both sent
                if me == 0:
                    self._collect(sock)
        except threading.BrokenBarrierError:
            return
        except BaseException as e:
            self.error = e
            self._stop.set()
            self._barrier.abort()

    def _collect(self, sock: socket.socket) -> None:
        got = 0
        deadline = time.monotonic() + self.timeout
        while got < 2:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            sock.settimeout(left)
            try:
                sock.recv(4096)
            except (TimeoutError, ConnectionRefusedError):
                break
            got += 1
        sock.close()
        self.result.pairs += 1
        self.result.answers += got
        self.result.lost += 2 - got

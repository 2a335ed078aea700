"""The local ports of the exporter's own DNS probe sockets, so that passive flow accounting
(`exporter.dnsflows`) can tell the exporter's synthetic lookups from real clients' DNS.

The probes register a socket's (protocol, local port) after binding it and before sending anything, so
the registration always precedes the conntrack NEW event its first packet causes. An entry is kept for
`linger` seconds (long enough for the event listener to see that NEW event, even when it lags); the
listener then remembers the conntrack id of the flow until its DESTROY event.
"""

from __future__ import annotations

import threading
import time

LINGER = 30.0


class OwnPorts:
    def __init__(self, linger: float = LINGER) -> None:
        self._lock = threading.Lock()
        self._ports: dict[tuple[int, int], float] = {}
        self._linger = linger

    def register(self, proto: int, port: int) -> None:
        now = time.monotonic()
        with self._lock:
            if len(self._ports) > 256:  # expire lazily; the probes open a few sockets per round
                self._ports = {k: t for k, t in self._ports.items() if t > now}
            self._ports[(proto, port)] = now + self._linger

    def table(self) -> dict[tuple[int, int], float]:
        """The registrations now ((protocol, port) -> monotonic time they end), for a caller that checks
        many flows at once: read it after the flows' events were received (a registration precedes them),
        and only read it (`register` replaces it whole when it expires entries)."""
        return self._ports

    def __contains__(self, key: tuple[int, int]) -> bool:
        # Called for every DNS event: one dict read, no lock (a dict read is atomic, and `register`
        # replaces the dict whole when it expires entries).
        until = self._ports.get(key)
        return until is not None and until > time.monotonic()

"""Issue 13 item 1: which connection gives up its slot when all are taken (no sockets, no process).

A user would notice kubelet's probes refused during a slowloris attack (the old rule closed every new
connection) or Prometheus's keep-alive connection closed before the attacker's.
"""

from __future__ import annotations

import socket

from exporter.web import slots


def _conn(state: str, since: float, requests: int = 0) -> slots.Conn:
    c = slots.Conn(socket.socket(), read_timeout=10)
    c.sock.close()
    c.state, c.since, c.requests = state, since, requests
    return c


def test_oldest_never_completed_reader_goes_first() -> None:
    prometheus = _conn(slots.IDLE, since=1.0, requests=40)       # idle the longest, but a known scraper
    trickler_old = _conn(slots.READING, since=5.0)
    trickler_new = _conn(slots.READING, since=9.0)
    writing = _conn(slots.BUSY, since=0.0)
    assert slots.victim([prometheus, trickler_new, writing, trickler_old]) is trickler_old


def test_then_one_request_connections_then_proven_keepalive_ones_longest_idle_first() -> None:
    prometheus = _conn(slots.IDLE, since=5.0, requests=7)      # idle longer than the hog, but reused 7 times
    hog = _conn(slots.IDLE, since=90.0, requests=1)            # one request, then silent
    reading_next = _conn(slots.READING, since=99.0, requests=7)  # a keep-alive client sending its next request
    assert slots.victim([prometheus, reading_next, hog]) is hog
    assert slots.victim([prometheus, reading_next]) is prometheus


def test_connections_writing_a_response_or_already_evicted_are_never_chosen() -> None:
    busy = [_conn(slots.BUSY, since=float(i)) for i in range(4)]
    gone = _conn(slots.READING, since=0.0)
    gone.evicted = True
    assert slots.victim([*busy, gone]) is None


def test_a_new_connection_is_reading_with_a_deadline_of_the_read_timeout() -> None:
    c = slots.Conn(socket.socket(), read_timeout=2.0)
    c.sock.close()
    assert c.state == slots.READING and c.deadline is not None and c.deadline - c.since == 2.0
    c.request_parsed()
    assert c.state == slots.BUSY and c.deadline is None
    c.response_sent()
    assert c.state == slots.IDLE and c.requests == 1

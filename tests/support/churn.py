"""Flow churn for the dnsflows tests and benchmark: many short non-DNS flows plus some DNS flows.

    python -m tests.support.churn SECONDS OTHER_PER_S DNS_PER_S [DNS_SERVER]    (inside a namespace)

Non-DNS: UDP datagrams from one socket to ever new (127.a.b.c, port) destinations (each a new conntrack
entry), and every tenth a TCP connection attempt to a closed port (a SYN and its RST: an entry too). DNS:
a query from a fresh socket to DNS_SERVER (default: a different 127.53.x.y for each, where nothing
answers) port 53, UDP, every tenth TCP. Paced in 10 ms slices; prints a JSON line with what was sent.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import time

QUERY = bytes.fromhex("123401000001000000000000") + b"\x03web\x07default\x00\x00\x01\x00\x01"


def churn(seconds: float, other_rate: int, dns_rate: int, dns_server: str | None = None) -> dict[str, float]:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.setblocking(False)
    sent = {"other_udp": 0, "other_tcp": 0, "dns_udp": 0, "dns_tcp": 0}
    start = time.monotonic()
    k = 0
    slice_s = 0.01
    due_other = due_dns = 0.0
    while (now := time.monotonic()) - start < seconds:
        due_other += other_rate * slice_s
        due_dns += dns_rate * slice_s
        while due_other >= 1:
            due_other -= 1
            k += 1
            if k % 10 == 0:
                t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                t.setblocking(False)
                with contextlib.suppress(OSError):
                    t.connect_ex((f"127.1.{(k >> 8) & 255}.{k & 255}", 9))
                t.close()
                sent["other_tcp"] += 1
            else:
                with contextlib.suppress(OSError):
                    udp.sendto(b"x", (f"127.2.{(k >> 16) & 255}.{(k >> 8) & 255}", 1024 + (k & 255)))
                sent["other_udp"] += 1
        while due_dns >= 1:
            due_dns -= 1
            k += 1
            # each DNS flow to its own address, so that a reused source port never meets an entry of the same
            # tuple that is still there (that would be no new flow, and no NEW event)
            server = dns_server or f"127.53.{(k >> 8) & 255}.{k & 255}"
            if k % 10 == 0:
                t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                t.setblocking(False)
                with contextlib.suppress(OSError):
                    t.connect_ex((server, 53))
                t.close()
                sent["dns_tcp"] += 1
            else:
                d = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                with contextlib.suppress(OSError):
                    d.sendto(QUERY, (server, 53))
                d.close()
                sent["dns_udp"] += 1
        left = start + (now - start) + slice_s - time.monotonic()
        if left > 0:
            time.sleep(left)
    out: dict[str, float] = dict(sent)
    out["seconds"] = time.monotonic() - start
    return out


if __name__ == "__main__":
    args = sys.argv[1:]
    print(json.dumps(churn(float(args[0]), int(args[1]), int(args[2]), *(args[3:4] or []))), flush=True)

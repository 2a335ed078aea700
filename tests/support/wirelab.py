"""A two-namespace lab for comparing the resolver models with the real C libraries on the wire.

    client ns (the "pod": the C lookup program and the model run here, packets captured here)
        10.77.0.1 --veth-- 10.77.0.2  server ns (tests/support/dnsserver.py on port 53)

The client namespace has its own /etc/netns/<ns>/resolv.conf (bind-mounted over /etc/resolv.conf by
`ip netns exec`, so glibc and musl read it); `loss(pct)` installs the lab's own `loss` nftables rule
(tests/lab/configs.py) in the server namespace (where the queries arrive, so they vanish silently).
A raw AF_PACKET socket on the client's veth records every DNS packet (both directions, UDP and TCP)
with its time, source port, id and query type, so a library's lookup and the model's can be told apart
by the name they ask.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.message
import dns.rdatatype

from exporter.dns import resolvconf
from exporter.dns.models import GlibcState, Lookup, ResolverOptions, run
from tests.lab import configs
from tests.support import clookup
from tests.support.dnsserver import Behaviour, DnsServer
from tests.support.netns import Netns, in_netns

CLIENT_IP, SERVER_IP = "10.77.0.1", "10.77.0.2"
ETH_P_ALL = 0x0003


@dataclass
class Packet:
    at: float
    out: bool        # client -> server
    transport: str   # udp or tcp
    port: int        # the client's port
    id: int
    qtype: str
    name: str


def options_of(conf: resolvconf.ResolvConf) -> ResolverOptions:
    return ResolverOptions(timeout=conf.timeout, attempts=conf.attempts, single_request=conf.single_request,
                           single_request_reopen=conf.single_request_reopen, use_vc=conf.use_vc)


class Capture:
    def __init__(self, ns: str, ifname: str) -> None:
        self.sock = in_netns(ns, socket.socket, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.bind((ifname, 0))
        self.sock.settimeout(0.2)
        self.packets: list[Packet] = []
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                frame = self.sock.recv(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            self.packets.extend(_decode(frame, time.monotonic()))

    def close(self) -> None:
        self._stop = True
        self._t.join(2)
        self.sock.close()

    def flow(self, name: str) -> list[Packet]:
        return [p for p in self.packets if p.name == name.rstrip(".").lower()]


def _decode(frame: bytes, at: float) -> list[Packet]:
    if len(frame) < 34 or frame[12:14] != b"\x08\x00":
        return []
    ip = frame[14:]
    ihl = (ip[0] & 15) * 4
    proto = ip[9]
    src, dst = socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20])
    l4 = ip[ihl:]
    if len(l4) < 8:
        return []
    sport, dport = struct.unpack_from("!HH", l4)
    if 53 not in (sport, dport):
        return []
    out = dst == SERVER_IP and src == CLIENT_IP
    port = sport if out else dport
    if proto == 17:
        payloads, transport = [l4[8:]], "udp"
    elif proto == 6:
        off = (l4[12] >> 4) * 4
        data, payloads, transport = l4[off:], [], "tcp"
        while len(data) >= 2:
            (n,) = struct.unpack_from("!H", data)
            payloads.append(data[2:2 + n])
            data = data[2 + n:]
    else:
        return []
    out_packets = []
    for p in payloads:
        try:
            m = dns.message.from_wire(p, question_only=True)
        except Exception:
            continue
        if not m.question:
            continue
        q = m.question[0]
        out_packets.append(Packet(at, out, transport, port, m.id, dns.rdatatype.to_text(q.rdtype),
                                  q.name.to_text(omit_final_dot=True).lower()))
    return out_packets


def shape(packets: list[Packet], start: float) -> list[tuple[float, str, int, int, str]]:
    """Queries sent, as (seconds since start, transport, socket ordinal, id ordinal, qtype)."""
    ports: dict[tuple[str, int], int] = {}
    ids: dict[int, int] = {}
    out = []
    for p in packets:
        if not p.out:
            continue
        sock = ports.setdefault((p.transport, p.port), len(ports))
        ident = ids.setdefault(p.id, len(ids))
        out.append((p.at - start, p.transport, sock, ident, p.qtype))
    return out


class WireLab:
    def __init__(self, behaviour: Behaviour | None = None, resolv_options: str = "") -> None:
        self.client = Netns()
        self.server_ns = Netns()
        self.capture: Capture | None = None
        self.server: DnsServer | None = None
        try:
            cif, sif = f"c{self.client.name[-10:]}", f"s{self.client.name[-10:]}"
            subprocess.run(["ip", "link", "add", cif, "netns", self.client.name, "type", "veth", "peer", "name", sif,
                            "netns", self.server_ns.name], check=True, capture_output=True)
            self.client.exec(["ip", "addr", "add", f"{CLIENT_IP}/24", "dev", cif])
            self.client.exec(["ip", "link", "set", cif, "up"])
            self.server_ns.exec(["ip", "addr", "add", f"{SERVER_IP}/24", "dev", sif])
            self.server_ns.exec(["ip", "link", "set", sif, "up"])
            self.ifname = cif
            self.etc = Path("/etc/netns") / self.client.name
            self.etc.mkdir(parents=True, exist_ok=True)
            self.set_options(resolv_options)
            self.server = in_netns(self.server_ns.name, DnsServer, behaviour or Behaviour(), SERVER_IP, 53).start()
            self.exes = clookup.build()
        except BaseException:
            self.close()
            raise

    def set_options(self, options: str) -> None:
        text = f"nameserver {SERVER_IP}\n" + (f"options {options}\n" if options else "")
        (self.etc / "resolv.conf").write_text(text)
        self.conf = resolvconf.parse(text)

    @property
    def options(self) -> ResolverOptions:
        return options_of(self.conf)

    def start_capture(self) -> Capture:
        self.capture = Capture(self.client.name, self.ifname)
        time.sleep(0.05)
        return self.capture

    def loss(self, percent: int) -> None:
        # in the server's namespace: queries vanish on the way, as in the lab (forwarded through the node).
        # In the client's own output hook a drop would fail the send with EPERM instead.
        self.server_ns.exec(["nft", "-f", "-"], input=configs.loss_ruleset(percent))

    def library(self, lib: str, name: str, timeout: float | None = None) -> clookup.Result | None:
        """One getaddrinfo by the real library; None if it was still waiting after `timeout` seconds."""
        try:
            p = self.client.exec([self.exes[lib], name], timeout=timeout or 300)
        except subprocess.TimeoutExpired:
            return None
        return clookup.parse(p.stdout.strip().splitlines()[-1])

    def model(self, resolver: str, name: str, options: ResolverOptions | None = None,
              state: GlibcState | None = None) -> Lookup:
        opts = options or self.options
        return in_netns(self.client.name, lambda: asyncio.run(run(resolver, [(SERVER_IP, 53)], name, opts, state)))

    def close(self) -> None:
        if self.capture is not None:
            self.capture.close()
        if self.server is not None:
            self.server.close()
        with contextlib.suppress(Exception):
            (self.etc / "resolv.conf").unlink()
            self.etc.rmdir()
        self.client.delete()
        self.server_ns.delete()

    def __enter__(self) -> WireLab:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

"""Real DNS queries sent from inside a lab namespace (dnspython over a socket living in that namespace).

Used by the lab itself (readiness checks, the demo's client load) and by tests measuring a fault's symptom
from the pod's point of view.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype

from tests.support.netns import socket_in


@dataclass(frozen=True)
class Answer:
    """Outcome of one query: rcode text ("NOERROR", "NXDOMAIN", ...) or an error ("timeout", "refused")."""

    outcome: str
    seconds: float
    addresses: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.outcome == "NOERROR"


def query(ns: str, server: str, name: str, qtype: str = "A", *, timeout: float = 1.0, tcp: bool = False,
          port: int = 53) -> Answer:
    """Ask `server` for `name` from a socket in namespace `ns`; never raises for DNS-level failures."""
    q = dns.message.make_query(name, qtype)
    family_type = socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM
    sock = socket_in(ns, socket.AF_INET, family_type)
    start = time.monotonic()
    try:
        sock.settimeout(timeout)
        if tcp:
            sock.connect((server, port))
            r = dns.query.tcp(q, server, timeout=timeout, port=port, sock=sock)
        else:
            r = dns.query.udp(q, server, timeout=timeout, port=port, sock=sock)
    except (dns.exception.Timeout, TimeoutError):
        return Answer("timeout", time.monotonic() - start)
    except ConnectionRefusedError:
        return Answer("refused", time.monotonic() - start)
    except (OSError, EOFError, dns.exception.DNSException) as e:
        return Answer(f"error:{type(e).__name__}", time.monotonic() - start)
    finally:
        sock.close()
    elapsed = time.monotonic() - start
    addrs = tuple(sorted(str(rd) for rrset in r.answer for rd in rrset
                         if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA)))
    return Answer(dns.rcode.to_text(r.rcode()), elapsed, addrs)


def success_ratio(ns: str, server: str, name: str, n: int, *, timeout: float = 0.5, qtype: str = "A") -> float:
    """Fraction of `n` fresh-socket queries that got NOERROR (each from a new source port, so a new flow)."""
    ok = sum(query(ns, server, name, qtype, timeout=timeout).ok for _ in range(n))
    return ok / n

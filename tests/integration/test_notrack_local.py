"""`--web.notrack` for a scraper on the node itself (issue 18): with the namespace's conntrack table
100% full (real kernel entries, tests.support.ctfill), a new TCP connection from inside the same
namespace to the exporter's port, over 127.0.0.1 and over the node's own address, still connects with
the exporter's real nftables table installed (exporter.web.notrack, run in that namespace), and does not
without it, so the test fails on the old ruleset (which had no `output ... dport` rule).
"""

from __future__ import annotations

import socket

import pytest

from exporter.web.notrack import Notrack
from tests.support import ctfill
from tests.support.netns import Netns, in_netns, skip_reason

pytestmark = [pytest.mark.netns]

PORT = 19166
NODE_IP = "10.89.0.1"


def _connects(ns: str, host: str) -> bool:
    def attempt() -> bool:
        s = socket.socket()
        s.settimeout(1.5)
        try:
            s.connect((host, PORT))
            return True
        except OSError:
            return False
        finally:
            s.close()

    return bool(in_netns(ns, attempt))


def test_local_scrape_connects_with_a_full_table() -> None:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    with Netns() as ns:
        ns.exec(["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth1"])  # the node's NIC
        ns.exec(["ip", "addr", "add", f"{NODE_IP}/24", "dev", "eth0"])
        ns.exec(["ip", "link", "set", "eth0", "up"])
        # a node's firewall/kube-proxy rules use conntrack; without one the kernel does not track this netns
        ns.exec(["nft", "-f", "-"], input="table inet node {\n chain input {\n  type filter hook input priority 0; "
                                          "policy accept;\n  ct state invalid counter\n }\n}\n")
        listener = in_netns(ns.name, socket.create_server, ("0.0.0.0", PORT))
        try:
            limit = int(open("/proc/sys/net/netfilter/nf_conntrack_max").read())
            ctfill.fill_to(ns.name, limit)
            assert ctfill.count(ns.name) >= limit
            # full table, no exemption: the node-local scraper cannot connect
            assert not _connects(ns.name, "127.0.0.1")
            notrack = Notrack(PORT)
            in_netns(ns.name, notrack.install)
            ctfill.fill_to(ns.name, limit)  # the failed attempt's entries may have freed slots
            assert _connects(ns.name, "127.0.0.1")
            assert _connects(ns.name, NODE_IP)
            in_netns(ns.name, notrack.remove)
        finally:
            listener.close()
            ctfill.drain(ns.name)

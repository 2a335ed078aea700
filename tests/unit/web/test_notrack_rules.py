"""The NOTRACK ruleset `--web.notrack` installs, with the exporter's own API flows (issue 13 item 11):
checked by nft itself (`nft -c`, no change to any ruleset) and for what it must and must not exempt."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from exporter.core.feature import ExemptFlow
from exporter.web.notrack import ruleset


def test_flows_are_exempted_both_ways_and_only_from_the_exporters_ports() -> None:
    text = ruleset(19153, [ExemptFlow("192.168.0.2", 6443, range(19154, 19170)),
                           ExemptFlow("fd00::2", 443, range(19154, 19170))])
    for chain in ("prerouting", "output"):
        body = text.split(f"chain {chain}")[1].split("}")[0]
        assert "ip daddr 192.168.0.2 tcp dport 6443 tcp sport 19154-19169 notrack" in body
        assert "ip saddr 192.168.0.2 tcp sport 6443 tcp dport 19154-19169 notrack" in body
        assert "ip6 daddr fd00::2 tcp dport 443 tcp sport 19154-19169 notrack" in body
    # never a rule that would exempt other clients of the API server (their replies need conntrack: NAT)
    assert "tcp sport 6443 notrack" not in text and "tcp dport 6443 notrack" not in text
    assert ruleset(19153) == ruleset(19153, [])


@pytest.mark.skipif(shutil.which("nft") is None, reason="nft (Debian package nftables) not installed")
def test_nft_accepts_the_ruleset() -> None:
    text = ruleset(19153, [ExemptFlow("192.168.0.2", 6443, range(19154, 19170))])
    r = subprocess.run(["nft", "-c", "-f", "-"], input=text, text=True, capture_output=True, timeout=10)
    if r.returncode != 0 and "Operation not permitted" in r.stderr:
        pytest.skip("nft -c needs CAP_NET_ADMIN here")
    assert r.returncode == 0, r.stderr

"""The endpoint sampler (issue 17) over a simulated fleet of 5,000 node names: every endpoint is probed by
about N*K/E nodes in every round (coverage, no endpoint left out, none swamped), each node covers every
endpoint within ceil(E/K) rounds, and the choice survives restarts (a restarted fleet picks the same, so a
DaemonSet rollout cannot pile the fleet onto one endpoint)."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from exporter.discovery.targets import Target
from exporter.dns.sampler import EndpointSampler

NODES = [f"ip-10-{i // 250}-{i % 250}-7.eu-west-1.compute.internal" for i in range(5000)]
K = 2


def endpoints(n: int) -> list[Target]:
    return [Target(f"10.244.{i // 200}.{i % 200 + 2}", 53, "endpoint", pod=f"coredns-{i}") for i in range(n)]


@pytest.mark.parametrize("n_endpoints", [2, 10, 30])
def test_every_endpoint_is_probed_by_about_n_k_over_e_nodes_every_round(n_endpoints: int) -> None:
    eps = endpoints(n_endpoints)
    fleet = [EndpointSampler(node, K) for node in NODES]
    expected = len(NODES) * min(K, n_endpoints) / n_endpoints
    for round_ in (0, 1, 7, 1_000_003):
        load = Counter(t.server for s in fleet for t in s.choose(eps, round_))
        assert set(load) == {t.server for t in eps}, "an endpoint nobody probes this round"
        # Binomial(N, K/E): 4.5 standard deviations is about 1 in 150,000 per endpoint and round.
        sd = math.sqrt(expected * (1 - min(K, n_endpoints) / n_endpoints))
        for server, n in load.items():
            assert abs(n - expected) <= max(4.5 * sd, 1), (round_, server, n, expected)
        assert sum(load.values()) == len(NODES) * min(K, n_endpoints)


@pytest.mark.parametrize("n_endpoints", [3, 10, 30, 31])
def test_each_node_covers_every_endpoint_within_a_cycle(n_endpoints: int) -> None:
    eps = endpoints(n_endpoints)
    cycle = math.ceil(n_endpoints / K)
    for node in NODES[:200]:
        s = EndpointSampler(node, K)
        assert s.cycle(n_endpoints) == cycle
        for first in (0, 5, 12345):
            seen = {t for r in range(first, first + cycle) for t in s.choose(eps, r)}
            assert seen == set(eps), (node, first)
            assert all(len(s.choose(eps, r)) == K for r in range(first, first + cycle))


def test_a_restarted_fleet_chooses_exactly_what_it_chose_before() -> None:
    eps = endpoints(30)
    def life(node: str, listed: list[Target]) -> list[list[Target]]:
        s = EndpointSampler(node, K)  # a fresh process
        return [s.choose(listed, r) for r in range(40)]

    before = {node: life(node, eps) for node in NODES[:500]}
    after = {node: life(node, list(reversed(eps))) for node in NODES[:500]}
    assert before == after  # no process state, no dependence on the order the API listed the endpoints


def test_nodes_restarted_together_stay_spread_over_time_and_endpoints() -> None:
    """A DaemonSet rollout restarts every node within seconds: their rounds keep per-node phases (spread over the
    interval) and the endpoints they pick in the first round after the restart are as spread as ever."""
    fleet = [EndpointSampler(node, K) for node in NODES]
    phases = sorted(s.phase for s in fleet)
    tenths = Counter(int(p * 10) for p in phases)
    assert all(400 <= tenths[i] <= 600 for i in range(10)), tenths
    eps = endpoints(30)
    now, interval = 1_764_620_000.0, 5.0
    load = Counter(t.server for s in fleet for t in s.choose(eps, s.round_at(now, interval)))
    expected = len(NODES) * K / 30
    assert max(load.values()) <= 1.25 * expected and min(load.values()) >= 0.75 * expected, load


def test_round_numbers_follow_the_wall_clock_from_the_node_phase() -> None:
    s = EndpointSampler("node-a", K)
    interval = 5.0
    r = s.round_at(1_764_620_000.0, interval)
    start = s.round_start(r, interval)
    assert start <= 1_764_620_000.0 < start + interval
    assert s.round_at(start + 0.001, interval) == r and s.round_at(start + interval + 0.001, interval) == r + 1


def test_adding_an_endpoint_keeps_the_load_spread() -> None:
    """The autoscaler adds a 31st pod: it is probed from its first round like the others."""
    fleet = [EndpointSampler(node, K) for node in NODES]
    eps = endpoints(31)
    load = Counter(t.server for s in fleet for t in s.choose(eps, 99))
    expected = len(NODES) * K / 31
    assert load[eps[-1].server] >= 0.75 * expected and max(load.values()) <= 1.25 * expected

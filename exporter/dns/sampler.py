"""Which CoreDNS endpoints this node probes in a round (`--probe.endpoints-per-round`, issue 17).

Probing every endpoint from every node makes the probe load on each CoreDNS pod grow with the number of
nodes (0.8 qps per node per pod at the defaults) and the series per node grow with the number of pods.
Each node therefore probes only K endpoints per round; node-local paths (Service IP, NodeLocal, static
and resolv.conf servers) are not sampled.

The choice is a rotation through a per-node order of the endpoints: endpoints are sorted by a hash of
(node name, endpoint), and round r takes the K positions starting at r*K (wrapping). So:
- each node covers every endpoint at least once every ceil(E/K) rounds (no endpoint is left out
  from any node for long: a dead endpoint fails on this node within that time);
- an endpoint's position in a node's order is an independent uniform draw per node, so in every
  round each endpoint is probed by about N*K/E of the N nodes (binomial), never by all at once;
- the choice depends only on the node name, the endpoint set and the round number, which is counted
  on the wall clock from a per-node phase (a hash of the node name): a restarted node picks exactly
  what it would have picked, and nodes restarted together (a DaemonSet rollout) stay spread over
  the interval and over the endpoints (no thundering herd).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

from exporter.discovery.targets import Target


def _hash(*parts: str) -> int:
    return int.from_bytes(hashlib.blake2b("\0".join(parts).encode(), digest_size=8).digest(), "big")


class EndpointSampler:
    def __init__(self, node: str, per_round: int) -> None:
        if per_round < 1:
            raise ValueError("per_round must be at least 1")
        self.node = node
        self.per_round = per_round
        # Where in each interval this node's rounds start, as a fraction of the interval.
        self.phase = _hash("phase", node) / 2**64
        self._order: tuple[frozenset[Target], list[Target]] = (frozenset(), [])  # last endpoint set's order

    def round_at(self, now: float, interval: float) -> int:
        """The round number at wall-clock time `now` (seconds)."""
        return math.floor(now / interval - self.phase)

    def round_start(self, round_: int, interval: float) -> float:
        """The wall-clock time round `round_` starts on this node."""
        return (round_ + self.phase) * interval

    def order(self, endpoints: Sequence[Target]) -> list[Target]:
        """This node's fixed order of the endpoints (by hash of node and endpoint)."""
        key = frozenset(endpoints)
        if key != self._order[0]:
            self._order = (key, sorted(key, key=lambda t: (_hash(self.node, t.server), t.server)))
        return self._order[1]

    def choose(self, endpoints: Sequence[Target], round_: int) -> list[Target]:
        """The endpoints to probe in round `round_`: all of them if there are at most K."""
        ordered = self.order(endpoints)
        n = len(ordered)
        if n <= self.per_round:
            return ordered
        start = (round_ * self.per_round) % n
        return [ordered[(start + i) % n] for i in range(self.per_round)]

    def cycle(self, n_endpoints: int) -> int:
        """Rounds within which every endpoint is probed at least once from this node."""
        return max(1, math.ceil(n_endpoints / self.per_round))

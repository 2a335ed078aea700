"""conntrack-dns-exporter: the node's conntrack table and DNS path as Prometheus metrics."""

__version__ = "0.1.0"

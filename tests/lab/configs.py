"""Text of the lab's configuration files: dnsmasq ("CoreDNS"), unbound (upstream and NodeLocal DNSCache),
and the node's nftables ruleset (kube-proxy's DNAT and node-cache's NOTRACK rules)."""

from __future__ import annotations

from collections.abc import Sequence

# Names the "CoreDNS" backends answer themselves (everything else under cluster.local is NXDOMAIN).
CLUSTER_RECORDS = {
    "kubernetes.default.svc.cluster.local": "10.96.0.1",
    "kube-dns.kube-system.svc.cluster.local": "10.96.0.10",
    "web.default.svc.cluster.local": "10.96.14.7",
    "db.default.svc.cluster.local": "10.96.22.5",
}
# The upstream's test zone: the "external" names pods resolve.
UPSTREAM_RECORDS = {
    "example.com": ("192.0.2.1", None),
    "www.example.com": ("192.0.2.10", "2001:db8::10"),
    "api.example.com": ("192.0.2.11", "2001:db8::11"),
}


def dnsmasq_backend(listen: str, upstream: str) -> str:
    lines = [
        "no-resolv", "no-hosts", "no-poll", "bind-interfaces", "user=root", "pid-file=",
        f"listen-address={listen},127.0.0.1", "port=53", f"server={upstream}",
        "local=/cluster.local/", "cache-size=0", "dns-forward-max=1000", "local-ttl=5",
    ]
    lines += [f"host-record={name},{ip}" for name, ip in CLUSTER_RECORDS.items()]
    return "\n".join(lines) + "\n"


def _unbound_common(run_dir: str, interface: str) -> list[str]:
    return [
        "server:",
        f"  interface: {interface}", "  port: 53", "  do-daemonize: no", '  username: ""', '  chroot: ""',
        f'  directory: "{run_dir}"', '  pidfile: ""', "  use-syslog: no", '  logfile: ""', "  verbosity: 0",
        "  do-ip6: no", "  access-control: 0.0.0.0/0 allow", '  module-config: "iterator"',
        "  num-threads: 1", "  so-reuseport: no", "  outgoing-range: 64", "  num-queries-per-thread: 64",
    ]


def unbound_upstream(run_dir: str, listen: str) -> str:
    lines = _unbound_common(run_dir, listen)
    # Authoritative-ish for the test zone; refuse everything else so it never tries to recurse anywhere.
    lines += ['  local-zone: "." refuse', '  local-zone: "example.com." static']
    for name, (a, aaaa) in UPSTREAM_RECORDS.items():
        lines.append(f'  local-data: "{name}. 60 IN A {a}"')
        if aaaa:
            lines.append(f'  local-data: "{name}. 60 IN AAAA {aaaa}"')
    lines += ["remote-control:", "  control-enable: no"]
    return "\n".join(lines) + "\n"


def unbound_nodelocal(run_dir: str, listen: str, outgoing: str, service_ip: str) -> str:
    lines = _unbound_common(run_dir, listen)
    lines += [
        f"  outgoing-interface: {outgoing}",
        "  tcp-upstream: yes",  # node-cache talks to the DNS Service over TCP (force_tcp)
        "  cache-max-ttl: 30", "  cache-max-negative-ttl: 5", "  do-not-query-localhost: no",
        '  domain-insecure: "."',
        "forward-zone:", '  name: "cluster.local."', f"  forward-addr: {service_ip}",
        "forward-zone:", '  name: "."', f"  forward-addr: {service_ip}",
        "remote-control:", "  control-enable: no",
    ]
    return "\n".join(lines) + "\n"


def dnat_map(endpoints: Sequence[str]) -> str:
    entries = ", ".join(f"{i} : {ip}" for i, ip in enumerate(endpoints))
    return f"numgen random mod {len(endpoints)} map {{ {entries} }}"


def node_ruleset(service_ip: str, endpoints: Sequence[str], nodelocal_ip: str | None, host_if: str) -> str:
    """kube-proxy (nftables mode) style DNAT of the DNS Service, plus node-cache's NOTRACK rules."""
    rules = f"""
table ip kube-lab
delete table ip kube-lab
table ip kube-lab {{
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        jump services
    }}
    chain output {{
        type nat hook output priority -100; policy accept;
        jump services
    }}
    chain services {{
        ip daddr {service_ip} meta l4proto {{ udp, tcp }} th dport 53 jump svc-kube-dns
    }}
    chain svc-kube-dns {{
        dnat to {dnat_map(endpoints)}
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        iifname "{host_if}" drop
        oifname "{host_if}" drop
    }}
}}
"""
    if nodelocal_ip:
        notrack = (f"ip daddr {nodelocal_ip} meta l4proto {{ udp, tcp }} th dport 53 notrack\n"
                   f"        ip saddr {nodelocal_ip} meta l4proto {{ udp, tcp }} th sport 53 notrack")
        rules += f"""
table ip nodelocaldns
delete table ip nodelocaldns
table ip nodelocaldns {{
    chain prerouting {{
        type filter hook prerouting priority raw; policy accept;
        {notrack}
    }}
    chain output {{
        type filter hook output priority raw; policy accept;
        {notrack}
    }}
}}
"""
    return rules


def svc_chain(endpoints: Sequence[str]) -> str:
    """Replace the Service's endpoint map atomically (what kube-proxy does on an endpoints change)."""
    return f"""
flush chain ip kube-lab svc-kube-dns
add rule ip kube-lab svc-kube-dns dnat to {dnat_map(endpoints)}
"""


def loss_ruleset(percent: int) -> str:
    match = "meta l4proto udp th dport 53"
    drop = f"{match} drop" if percent >= 100 else f"{match} numgen random mod 100 < {percent} drop" if percent else ""
    return f"""
table ip lab-loss
delete table ip lab-loss
table ip lab-loss {{
    chain prerouting {{
        type filter hook prerouting priority -310; policy accept;
        {drop}
    }}
    chain output {{
        type filter hook output priority -310; policy accept;
        {drop}
    }}
}}
"""


def slow_redirect(iface: str, to_port: int) -> str:
    return f"""
table ip lab-slow
delete table ip lab-slow
table ip lab-slow {{
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        iifname "{iface}" meta l4proto {{ udp, tcp }} th dport 53 redirect to :{to_port}
    }}
}}
"""

"""The lab: a Kubernetes node's DNS path built from network namespaces, real kernel conntrack, nftables DNAT
and real DNS daemons.

    pod ns --veth--> node ns --veth--> backend ns x N ("CoreDNS": dnsmasq) --> upstream ns (unbound)
                        |  nftables: DNAT 10.96.0.10:53 -> numgen random mod N map (kube-proxy)
                        |  unbound on 169.254.20.10 (NodeLocal DNSCache analogue, NOTRACK, TCP upstream)
                        +--veth--> root ns (per-instance link-local /30, only for Prometheus scrapes)

Every name visible outside the lab's namespaces (namespace names, the root-side veth, its /30, the run dir)
is derived from the instance prefix, so labs side by side never collide. Addresses inside the namespaces
are the same in every instance: they are invisible to each other.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.lab import configs
from tests.lab.dnsq import query
from tests.support.netns import Netns, run

REPO = Path(__file__).resolve().parents[2]
RUN_ROOT = Path(os.environ.get("LAB_RUN_ROOT", "/tmp"))
NETNS_ETC = Path("/etc/netns")
ALIAS_TAG = "cdlab:"  # root-namespace links carry "cdlab:<prefix>" as alias, so `down --prefix` finds them

SERVICE_IP = "10.96.0.10"
SERVICE_CIDR = "10.96.0.0/12"
NODELOCAL_IP = "169.254.20.10"
POD_IP = "10.244.1.2"
NODE_IP = "10.244.1.1"  # the node's address on the pod network; node-originated DNS uses it as source
UPSTREAM_IP = "10.250.0.2"
STALE_IP = "10.244.99.2"  # an endpoint address where no pod exists any more
CLUSTER_NAME = "kubernetes.default.svc.cluster.local"
EXTERNAL_NAME = "www.example.com"
SEARCH = ("default.svc.cluster.local", "svc.cluster.local", "cluster.local")
HOST_LINK_BASE = int(ipaddress.IPv4Address("169.254.128.0"))
HOST_LINK_SLOTS = 8192  # /30s in 169.254.128.0/17

REQUIRED_BINARIES = ("ip", "nft", "dnsmasq", "unbound", "conntrack")
_instances = 0


def missing_binaries() -> list[str]:
    return [b for b in REQUIRED_BINARIES if shutil.which(b) is None]


def backend_ip(i: int) -> str:
    return f"10.244.{10 + i}.2"


def _host_link_name(prefix: str) -> str:
    return "cdl" + hashlib.sha1(prefix.encode()).hexdigest()[:9] + "h"


def _used_root_addrs() -> set[str]:
    out = run(["ip", "-4", "-j", "addr", "show"], check=False).stdout or "[]"
    return {a["local"] for link in json.loads(out) for a in link.get("addr_info", [])}


def _pick_host_subnet(prefix: str) -> tuple[str, str]:
    """A link-local /30 for root<->node derived from the prefix, skipping any already in use."""
    slot = int(hashlib.sha1(prefix.encode()).hexdigest(), 16) % HOST_LINK_SLOTS
    used = _used_root_addrs()
    for k in range(HOST_LINK_SLOTS):
        base = HOST_LINK_BASE + 4 * ((slot + k) % HOST_LINK_SLOTS)
        root, node = str(ipaddress.IPv4Address(base + 1)), str(ipaddress.IPv4Address(base + 2))
        if root not in used and node not in used:
            return root, node
    raise RuntimeError("no free link-local /30 for the lab's host link")


@dataclass
class Backend:
    """One "CoreDNS" pod: its namespace, address and name (coredns-<index>)."""

    index: int
    ns: Netns
    ip: str

    @property
    def name(self) -> str:
        return f"coredns-{self.index}"


class Lab:
    """One lab instance. `Lab.up()` builds it, `down()` removes everything it made."""

    service_ip = SERVICE_IP
    nodelocal_ip = NODELOCAL_IP
    pod_ip = POD_IP
    node_ip = NODE_IP
    upstream_ip = UPSTREAM_IP
    cluster_name = CLUSTER_NAME
    external_name = EXTERNAL_NAME

    def __init__(self, prefix: str, backends: int, nodelocal: bool, host_root_ip: str, host_node_ip: str) -> None:
        validate_prefix(prefix)
        self.prefix = prefix
        self.nodelocal = nodelocal
        self.run_dir = RUN_ROOT / prefix
        self.node = _named(f"{prefix}-node")
        self.pod = _named(f"{prefix}-pod")
        self.upstream = _named(f"{prefix}-up")
        self.backends = [Backend(i, _named(f"{prefix}-be{i}"), backend_ip(i)) for i in range(backends)]
        self.host_link = _host_link_name(prefix)
        self.host_root_ip = host_root_ip
        self.host_node_ip = host_node_ip
        self.resolv_conf = str(NETNS_ETC / self.pod.name / "resolv.conf")
        self.faults: dict[str, list[str]] = {}
        self._procs: dict[str, subprocess.Popen[Any]] = {}
        self._exporters: list[Any] = []
        self._threads: dict[str, Any] = {}

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    def up(cls, prefix: str | None = None, backends: int = 2, nodelocal: bool = True) -> Lab:
        global _instances
        if prefix is None:
            reap_orphans()
            prefix = f"cdlab{os.getpid()}x{_instances}"
            _instances += 1
        if backends < 1 or backends > 50:
            raise ValueError("backends must be between 1 and 50")
        missing = missing_binaries()
        if missing:
            raise RuntimeError(f"the lab needs these binaries: {', '.join(missing)}")
        validate_prefix(prefix)
        cleanup(prefix, exact=True)  # leftovers of an earlier run with the same name
        root_ip, node_ip = _pick_host_subnet(prefix)
        lab = cls(prefix, backends, nodelocal, root_ip, node_ip)
        try:
            lab._build()
        except BaseException:
            lab.down()
            raise
        return lab

    def _build(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "pids").mkdir(exist_ok=True)
        self._save()
        for ns in self.namespaces():
            Netns(ns.name)
        node = self.node
        node.exec(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        # pod <-> node
        self._veth(self.pod, "eth0", node, "pod0")
        self._addr(self.pod, "eth0", f"{POD_IP}/24")
        self._addr(node, "pod0", f"{NODE_IP}/24")
        self.pod.exec(["ip", "route", "add", "default", "via", NODE_IP])
        # node <-> backends
        for b in self.backends:
            self._veth(b.ns, "eth0", node, f"be{b.index}")
            self._addr(b.ns, "eth0", f"{b.ip}/24")
            self._addr(node, f"be{b.index}", f"10.244.{10 + b.index}.1/24")
            b.ns.exec(["ip", "route", "add", "default", "via", f"10.244.{10 + b.index}.1"])
        # node <-> upstream
        self._veth(self.upstream, "eth0", node, "up0")
        self._addr(self.upstream, "eth0", f"{UPSTREAM_IP}/24")
        self._addr(node, "up0", "10.250.0.1/24")
        self.upstream.exec(["ip", "route", "add", "default", "via", "10.250.0.1"])
        # Service range and stale endpoints route into a veth whose peer answers no ARP (this kernel has no
        # dummy driver): packets there vanish like those sent to a deleted pod, and node-originated packets
        # to the Service IP have a route before the nat OUTPUT hook rewrites them. node-cache's own
        # "nodelocaldns" interface is a veth for the same reason.
        self._veth(node, "svc0", node, "svc0p")
        node.exec(["ip", "route", "add", SERVICE_CIDR, "dev", "svc0", "src", NODE_IP])
        node.exec(["ip", "route", "add", "10.244.99.0/24", "dev", "svc0", "src", NODE_IP])
        if self.nodelocal:
            self._veth(node, "nodelocaldns", node, "nodelocalp")
            self._addr(node, "nodelocaldns", f"{NODELOCAL_IP}/32")
        # root <-> node (for Prometheus); the root side is the only thing the lab puts in the root namespace
        run(["ip", "link", "add", self.host_link, "type", "veth", "peer", "name", "host0", "netns", node.name])
        run(["ip", "link", "set", self.host_link, "alias", ALIAS_TAG + self.prefix])
        # no IPv6 link-local address on either end: nothing (router/neighbour solicitations) chatters across
        run(["ip", "link", "set", self.host_link, "addrgenmode", "none"])
        node.exec(["ip", "link", "set", "host0", "addrgenmode", "none"])
        run(["ip", "addr", "add", f"{self.host_root_ip}/30", "dev", self.host_link])
        run(["ip", "link", "set", self.host_link, "up"])
        self._addr(node, "host0", f"{self.host_node_ip}/30")
        node.exec(["ip", "link", "set", "host0", "up"])
        self.apply_nft(configs.node_ruleset(SERVICE_IP, self.endpoints(), NODELOCAL_IP if self.nodelocal else None,
                                            "host0"))
        # the pod's resolv.conf; `ip netns exec <pod>` bind-mounts it over /etc/resolv.conf for glibc clients
        Path(self.resolv_conf).parent.mkdir(parents=True, exist_ok=True)
        Path(self.resolv_conf).write_text(
            f"nameserver {SERVICE_IP}\nsearch {' '.join(SEARCH)}\noptions ndots:5\n")
        # daemons
        self.start_upstream()
        for b in self.backends:
            self.start_backend(b.index)
        if self.nodelocal:
            self.start_nodelocal()
        self._wait_dns(self.upstream, UPSTREAM_IP, EXTERNAL_NAME)
        for b in self.backends:
            self._wait_dns(b.ns, b.ip, CLUSTER_NAME)
        if self.nodelocal:
            self._wait_dns(self.node, NODELOCAL_IP, CLUSTER_NAME)

    def _veth(self, a: Netns, a_if: str, b: Netns, b_if: str) -> None:
        run(["ip", "link", "add", a_if, "netns", a.name, "type", "veth", "peer", "name", b_if, "netns", b.name])
        a.exec(["ip", "link", "set", a_if, "up"])
        b.exec(["ip", "link", "set", b_if, "up"])

    @staticmethod
    def _addr(ns: Netns, ifname: str, cidr: str) -> None:
        ns.exec(["ip", "addr", "add", cidr, "dev", ifname])

    def _wait_dns(self, ns: Netns, server: str, name: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if query(ns.name, server, name, timeout=0.5).ok:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"DNS server {server} in {ns.name} did not answer {name} within {timeout}s")
            time.sleep(0.1)

    # ---- accessors ----------------------------------------------------------------------------------------
    def namespaces(self) -> list[Netns]:
        return [self.node, self.pod, self.upstream, *(b.ns for b in self.backends)]

    def endpoints(self) -> list[str]:
        eps = [b.ip for b in self.backends]
        if "stale-endpoint" in self.faults:
            eps.append(STALE_IP)
        return eps

    def backend(self, index: int | str) -> Backend:
        i = int(index)
        if not 0 <= i < len(self.backends):
            raise ValueError(f"no backend {i}: this lab has backends 0..{len(self.backends) - 1}")
        return self.backends[i]

    def apply_nft(self, rules: str, ns: Netns | None = None) -> None:
        r = (ns or self.node).exec(["nft", "-f", "-"], input=rules, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"nft failed in {(ns or self.node).name}: {r.stderr.strip()}")

    def ct_stats(self) -> dict[str, int]:
        """The node namespace's conntrack statistics summed over CPUs (`conntrack -S`), plus `count`."""
        out = self.node.exec(["conntrack", "-S"]).stdout
        total: dict[str, int] = {}
        for line in out.splitlines():
            for field in line.split()[1:]:
                k, _, v = field.partition("=")
                if v.isdigit():
                    total[k] = total.get(k, 0) + int(v)
        cnt = self.node.exec(["conntrack", "-C"]).stdout.strip()
        total["count"] = int(cnt) if cnt.isdigit() else -1
        return total

    # ---- processes ----------------------------------------------------------------------------------------
    def spawn(self, name: str, ns: Netns | None, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start a daemon (in `ns`, or the root namespace), logging to <run_dir>/<name>.log, pid recorded."""
        self.stop_proc(name)
        log = open(self.run_dir / f"{name}.log", "ab")
        full = ns.cmd(argv) if ns is not None else list(argv)
        try:
            p = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True, cwd=str(REPO), **kw)
        finally:
            log.close()
        self._procs[name] = p
        (self.run_dir / "pids" / f"{name}.pid").write_text(str(p.pid))
        return p

    def stop_proc(self, name: str, timeout: float = 5.0) -> None:
        pidfile = self.run_dir / "pids" / f"{name}.pid"
        p = self._procs.pop(name, None)
        pid = p.pid if p is not None else None
        if pid is None and pidfile.exists():
            with contextlib.suppress(ValueError):
                pid = int(pidfile.read_text())
        if pid is not None and (p is not None or _ours(pid, self.prefix)):
            _terminate(pid, p, timeout)
        pidfile.unlink(missing_ok=True)

    def proc_running(self, name: str) -> bool:
        pidfile = self.run_dir / "pids" / f"{name}.pid"
        if not pidfile.exists():
            return False
        p = self._procs.get(name)
        if p is not None:
            return p.poll() is None
        with contextlib.suppress(ValueError):
            return _ours(int(pidfile.read_text()), self.prefix)
        return False

    def start_backend(self, index: int) -> None:
        b = self.backend(index)
        conf = self.run_dir / f"{b.name}.dnsmasq.conf"
        conf.write_text(configs.dnsmasq_backend(b.ip, UPSTREAM_IP))
        self.spawn(b.name, b.ns, ["dnsmasq", "--keep-in-foreground", f"--conf-file={conf}"])

    def start_upstream(self) -> None:
        conf = self.run_dir / "upstream.unbound.conf"
        conf.write_text(configs.unbound_upstream(str(self.run_dir), UPSTREAM_IP))
        self.spawn("upstream", self.upstream, ["unbound", "-d", "-c", str(conf)])

    def start_nodelocal(self) -> None:
        conf = self.run_dir / "nodelocal.unbound.conf"
        conf.write_text(configs.unbound_nodelocal(str(self.run_dir), NODELOCAL_IP, NODE_IP, SERVICE_IP))
        self.spawn("nodelocal", self.node, ["unbound", "-d", "-c", str(conf)])

    def start_exporter(self, *args: str, port: int | None = None, wait: bool = True) -> Any:
        """`python -m exporter` in the node namespace (as under hostNetwork), on 0.0.0.0:<port> there
        (default 19153, or the next port not used by another running exporter of this lab).

        Reachable from the root namespace at http://<host_node_ip>:<port>/metrics; stopped at down()."""
        from tests.support.exporter_proc import Exporter

        if port is None:
            busy = {e.port for e in self._exporters if e.proc.poll() is None}
            port = next(p for p in range(19153, 19253) if p not in busy)
        exp = Exporter([*args, f"--web.listen-address=0.0.0.0:{port}"], netns=self.node, port=port)
        self._exporters.append(exp)
        (self.run_dir / "pids" / f"exporter-{exp.proc.pid}.pid").write_text(str(exp.proc.pid))
        if wait:
            exp.wait_ready()
        return exp

    # ---- faults (implemented in tests.lab.faults) ---------------------------------------------------------
    def fault(self, name: str, *args: Any) -> Any:
        from tests.lab import faults

        return faults.inject(self, name, [str(a) for a in args])

    def heal(self, name: str) -> None:
        from tests.lab import faults

        faults.heal(self, name)

    def heal_all(self) -> None:
        from tests.lab import faults

        faults.heal_all(self)

    # ---- state (so the CLI can act on a lab another process brought up) ----------------------------------
    def _save(self) -> None:
        state = {"prefix": self.prefix, "backends": len(self.backends), "nodelocal": self.nodelocal,
                 "host_root_ip": self.host_root_ip, "host_node_ip": self.host_node_ip, "faults": self.faults}
        tmp = self.run_dir / "state.json.tmp"
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(self.run_dir / "state.json")

    @classmethod
    def attach(cls, prefix: str) -> Lab:
        validate_prefix(prefix)
        path = RUN_ROOT / prefix / "state.json"
        if not path.exists():
            raise RuntimeError(f"no lab {prefix!r} is up (no {path})")
        st = json.loads(path.read_text())
        lab = cls(st["prefix"], st["backends"], st["nodelocal"], st["host_root_ip"], st["host_node_ip"])
        lab.faults = {k: list(v) for k, v in st.get("faults", {}).items()}
        return lab

    def status(self) -> dict[str, Any]:
        names = {ns.name for ns in self.namespaces()}
        listed = {ln.split()[0] for ln in run(["ip", "netns", "list"], check=False).stdout.splitlines() if ln.split()}
        daemons = ["upstream", *(b.name for b in self.backends), *(["nodelocal"] if self.nodelocal else [])]
        out: dict[str, Any] = {
            "prefix": self.prefix, "run_dir": str(self.run_dir),
            "namespaces": {n: n in listed for n in sorted(names)},
            "daemons": {d: self.proc_running(d) for d in daemons},
            "faults": self.faults,
            "service_ip": SERVICE_IP, "nodelocal_ip": NODELOCAL_IP if self.nodelocal else None,
            "pod_ip": POD_IP, "backends": {b.name: b.ip for b in self.backends}, "upstream_ip": UPSTREAM_IP,
            "host_link": f"{self.host_link} {self.host_root_ip} <-> node host0 {self.host_node_ip}",
        }
        if names <= listed:
            out["conntrack"] = self.ct_stats()
        return out

    # ---- teardown -----------------------------------------------------------------------------------------
    def down(self) -> None:
        with contextlib.suppress(Exception):
            from tests.lab import faults

            faults.stop_background(self)
        for exp in self._exporters:
            with contextlib.suppress(Exception):
                exp.stop(timeout=3)
        self._exporters.clear()
        for name in list(self._procs):
            with contextlib.suppress(Exception):
                self.stop_proc(name, timeout=2)
        cleanup(self.prefix, exact=True)

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()


def validate_prefix(prefix: str) -> None:
    if not (3 <= len(prefix) <= 24 and prefix.isascii() and prefix.replace("-", "").isalnum()
            and prefix[0].isalpha()):
        raise ValueError(f"bad lab prefix {prefix!r}: 3-24 letters/digits, starting with a letter")


def _named(name: str) -> Netns:
    ns = Netns.__new__(Netns)
    ns.name = name
    return ns


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _netns_of(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return ""


def _ours(pid: int, prefix: str) -> bool:
    """Guard against pid reuse: a recorded pid is only ours if its command line names our prefix/run dir."""
    return prefix in _cmdline(pid)


def _terminate(pid: int, p: subprocess.Popen[Any] | None, timeout: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if p is not None:
            if p.poll() is not None:
                return
        elif not Path(f"/proc/{pid}").exists() or _zombie(pid):
            return
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    if p is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(2)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _ns_pids(name: str) -> list[int]:
    target = ""
    with contextlib.suppress(OSError):
        st = os.stat(f"/run/netns/{name}")
        target = f"net:[{st.st_ino}]"
    if not target:
        return []
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and _netns_of(int(d.name)) == target:
            pids.append(int(d.name))
    return pids


def cleanup(prefix: str, *, exact: bool = False) -> list[str]:
    """Remove everything a lab with this prefix (exact) or any lab whose prefix starts with it left behind:
    recorded processes (also root-namespace ones like the demo's Prometheus), processes inside its
    namespaces, the namespaces (their nftables tables and veths go with them), root-namespace host links,
    /etc/netns/<ns> and the run dir. Returns what it removed, for the CLI to print."""
    validate_prefix(prefix)
    removed: list[str] = []

    def matches(p: str) -> bool:
        return p == prefix if exact else p.startswith(prefix)

    # 1. recorded pids (root-namespace ones are only found this way)
    for run_dir in sorted(RUN_ROOT.glob(f"{prefix}*")):
        if not run_dir.is_dir() or not matches(run_dir.name) or not (run_dir / "state.json").exists():
            continue
        for pf in (run_dir / "pids").glob("*.pid"):
            with contextlib.suppress(ValueError, OSError):
                pid = int(pf.read_text())
                if _ours(pid, run_dir.name) and not _zombie(pid):
                    _terminate(pid, None, 2.0)
                    removed.append(f"process {pid} ({pf.stem})")
    # 2. namespaces: kill whatever runs inside, then delete
    listed = [ln.split()[0] for ln in run(["ip", "netns", "list"], check=False).stdout.splitlines() if ln.split()]
    for name in listed:
        lab_prefix = name.rsplit("-", 1)[0]
        if "-" not in name or not matches(lab_prefix):
            continue
        for pid in _ns_pids(name):
            if pid != os.getpid():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                removed.append(f"process {pid} (in {name})")
        run(["ip", "netns", "del", name], check=False)
        removed.append(f"netns {name}")
    # 3. root-namespace links tagged with our alias (normally gone with the node namespace already)
    links = json.loads(run(["ip", "-j", "link", "show"], check=False).stdout or "[]")
    for link in links:
        alias = link.get("ifalias", "")
        if alias.startswith(ALIAS_TAG) and matches(alias[len(ALIAS_TAG):]):
            run(["ip", "link", "del", link["ifname"]], check=False)
            removed.append(f"link {link['ifname']}")
    # 4. files
    for d in sorted(NETNS_ETC.glob(f"{prefix}*")) if NETNS_ETC.exists() else []:
        if "-" in d.name and matches(d.name.rsplit("-", 1)[0]):
            shutil.rmtree(d, ignore_errors=True)
    for run_dir in sorted(RUN_ROOT.glob(f"{prefix}*")):
        if run_dir.is_dir() and matches(run_dir.name) and (run_dir / "state.json").exists():
            shutil.rmtree(run_dir, ignore_errors=True)
            removed.append(f"dir {run_dir}")
    return removed


_OWNED = re.compile(r"^cdlab(?:demo)?(\d+)(?:x\d+)?$")


def reap_orphans() -> list[str]:
    """Remove labs with a default prefix (cdlab<pid>x<n>, cdlabdemo<pid>) whose owning process is gone,
    e.g. a SIGKILLed pytest. Labs of live processes and named labs (CLI) are left alone."""
    prefixes = {d.name for d in RUN_ROOT.glob("cdlab*") if (d / "state.json").exists()}
    listed = run(["ip", "netns", "list"], check=False).stdout.splitlines()
    prefixes |= {ln.split()[0].rsplit("-", 1)[0] for ln in listed if ln.startswith("cdlab") and "-" in ln}
    removed = []
    for prefix in sorted(prefixes):
        m = _OWNED.match(prefix)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            removed += cleanup(prefix, exact=True)
    return removed

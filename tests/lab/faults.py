"""The lab's faults: each one breaks the DNS path the way the field breaks it, and each can be healed.

    table-full PERCENT   fill the node's conntrack table with assured entries (batched netlink, tests.support.ctfill)
    race [N|Ns]          parallel A/AAAA from one UDP socket on two CPUs through the DNAT (N pairs or N seconds;
                         without argument until healed)
    backend-down N       stop backend N's DNS server (DNAT still sends it its share)
    backend-up N         start it again (also: heal backend-down)
    stale-endpoint       the Service's DNAT map gains an address where no pod exists any more
    loss PERCENT         the node drops PERCENT % of DNS (UDP 53) packets at random
    upstream-down        stop the upstream server: external names fail, cluster names still work
    slow-backend MS [N]  backend N (default: all) answers MS milliseconds late (a delaying relay in front of it)
    nodelocal-down       stop the NodeLocal DNSCache analogue (its address stays, nothing answers on it)
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.lab import configs
from tests.support import ctfill

if TYPE_CHECKING:
    from tests.lab.topology import Lab

SLOW_PORT = 5353
NAMES = ("table-full", "race", "backend-down", "backend-up", "stale-endpoint", "loss", "upstream-down",
         "slow-backend", "nodelocal-down")

# The demo's scenarios: a fault and the arguments it is walked through with.
SCENARIOS: dict[str, list[str]] = {
    "table-full": ["100"], "race": [], "backend-down": ["0"], "stale-endpoint": [], "loss": ["30"],
    "upstream-down": [], "slow-backend": ["800"], "nodelocal-down": [],
}


class FaultError(ValueError):
    """A fault name or argument the lab does not understand (one line, for the CLI)."""


def conntrack_max() -> int:
    return int(Path("/proc/sys/net/netfilter/nf_conntrack_max").read_text())


def _int_arg(args: list[str], i: int, what: str, lo: int, hi: int, default: int | None = None) -> int:
    if len(args) <= i:
        if default is None:
            raise FaultError(f"missing {what}")
        return default
    try:
        v = int(args[i])
    except ValueError:
        raise FaultError(f"{what} must be an integer, got {args[i]!r}") from None
    if not lo <= v <= hi:
        raise FaultError(f"{what} must be between {lo} and {hi}, got {v}")
    return v


def inject(lab: Lab, name: str, args: list[str]) -> Any:
    handler = _INJECT.get(name)
    if handler is None:
        raise FaultError(f"unknown fault {name!r}; known: {', '.join(NAMES)}")
    result = handler(lab, args)
    if name == "backend-up":
        lab.faults.pop(f"backend-down {args[0]}", None)
    else:
        key = f"backend-down {args[0]}" if name == "backend-down" else name
        lab.faults[key] = args
    lab._save()
    return result


def heal(lab: Lab, name: str) -> None:
    base = name.split()[0]
    if base == "backend-down":
        keys = [name] if " " in name else [k for k in lab.faults if k.startswith("backend-down")]
        for k in keys or [f"backend-down {i}" for i in range(len(lab.backends))]:
            with contextlib.suppress(ValueError, IndexError):
                idx = int(k.split()[1])
                if not lab.proc_running(lab.backend(idx).name):
                    lab.start_backend(idx)
                    lab._wait_dns(lab.backend(idx).ns, lab.backend(idx).ip, lab.cluster_name)
            lab.faults.pop(k, None)
        lab._save()
        return
    handler = _HEAL.get(base)
    if handler is None:
        raise FaultError(f"unknown fault {name!r}; known: {', '.join(NAMES)}")
    handler(lab)
    lab.faults.pop(base, None)
    lab._save()


def heal_all(lab: Lab) -> None:
    for name in ("race", "table-full", "loss", "stale-endpoint", "slow-backend", "upstream-down", "nodelocal-down",
                 "backend-down"):
        heal(lab, name)


def stop_background(lab: Lab) -> None:
    """Stop fault threads (the race) without touching anything else; used at teardown."""
    r = lab._threads.pop("race", None)
    if r is not None:
        r.stop()
    _stop_filler(lab)


# ---- table-full -------------------------------------------------------------------------------------------
class TableFiller:
    """Keeps the node table at its target while the fault lasts: real flows time out and free slots (UDP
    after 30 s), and in the field constant churn refills them at once; here a top-up every 0.2 s does."""

    def __init__(self, ns: str, target: int) -> None:
        self.ns, self.target = ns, target
        self._offset = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True, name="table-full")

    def top_up(self) -> int:
        have = ctfill.count(self.ns)
        for _ in range(8):
            if have >= self.target:
                break
            need = self.target - have
            ctfill.fill(self.ns, need, start=self._offset)
            self._offset += need
            have = ctfill.count(self.ns)
        return have

    def start(self) -> None:
        self._t.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            with contextlib.suppress(OSError):
                self.top_up()

    def stop(self) -> None:
        self._stop.set()
        self._t.join(5)


def _table_full(lab: Lab, args: list[str]) -> int:
    pct = _int_arg(args, 0, "PERCENT", 1, 100)
    _stop_filler(lab)
    filler = TableFiller(lab.node.name, conntrack_max() * pct // 100)
    have = filler.top_up()
    if pct == 100:
        # A full table still admits a new flow when the kernel can evict an entry that never became a stream
        # (early_drop): the one-shot DNS flows already there. Delete them (the filler's carry a mark) and
        # fill their slots, so that every new flow meets a full table as on a node where churn wins.
        lab.node.exec(["conntrack", "-D", "-p", "udp", "--mark", "0"], check=False)
        have = filler.top_up()
    lab._threads["table-full"] = filler
    filler.start()
    return have


def _stop_filler(lab: Lab) -> None:
    f = lab._threads.pop("table-full", None)
    if f is not None:
        f.stop()


def _heal_table_full(lab: Lab) -> None:
    _stop_filler(lab)
    ctfill.drain(lab.node.name)


# ---- race -------------------------------------------------------------------------------------------------
def _race(lab: Lab, args: list[str]) -> Any:
    from tests.lab.race import Race

    pairs: int | None = None
    seconds: float | None = None
    if args:
        a = args[0]
        try:
            if a.endswith("s"):
                seconds = float(a[:-1])
            else:
                pairs = int(a)
        except ValueError:
            raise FaultError(f"race takes PAIRS or SECONDS followed by s (e.g. 3000 or 10s), got {a!r}") from None
        if (pairs is not None and not 1 <= pairs <= 10_000_000) or (seconds is not None and not 0 < seconds <= 86400):
            raise FaultError(f"race limit out of range: {a!r}")
    stop_background(lab)
    race = Race(lab.pod.name, lab.service_ip, lab.cluster_name, pairs=pairs, seconds=seconds)
    lab._threads["race"] = race
    race.start()
    return race


def _heal_race(lab: Lab) -> None:
    stop_background(lab)


# ---- backends ---------------------------------------------------------------------------------------------
def _backend_down(lab: Lab, args: list[str]) -> None:
    idx = _int_arg(args, 0, "backend index N", 0, len(lab.backends) - 1)
    lab.stop_proc(lab.backend(idx).name)


def _backend_up(lab: Lab, args: list[str]) -> None:
    idx = _int_arg(args, 0, "backend index N", 0, len(lab.backends) - 1)
    b = lab.backend(idx)
    if not lab.proc_running(b.name):
        lab.start_backend(idx)
    lab._wait_dns(b.ns, b.ip, lab.cluster_name)


# ---- stale endpoint ---------------------------------------------------------------------------------------
def _stale(lab: Lab, args: list[str]) -> None:
    lab.faults["stale-endpoint"] = []
    lab.apply_nft(configs.svc_chain(lab.endpoints()))


def _heal_stale(lab: Lab) -> None:
    lab.faults.pop("stale-endpoint", None)
    lab.apply_nft(configs.svc_chain(lab.endpoints()))


# ---- loss -------------------------------------------------------------------------------------------------
def _loss(lab: Lab, args: list[str]) -> None:
    pct = _int_arg(args, 0, "PERCENT", 0, 100)
    lab.apply_nft(configs.loss_ruleset(pct))


def _heal_loss(lab: Lab) -> None:
    lab.node.exec(["nft", "delete", "table", "ip", "lab-loss"], check=False)
    if "loss" in lab.faults:  # heal_all heals every fault: restart NodeLocal only after a real loss
        _restart_nodelocal(lab)


# ---- upstream ---------------------------------------------------------------------------------------------
def _upstream_down(lab: Lab, args: list[str]) -> None:
    lab.stop_proc("upstream")


def _heal_upstream(lab: Lab) -> None:
    if not lab.proc_running("upstream"):
        lab.start_upstream()
        lab._wait_dns(lab.upstream, lab.upstream_ip, lab.external_name)
        # Healed means healed from where the pods stand: every running CoreDNS stand-in forwards again.
        for b in lab.backends:
            if lab.proc_running(b.name):
                lab._wait_dns(lab.pod, b.ip, lab.external_name)
        _restart_nodelocal(lab)


def _restart_nodelocal(lab: Lab) -> None:
    """The NodeLocal analogue (unbound) keeps an upstream that failed in its infra cache for minutes and goes on
    failing after the heal; node-local-dns (CoreDNS) retries at once. Healed means healed from where the pods
    stand, so it starts afresh."""
    if lab.nodelocal and lab.proc_running("nodelocal"):
        lab.stop_proc("nodelocal")
        lab.start_nodelocal()
        lab._wait_dns(lab.node, lab.nodelocal_ip, lab.cluster_name)


# ---- slow backend -----------------------------------------------------------------------------------------
def _slow(lab: Lab, args: list[str]) -> None:
    ms = _int_arg(args, 0, "MS", 1, 60_000)
    which = ([lab.backend(_int_arg(args, 1, "backend index N", 0, len(lab.backends) - 1))]
             if len(args) > 1 else lab.backends)
    _heal_slow(lab)
    for b in which:
        lab.spawn(f"slow-{b.index}", b.ns, [sys.executable, "-m", "tests.lab.slowdns", "--listen",
                                            f"0.0.0.0:{SLOW_PORT}", "--forward", "127.0.0.1:53",
                                            "--delay-ms", str(ms), "--tag", lab.prefix])
        _wait_port(lab, b, ms)
        lab.apply_nft(configs.slow_redirect("eth0", SLOW_PORT), ns=b.ns)


def _wait_port(lab: Lab, b: Any, ms: int) -> None:
    from tests.lab.dnsq import query

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if query(b.ns.name, "127.0.0.1", lab.cluster_name, port=SLOW_PORT, timeout=1 + ms / 1000).ok:
            return
        time.sleep(0.1)
    raise RuntimeError(f"delaying relay in {b.ns.name} did not come up")


def _heal_slow(lab: Lab) -> None:
    for b in lab.backends:
        b.ns.exec(["nft", "delete", "table", "ip", "lab-slow"], check=False)
        lab.stop_proc(f"slow-{b.index}")


# ---- nodelocal ---------------------------------------------------------------------------------------------
def _nodelocal_down(lab: Lab, args: list[str]) -> None:
    if not lab.nodelocal:
        raise FaultError("this lab has no NodeLocal DNSCache (it was built with --no-nodelocal)")
    lab.stop_proc("nodelocal")


def _heal_nodelocal(lab: Lab) -> None:
    if lab.nodelocal and not lab.proc_running("nodelocal"):
        lab.start_nodelocal()
        lab._wait_dns(lab.node, lab.nodelocal_ip, lab.cluster_name)


_INJECT: dict[str, Callable[[Lab, list[str]], Any]] = {
    "table-full": _table_full, "race": _race, "backend-down": _backend_down, "backend-up": _backend_up,
    "stale-endpoint": _stale, "loss": _loss, "upstream-down": _upstream_down, "slow-backend": _slow,
    "nodelocal-down": _nodelocal_down,
}
_HEAL: dict[str, Callable[[Lab], None]] = {
    "table-full": _heal_table_full, "race": _heal_race, "stale-endpoint": _heal_stale, "loss": _heal_loss,
    "upstream-down": _heal_upstream, "slow-backend": _heal_slow, "backend-up": lambda lab: None,
    "nodelocal-down": _heal_nodelocal,
}

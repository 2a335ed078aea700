"""The resolver models against the real C libraries in the lab (tests/lab) with the node's conntrack
table 100% full: from the pod namespace (packets forwarded through the node are dropped: glibc gives
EAI_AGAIN after timeout x attempts = 10 s, musl after its 5 s timeout) and from the node namespace
itself (hostNetwork: the kernel refuses the send with EPERM, glibc fails in well under 1 s, musl ignores
the error and still waits 5 s). The library is tests/support/clookup/lookup.c built with gcc and
musl-gcc -static; the model runs in the same namespace at the same time, asking another name.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest

from exporter.dns.models import ResolverOptions, run
from tests.lab import Lab
from tests.support import clookup
from tests.support.netns import in_netns

pytestmark = [pytest.mark.netns, pytest.mark.lab]


def test_table_full_from_pod_and_node_matches_the_libraries(healthy_lab: Lab) -> None:
    if clookup.missing():
        pytest.skip(f"needs {', '.join(clookup.missing())} (scripts/bootstrap.sh installs gcc and musl-tools)")
    lab = healthy_lab
    exes = clookup.build()
    node_etc = Path("/etc/netns") / lab.node.name
    created = not node_etc.exists()
    node_etc.mkdir(parents=True, exist_ok=True)
    (node_etc / "resolv.conf").write_text(f"nameserver {lab.service_ip}\n")  # a hostNetwork pod's view
    out: dict[tuple[str, str, str], Any] = {}

    def library(where: str, lib: str) -> None:
        ns = lab.pod if where == "pod" else lab.node
        p = ns.exec([exes[lib], f"lib-{lib}.{lab.cluster_name}."], timeout=60)
        out[(where, lib, "library")] = clookup.parse(p.stdout.strip())

    def model(where: str, lib: str) -> None:
        ns = lab.pod if where == "pod" else lab.node
        name = f"model-{lib}.{lab.cluster_name}."
        out[(where, lib, "model")] = in_netns(ns.name, lambda: asyncio.run(
            run(lib, [(lab.service_ip, 53)], name, ResolverOptions())))

    try:
        lab.fault("table-full", 100)
        # At 100 % the kernel still lets a new flow in when it can evict an entry that never saw a stream
        # (early_drop: a leftover one-shot DNS flow of an earlier test in the same hash range): such a try
        # did not meet a full table. Judge only tries without an early drop (3 at most).
        for _ in range(3):
            before = lab.ct_stats().get("early_drop", 0)
            threads = [threading.Thread(target=fn, args=(where, lib)) for where in ("pod", "node")
                       for lib in ("glibc", "musl") for fn in (library, model)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if lab.ct_stats().get("early_drop", 0) == before:
                break
            print(f"early_drop counted {lab.ct_stats().get('early_drop', 0) - before} evictions: trying again")
    finally:
        lab.heal("table-full")
        (node_etc / "resolv.conf").unlink()
        if created:
            shutil.rmtree(node_etc, ignore_errors=True)
    expect = {("pod", "glibc"): (9.5, 11.0), ("pod", "musl"): (4.8, 5.6),
              ("node", "glibc"): (0.0, 0.5), ("node", "musl"): (4.8, 5.6)}
    for (where, lib), (lo, hi) in expect.items():
        real, m = out[(where, lib, "library")], out[(where, lib, "model")]
        print(f"table full, from the {where}: {lib} {real.result} rc={real.rc} after {real.seconds:.4f} s; "
              f"model {m.result} after {m.duration:.4f} s ({m.error})")
        assert real.result == "failed" and real.rc == -3, (where, lib, real)  # EAI_AGAIN
        assert m.result == "failed", (where, lib, m)
        assert lo <= real.seconds <= hi, (where, lib, real)
        assert lo <= m.duration <= hi, (where, lib, m)
        assert abs(m.duration - real.seconds) < 0.35, (where, lib, real, m)
    assert out[("node", "glibc", "model")].error == "EPERM"

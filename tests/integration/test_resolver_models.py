"""The resolver models against the real C libraries, on the wire.

`tests/support/clookup/lookup.c` is built with gcc (glibc 2.36) and `musl-gcc -static` (musl 1.2.3); it
and the model run side by side in one client namespace (the "pod", tests/support/wirelab.py) against an
in-process dnspython server on port 53 in another, each asking its own name. A raw packet capture on the
client's veth records the queries each sent. For every resolver variant and server behaviour the model
must put the same queries on the wire (transport, socket, id, query type, at the same times within
0.35 s) and end with the same application result (ok / partial / failed) after the same wait.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from tests.support import clookup
from tests.support.dnsserver import Behaviour
from tests.support.netns import skip_reason
from tests.support.wirelab import Capture, WireLab, shape

pytestmark = [pytest.mark.netns, pytest.mark.slow]  # ~90 s: every variant waits out real timeouts

VARIANTS = {  # resolver model -> (library, resolv.conf options it corresponds to)
    "glibc": ("glibc", ""),
    "glibc-single-request": ("glibc", "single-request"),
    "glibc-single-request-reopen": ("glibc", "single-request-reopen"),
    "glibc-use-vc": ("glibc", "use-vc"),
    "musl": ("musl", ""),
}
FAST = "timeout:1 attempts:2"
SCENARIOS: dict[str, tuple[Behaviour, str]] = {
    "healthy": (Behaviour(), FAST),
    "aaaa-answer-dropped-once": (Behaviour(ignore_first=1, ignore_qtype="AAAA"), FAST),
    "aaaa-answer-always-dropped": (Behaviour(only="A"), FAST),
    "both-dropped": (Behaviour(silent=True), FAST),
    "server-7s-late": (Behaviour(delay=7.0), ""),  # glibc/musl defaults: timeout 5, attempts 2
    "servfail": (Behaviour(rcode=2), FAST),
    "lame-truncated": (Behaviour(truncate=True), FAST),  # TC, no records, no RA: glibc's lame check first
}
TIME_TOLERANCE = 0.35
HANG = 8.0  # use-vc without an answer: glibc blocks in read() with no timeout


def _need() -> None:
    reason = skip_reason() or (clookup.missing() and f"needs {', '.join(clookup.missing())} "
                               "(scripts/bootstrap.sh installs gcc and musl-tools)")
    if reason:
        pytest.skip(reason)


def _side_by_side(lab: WireLab, cap: Capture, resolver: str, lib: str, tag: str,
                  hang: float | None = None) -> tuple[Any, Any, list[Any], list[Any]]:
    lib_name, model_name = f"lib-{tag}.example.", f"model-{tag}.example."
    out: dict[str, Any] = {}

    def real() -> None:
        out["lib"] = lab.library(lib, lib_name, timeout=hang)

    t = threading.Thread(target=real)
    t.start()
    opts = lab.options
    if hang is not None:
        from dataclasses import replace
        opts = replace(opts, vc_limit=hang)
    model = lab.model(resolver, model_name, opts)
    t.join()
    time.sleep(0.1)
    lib_flow, model_flow = cap.flow(lib_name), cap.flow(model_name)
    lib_shape = shape(lib_flow, lib_flow[0].at) if lib_flow else []
    model_shape = shape(model_flow, model_flow[0].at) if model_flow else []
    return out["lib"], model, lib_shape, model_shape


def _same_shape(lib_shape: list[Any], model_shape: list[Any]) -> None:
    assert [s[1:] for s in model_shape] == [s[1:] for s in lib_shape], (lib_shape, model_shape)
    for (t_lib, *_), (t_model, *_) in zip(lib_shape, model_shape, strict=True):
        assert abs(t_lib - t_model) < TIME_TOLERANCE, (lib_shape, model_shape)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("resolver", list(VARIANTS))
def test_model_matches_library_on_the_wire(resolver: str, scenario: str) -> None:
    """The model's packets, result and wait are the real library's, healthy and under each fault."""
    _need()
    lib, options = VARIANTS[resolver]
    behaviour, base = SCENARIOS[scenario]
    hangs = resolver == "glibc-use-vc" and scenario in ("aaaa-answer-always-dropped", "both-dropped")
    with WireLab(behaviour, " ".join(o for o in (base, options) if o)) as lab:
        cap = lab.start_capture()
        real, model, lib_shape, model_shape = _side_by_side(lab, cap, resolver, lib, scenario,
                                                            hang=HANG if hangs else None)
    _same_shape(lib_shape, model_shape)
    if hangs:
        # glibc would wait for ever; the model gives up at its limit and calls it failed
        assert real is None, f"glibc use-vc returned {real} instead of hanging"
        assert model.result == "failed" and model.duration >= HANG - 0.1
        return
    assert real is not None
    assert model.result == real.result, (real, model)
    assert abs(model.duration - real.seconds) < TIME_TOLERANCE, (real, model)


def test_glibc_sticky_fallback_in_a_long_lived_process() -> None:
    """After one half-answered pair a glibc process sends every later pair one query at a time."""
    _need()
    from exporter.dns.models import GlibcState
    with WireLab(Behaviour(ignore_first=1, ignore_qtype="AAAA"), FAST) as lab:
        cap = lab.start_capture()
        p = lab.client.exec([lab.exes["glibc"], "sticky-lib.example.", "2"], timeout=60)
        real = [clookup.parse(line) for line in p.stdout.strip().splitlines()]
        state = GlibcState()
        models = [lab.model("glibc-sticky", f"n{i}.sticky-model.example.", state=state) for i in range(2)]
        time.sleep(0.1)
        flows = [(cap.flow(f"n{i}.sticky-lib.example"), cap.flow(f"n{i}.sticky-model.example")) for i in range(2)]
    assert [r.result for r in real] == [m.result for m in models] == ["ok", "ok"]
    for lib_flow, model_flow in flows:
        _same_shape(shape(lib_flow, lib_flow[0].at), shape(model_flow, model_flow[0].at))
    # the second lookup: A alone first, AAAA only once A's answer is back (single-request)
    for packets in flows[1]:
        a_query = next(p for p in packets if p.out and p.qtype == "A")
        a_answer = next(p for p in packets if not p.out and p.qtype == "A")
        aaaa_query = next(p for p in packets if p.out and p.qtype == "AAAA")
        assert a_query.at < a_answer.at <= aaaa_query.at, packets
    assert state.single_request

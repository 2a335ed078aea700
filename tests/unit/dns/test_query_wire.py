"""Query wires built once per question (exporter/dns/resolver.make_query) against dnspython's own.

A user would notice: a probe query that differs from what glibc/musl send (another id, flags or
question), so the server answers another question or the answer is taken for another query's, or
two queries of one lookup sharing an id.
"""

from __future__ import annotations

import dns.message
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.dns.resolver import _make_queries, make_query

_label = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=20)


@settings(max_examples=300, deadline=None)
@given(st.lists(_label, min_size=1, max_size=5), st.sampled_from(["A", "AAAA", "SRV", "PTR"]),
       st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
def test_same_bytes_as_dnspython(labels: list[str], qtype: str, qid: int, other: int) -> None:
    name = ".".join(labels) + "."
    make_query(name, qtype, other)  # a cached question must not keep an earlier id
    msg, wire = make_query(name, qtype, qid)
    assert wire == dns.message.make_query(name, qtype, use_edns=False, id=qid).to_wire()
    assert str(msg.question[0].name) == name and dns.message.from_wire(wire).id == qid


def test_a_lookup_s_queries_have_their_own_ids_and_wires() -> None:
    a, aaaa = _make_queries("kubernetes.default.svc.cluster.local.", ("A", "AAAA"))
    assert a.id != aaaa.id
    assert dns.message.from_wire(a.wire).id == a.id and dns.message.from_wire(aaaa.wire).id == aaaa.id

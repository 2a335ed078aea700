"""The kernel-side filter of the event socket: a classic BPF program (SO_ATTACH_FILTER) that lets through
only conntrack events whose original tuple has L4 protocol UDP or TCP and destination port 53.

Why: every conntrack entry of the node produces a NEW and a DESTROY event. A node with heavy non-DNS
churn (tens of thousands of flows per second) would otherwise wake the exporter, copy the message and
make Python parse it, only to drop it. Filtered in the kernel, a dropped event costs a few hundred
nanoseconds in softirq context and never reaches the socket (nor fills its receive buffer).

How: netlink messages have variable layouts (attribute order, IPv4 vs IPv6 sizes), so the program cannot
read the port at a fixed offset. Linux gives classic BPF two helpers for this (`SKF_AD_NLATTR` and
`SKF_AD_NLATTR_NEST`, "A = offset of the attribute of type X, searching from offset A"), the same ones
libnetfilter_conntrack's `nfct_filter` builds on. The walk:

    A = 20 (after nlmsghdr + nfgenmsg)   X = CTA_TUPLE_ORIG      A = nlattr(A, X)       ; 0: drop
    X = CTA_TUPLE_PROTO                   A = nlattr_nest(A, X)   M[0] = A               ; 0: drop
    X = CTA_PROTO_NUM                     A = nlattr_nest(A, X)   A = u8 at A + 4        ; 17 or 6, else drop
    A = M[0]  X = CTA_PROTO_DST_PORT      A = nlattr_nest(A, X)   A = be16 at A + 4      ; 53: accept

The kernel's attribute search masks the NLA_F_NESTED flag, like `nla_type()`. `ret 0` drops the event;
`ret 0xffffffff` keeps it whole. The program is tested against recorded events by a small interpreter
(`tests/unit/dnsflows/bpfvm.py`) and attached to a real socket by the lab tests.
"""

from __future__ import annotations

# classic BPF opcodes (include/uapi/linux/bpf_common.h, filter.h)
BPF_LD, BPF_LDX, BPF_ST, BPF_JMP, BPF_RET, BPF_MISC = 0x00, 0x01, 0x02, 0x05, 0x06, 0x07
BPF_W, BPF_H, BPF_B = 0x00, 0x08, 0x10
BPF_IMM, BPF_ABS, BPF_IND, BPF_MEM = 0x00, 0x20, 0x40, 0x60
BPF_JEQ, BPF_K = 0x10, 0x00
BPF_TAX = 0x00
SKF_AD_OFF = -0x1000
SKF_AD_NLATTR, SKF_AD_NLATTR_NEST = 12, 16

CTA_TUPLE_ORIG, CTA_TUPLE_PROTO, CTA_PROTO_NUM, CTA_PROTO_DST_PORT = 1, 2, 1, 3
ACCEPT = 0xFFFFFFFF
FIRST_ATTR = 20  # nlmsghdr (16) + nfgenmsg (4)

Insn = tuple[int, int, int, int]
LD_IMM, LDX_IMM, LD_ABS = BPF_LD | BPF_W | BPF_IMM, BPF_LDX | BPF_W | BPF_IMM, BPF_LD | BPF_W | BPF_ABS
NLATTR = (SKF_AD_OFF + SKF_AD_NLATTR) & 0xFFFFFFFF
NLATTR_NEST = (SKF_AD_OFF + SKF_AD_NLATTR_NEST) & 0xFFFFFFFF


def dns_port_filter(port: int = 53, protocols: tuple[int, ...] = (17, 6)) -> list[Insn]:
    """The program, as (code, jt, jf, k) instructions. Jumps are resolved from labels below."""
    prog: list[tuple[int, str | int, str | int, int]] = []

    def emit(code: int, k: int = 0, jt: str | int = 0, jf: str | int = 0) -> None:
        prog.append((code, jt, jf, k))

    jeq = BPF_JMP | BPF_JEQ | BPF_K
    emit(LD_IMM, FIRST_ATTR)
    emit(LDX_IMM, CTA_TUPLE_ORIG)
    emit(LD_ABS, NLATTR)
    emit(jeq, 0, "drop", 0)
    emit(LDX_IMM, CTA_TUPLE_PROTO)
    emit(LD_ABS, NLATTR_NEST)
    emit(jeq, 0, "drop", 0)
    emit(BPF_ST, 0)  # M[0] = offset of CTA_TUPLE_PROTO
    emit(LDX_IMM, CTA_PROTO_NUM)
    emit(LD_ABS, NLATTR_NEST)
    emit(jeq, 0, "drop", 0)
    emit(BPF_MISC | BPF_TAX)
    emit(BPF_LD | BPF_B | BPF_IND, 4)  # the protocol number (u8 payload)
    for i, proto in enumerate(protocols):
        emit(jeq, proto, "port", "drop" if i == len(protocols) - 1 else 0)
    prog.append((-1, 0, 0, 0))  # label "port"
    emit(BPF_LD | BPF_W | BPF_MEM, 0)
    emit(LDX_IMM, CTA_PROTO_DST_PORT)
    emit(LD_ABS, NLATTR_NEST)
    emit(jeq, 0, "drop", 0)
    emit(BPF_MISC | BPF_TAX)
    emit(BPF_LD | BPF_H | BPF_IND, 4)  # the port: loads are big-endian, like the attribute
    emit(jeq, port, "accept", "drop")
    prog.append((-2, 0, 0, 0))  # label "accept"
    emit(BPF_RET | BPF_K, ACCEPT)
    prog.append((-3, 0, 0, 0))  # label "drop"
    emit(BPF_RET | BPF_K, 0)
    return _resolve(prog)


def _resolve(prog: list[tuple[int, str | int, str | int, int]]) -> list[Insn]:
    labels: dict[str, int] = {}
    out: list[tuple[int, str | int, str | int, int]] = []
    names = {-1: "port", -2: "accept", -3: "drop"}
    for code, jt, jf, k in prog:
        if code < 0:
            labels[names[code]] = len(out)
        else:
            out.append((code, jt, jf, k))
    resolved: list[Insn] = []
    for pc, (code, jt, jf, k) in enumerate(out):
        def target(j: str | int, pc: int = pc) -> int:
            return labels[j] - pc - 1 if isinstance(j, str) else j
        resolved.append((code, target(jt), target(jf), k))
    return resolved

"""A classic BPF interpreter for the tests: runs a socket-filter program over one netlink message the way
the kernel does (net/core/filter.c), for the instructions `exporter.dnsflows.bpf` uses, including the
netlink attribute helpers SKF_AD_NLATTR and SKF_AD_NLATTR_NEST (`nla_find`, which masks NLA_F_NESTED).
Anything else raises, so a program that needs more than this models fails loudly instead of passing."""

from __future__ import annotations

import struct
from collections.abc import Sequence

SKF_AD_OFF = -0x1000
NLA_TYPE_MASK = 0x3FFF


def _nla_find(pkt: bytes, start: int, end: int, atype: int) -> int:
    p = start
    while p + 4 <= end:
        alen, t = struct.unpack_from("=HH", pkt, p)
        if alen < 4 or p + alen > end:
            return 0
        if t & NLA_TYPE_MASK == atype:
            return p
        p += (alen + 3) & ~3
    return 0


def run(prog: Sequence[tuple[int, int, int, int]], pkt: bytes) -> int:
    """The filter's return value for `pkt` (0 = drop)."""
    a = x = 0
    mem = [0] * 16
    pc = 0
    n = len(pkt)
    while True:
        code, jt, jf, k = prog[pc]
        pc += 1
        if code == 0x00:  # ld #k
            a = k
        elif code == 0x01:  # ldx #k
            x = k
        elif code == 0x02:  # st M[k]
            mem[k] = a
        elif code == 0x60:  # ld M[k]
            a = mem[k]
        elif code == 0x07:  # tax
            x = a
        elif code == 0x20:  # ld [k]: only the netlink ancillary loads are used
            if k == (SKF_AD_OFF + 12) & 0xFFFFFFFF:  # SKF_AD_NLATTR
                a = 0 if n < 4 or a > n - 4 else _nla_find(pkt, a, n, x)
            elif k == (SKF_AD_OFF + 16) & 0xFFFFFFFF:  # SKF_AD_NLATTR_NEST
                if n < 4 or a > n - 4:
                    a = 0
                else:
                    alen = struct.unpack_from("=H", pkt, a)[0]
                    a = 0 if alen > n - a else _nla_find(pkt, a + 4, a + alen, x)
            else:
                raise NotImplementedError(f"ld [{k:#x}]")
        elif code in (0x50, 0x48):  # ldb [x+k], ldh [x+k] (big-endian, like the kernel)
            size = 1 if code == 0x50 else 2
            if x + k + size > n:
                return 0  # out of bounds: the kernel ends the program with 0
            a = pkt[x + k] if size == 1 else struct.unpack_from("!H", pkt, x + k)[0]
        elif code == 0x15:  # jeq #k
            pc += jt if a == k else jf
        elif code == 0x06:  # ret #k
            return k
        else:
            raise NotImplementedError(f"opcode {code:#x}")

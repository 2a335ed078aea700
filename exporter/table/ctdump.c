/*
 * Native twin of exporter/table/parse.py's DumpParser._feed: one conntrack dump datagram per call.
 *
 * Written for this project; called through ctypes (no Python C API, so no headers and no ABI ties to
 * the interpreter). It must give exactly what the Python parser gives for the same bytes, including
 * where it stops and what it has counted when a message is truncated or garbled: the Python code is
 * the reference, and tests/unit/table/test_native.py holds the two equal on recorded dumps and on
 * generated (valid, cut and random) datagrams. Every read is bounds-checked: dumps can be replayed
 * from fixture files.
 *
 * Reads are bounded by `n` (the datagram) as in the Python code, except the two it does with
 * struct.unpack_from past an attribute's end (CTA_PROTO_NUM / CTA_PROTO_DST_PORT shorter than their
 * value): those are bounded by `buflen`, the whole buffer, like struct.unpack_from.
 *
 * Build: gcc -O2 -shared -fPIC -o _ctdump.so ctdump.c (scripts/bootstrap.sh, the Dockerfile).
 */
#include <stdint.h>
#include <string.h>

#include "../netlink.h"

#define ABI_VERSION 1

/* acc[] layout (int64 each), shared with exporter/table/native.py */
#define A_ENTRIES 0
#define A_STALE 1
#define A_INTR 2
#define A_DONE 3
#define A_NORDER 4
#define A_NDNS 5
#define A_DNS_ORDER 6 /* 2 slots: protocol numbers in first-seen order */
#define A_DNS_UDP 8
#define A_DNS_TCP 9
#define A_ERR 10 /* kind, then 3 arguments */
#define A_STATES 16
#define N_SLOTS 784 /* TCP states 0..9 and "other" (10), then 16 + proto * 3 + status */
#define A_ORDER (A_STATES + N_SLOTS)
#define A_SIZE (A_ORDER + N_SLOTS)

/* error kinds (the Python side formats the messages) */
enum {
    E_TRUNCATED = 1,   /* off, mlen, left */
    E_ATTR,            /* a, alen */
    E_TUPLE,           /* p */
    E_PROTO_ATTR,      /* q */
    E_SHORT_STATUS,    /* a */
    E_NO_TUPLE,        /* a */
    E_EMPTY_NEST,      /* p */
    E_UNEXPECTED_ADDR, /* qtype, p + 4 */
    E_TCP_PROTOINFO,   /* q */
    E_ADDR_ATTR,       /* q */
    E_PAST_END,        /* offset, size */
};

struct ctd_ctx {
    int64_t *acc;
    const uint8_t *src4;       /* sorted 4-byte keys */
    const uint32_t *src4_idx;  /* their index in src_counts */
    int64_t n_src4;
    const uint8_t *src16;
    const uint32_t *src16_idx;
    int64_t n_src16;
    int64_t *src_counts;
    const uint8_t *srv4; /* sorted DNS server addresses */
    int64_t n_srv4;
    const uint8_t *srv16;
    int64_t n_srv16;
    int64_t check_servers;
};

#define NLMSG_ERROR 2
#define NLMSG_DONE 3
#define NLM_F_DUMP_INTR 0x10
#define CT_NEW_TYPE 0x100
#define CTA_PROTOINFO 4
#define IPS_SEEN_REPLY 0x2
#define IPS_ASSURED 0x4
#define AF_INET_ 2
#define AF_INET6_ 10

struct parse_error {
    int64_t kind, a, b, c;
};

static int fail(struct parse_error *e, int64_t kind, int64_t a, int64_t b, int64_t c) {
    e->kind = kind; e->a = a; e->b = b; e->c = c;
    return -1;
}

/* Binary search of a `size`-byte key in `n` sorted keys: its position, or -1. */
static int64_t find_key(const uint8_t *keys, int64_t n, const uint8_t *key, size_t size) {
    int64_t lo = 0, hi = n;
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        int c = memcmp(keys + mid * (int64_t)size, key, size);
        if (c == 0) return mid;
        if (c < 0) lo = mid + 1; else hi = mid;
    }
    return -1;
}

/* _protoinfo_tcp_state: CTA_PROTOINFO { CTA_PROTOINFO_TCP { STATE u8 } } at a..end; -1 if none. */
static int protoinfo_tcp_state(const uint8_t *buf, int64_t a, int64_t end, int *state, struct parse_error *e) {
    *state = -1;
    if (a + 8 > end) return 0;
    int64_t plen = rd16(buf + a + 4), ptype = rd16(buf + a + 6);
    if ((ptype & NLA_TYPE_MASK) != 1 || plen < 4 || a + 4 + plen > end) return 0;
    int64_t q = a + 8, qe = a + 4 + plen;
    while (q + 4 <= qe) {
        int64_t qlen = rd16(buf + q), qtype = rd16(buf + q + 2);
        if (qlen < 4 || q + qlen > qe) return fail(e, E_TCP_PROTOINFO, q, 0, 0);
        if ((qtype & NLA_TYPE_MASK) == 1 && qlen >= 5) {
            *state = buf[q + 4];
            return 0;
        }
        q += align4(qlen);
    }
    return 0;
}

/* _tcp_state: walk a..end for CTA_PROTOINFO. */
static int tcp_state_walk(const uint8_t *buf, int64_t a, int64_t end, int *state, struct parse_error *e) {
    *state = -1;
    while (a + 4 <= end) {
        int64_t alen = rd16(buf + a), atype = rd16(buf + a + 2);
        if (alen < 4 || a + alen > end) return fail(e, E_ATTR, a, alen, 0);
        if ((atype & NLA_TYPE_MASK) == CTA_PROTOINFO) return protoinfo_tcp_state(buf, a, a + alen, state, e);
        a += align4(alen);
    }
    return 0;
}

/* _tuple_address: the source (or destination) address of the tuple at `at`; *len 0, 4 or 16. */
static int tuple_address(const uint8_t *buf, int64_t at, int64_t msg_end, int dst, const uint8_t **addr,
                         int *len, struct parse_error *e) {
    *len = 0;
    int64_t alen = rd16(buf + at), end = at + alen;
    if (alen < 4 || end > msg_end) return fail(e, E_TUPLE, at, 0, 0);
    int want4 = dst ? CTA_IP_V4_DST : CTA_IP_V4_SRC, want6 = dst ? CTA_IP_V6_DST : CTA_IP_V6_SRC;
    int64_t p = at + 4;
    while (p + 4 <= end) {
        int64_t plen = rd16(buf + p), ptype = rd16(buf + p + 2);
        if (plen < 4 || p + plen > end) return fail(e, E_TUPLE, p, 0, 0);
        if ((ptype & NLA_TYPE_MASK) == CTA_TUPLE_IP) {
            int64_t q = p + 4, qe = p + plen;
            while (q + 4 <= qe) {
                int64_t qlen = rd16(buf + q), qtype = rd16(buf + q + 2) & NLA_TYPE_MASK;
                if (qlen < 4 || q + qlen > qe) return fail(e, E_ADDR_ATTR, q, 0, 0);
                if (qtype == want4 && qlen == 8) { *addr = buf + q + 4; *len = 4; return 0; }
                if (qtype == want6 && qlen == 20) { *addr = buf + q + 4; *len = 16; return 0; }
                q += align4(qlen);
            }
            return 0;
        }
        p += align4(plen);
    }
    return 0;
}

static int is_server(const struct ctd_ctx *ctx, const uint8_t *addr, int len) {
    if (len == 4) return find_key(ctx->srv4, ctx->n_srv4, addr, 4) >= 0;
    if (len == 16) return find_key(ctx->srv16, ctx->n_srv16, addr, 16) >= 0;
    return 0; /* b"": never a server (the Python side only passes 4- and 16-byte keys) */
}

struct entry {
    int proto, dport, tcp_state;
    uint32_t status;
    const uint8_t *src;
    int src_len;
    int64_t orig_at, reply_at;
};

/* _slow_entry: walk one entry's attributes from a to end. */
static int slow_entry(const uint8_t *buf, int64_t buflen, int64_t a, int64_t end, struct entry *en,
                      struct parse_error *e) {
    int64_t proto = -1, dport = -1, status = -1;
    en->tcp_state = -1; en->orig_at = -1; en->reply_at = -1; en->src = 0; en->src_len = 0;
    while (a + 4 <= end) {
        int64_t alen = rd16(buf + a), atype = rd16(buf + a + 2);
        if (alen < 4 || a + alen > end) return fail(e, E_ATTR, a, alen, 0);
        atype &= NLA_TYPE_MASK;
        if (atype == CTA_TUPLE_ORIG) {
            en->orig_at = a;
            int64_t te = a + alen, p = a + 4;
            while (p + 4 <= te) {
                int64_t plen = rd16(buf + p), ptype = rd16(buf + p + 2), pe = p + plen;
                if (plen < 4 || pe > te) return fail(e, E_TUPLE, p, 0, 0);
                ptype &= NLA_TYPE_MASK;
                if (ptype == CTA_TUPLE_IP) {
                    /* _first_address */
                    if (p + 8 > pe) return fail(e, E_EMPTY_NEST, p, 0, 0);
                    int64_t qlen = rd16(buf + p + 4), qtype = rd16(buf + p + 6) & NLA_TYPE_MASK;
                    if (qtype == CTA_IP_V4_SRC && qlen == 8 && p + 12 <= pe) {
                        en->src = buf + p + 8; en->src_len = 4;
                    } else if (qtype == CTA_IP_V6_SRC && qlen == 20 && p + 24 <= pe) {
                        en->src = buf + p + 8; en->src_len = 16;
                    } else {
                        return fail(e, E_UNEXPECTED_ADDR, qtype, p + 4, 0);
                    }
                } else if (ptype == CTA_TUPLE_PROTO) {
                    int64_t q = p + 4;
                    while (q + 4 <= pe) {
                        int64_t qlen = rd16(buf + q), qtype = rd16(buf + q + 2);
                        if (qlen < 4 || q + qlen > pe) return fail(e, E_PROTO_ATTR, q, 0, 0);
                        qtype &= NLA_TYPE_MASK;
                        if (qtype == CTA_PROTO_NUM) {
                            if (q + 5 > buflen) return fail(e, E_PAST_END, q + 4, 1, 0);
                            proto = buf[q + 4];
                        } else if (qtype == CTA_PROTO_DST_PORT) {
                            if (q + 6 > buflen) return fail(e, E_PAST_END, q + 4, 2, 0);
                            dport = be16(buf + q + 4);
                        }
                        q += align4(qlen);
                    }
                }
                p += align4(plen);
            }
        } else if (atype == CTA_TUPLE_REPLY) {
            en->reply_at = a;
        } else if (atype == CTA_STATUS) {
            if (alen < 8) return fail(e, E_SHORT_STATUS, a, 0, 0);
            status = be32(buf + a + 4);
        } else if (atype == CTA_PROTOINFO) {
            if (protoinfo_tcp_state(buf, a, a + alen, &en->tcp_state, e) < 0) return -1;
        }
        a += align4(alen);
    }
    if (proto < 0 || status < 0) return fail(e, E_NO_TUPLE, a, 0, 0);
    en->proto = (int)proto; en->dport = (int)dport; en->status = (uint32_t)status;
    return 0;
}

static void count_state(int64_t *acc, int slot) {
    if (acc[A_STATES + slot]++ == 0) acc[A_ORDER + acc[A_NORDER]++] = slot;
}

static void count_dns(int64_t *acc, int proto) {
    int64_t *c = &acc[proto == PROTO_UDP ? A_DNS_UDP : A_DNS_TCP];
    if ((*c)++ == 0) acc[A_DNS_ORDER + acc[A_NDNS]++] = proto;
}

static void count_source(const struct ctd_ctx *ctx, const uint8_t *src, int len) {
    int64_t i = -1;
    if (len == 4) {
        i = find_key(ctx->src4, ctx->n_src4, src, 4);
        if (i >= 0) ctx->src_counts[ctx->src4_idx[i]]++;
    } else if (len == 16) {
        i = find_key(ctx->src16, ctx->n_src16, src, 16);
        if (i >= 0) ctx->src_counts[ctx->src16_idx[i]]++;
    }
}

/* One datagram: 0 = more to come, 1 = NLMSG_DONE (or an ACK) seen, -1 = parse error (acc[A_ERR..]),
 * -2 = an error reply (its errno in acc[A_ERR + 1]). Counters accumulate in ctx->acc. */
int ctd_feed(const struct ctd_ctx *ctx, const uint8_t *buf, int64_t buflen, int64_t n) {
    int64_t *acc = ctx->acc;
    int count_sources = ctx->n_src4 + ctx->n_src16 > 0;
    struct parse_error e = {0, 0, 0, 0};
    int64_t off = 0;
    int rc = 0;
    if (n > buflen) n = buflen; /* the wrapper never passes more */
    while (off + 16 <= n) {
        struct entry en;
        int fast = 0;
        int64_t mlen = 0, end = 0;
        uint16_t mflags = 0;
        /* fast path: the fixed layouts of IPv4/IPv6 TCP and UDP entries without zones */
        if (off + 17 <= n) {
            int fam = buf[off + 16];
            int64_t size = 0, reply_off = 0;
            uint16_t tlen = 0, ilen = 0, slen = 0, src_type = 0, src_len = 0;
            int64_t p_at = 0;
            if (fam == AF_INET_) {
                size = 132; reply_off = 72; tlen = 52; ilen = 20; slen = 8; src_type = CTA_IP_V4_SRC;
                src_len = 4; p_at = 44;
            } else if (fam == AF_INET6_) {
                size = 180; reply_off = 96; tlen = 76; ilen = 44; slen = 20; src_type = CTA_IP_V6_SRC;
                src_len = 16; p_at = 68;
            }
            if (size && off + size <= n) {
                const uint8_t *m = buf + off;
                mlen = rd32(m);
                if (rd16(m + 4) == CT_NEW_TYPE && hdr_is(m + 20, tlen, CTA_TUPLE_ORIG | NLA_F_NESTED)
                    && hdr_is(m + 24, ilen, CTA_TUPLE_IP | NLA_F_NESTED) && hdr_is(m + 28, slen, src_type)
                    && hdr_is(m + p_at, 28, CTA_TUPLE_PROTO | NLA_F_NESTED)
                    && hdr_is(m + p_at + 4, 5, CTA_PROTO_NUM) && hdr_is(m + p_at + 20, 6, CTA_PROTO_DST_PORT)
                    && hdr_is(m + reply_off, tlen, CTA_TUPLE_REPLY | NLA_F_NESTED)
                    && hdr_is(m + size - 8, 8, CTA_STATUS) && mlen >= size && off + mlen <= n) {
                    fast = 1;
                    mflags = rd16(m + 6);
                    end = off + mlen;
                    int64_t tail = off + size;
                    en.proto = m[p_at + 8];
                    en.dport = be16(m + p_at + 24);
                    en.status = be32(m + size - 4);
                    en.src = m + 32;
                    en.src_len = src_len;
                    en.orig_at = off + 20;
                    en.reply_at = off + reply_off;
                    en.tcp_state = -1;
                    if (en.proto == PROTO_TCP) {
                        int64_t t = tail + 32;
                        if (t + 13 <= end && hdr_is(buf + t, 48, CTA_PROTOINFO | NLA_F_NESTED)
                            && hdr_is(buf + t + 4, 44, 1 | NLA_F_NESTED) && hdr_is(buf + t + 8, 5, 1))
                            en.tcp_state = buf[t + 12];
                        if (en.tcp_state < 0 && tcp_state_walk(buf, tail, end, &en.tcp_state, &e) < 0) {
                            rc = -1;
                            break;
                        }
                    }
                }
            }
        }
        if (!fast) {
            const uint8_t *m = buf + off;
            mlen = rd32(m);
            uint16_t mtype = rd16(m + 4);
            mflags = rd16(m + 6);
            end = off + mlen;
            if (mlen < 16 || end > n) {
                fail(&e, E_TRUNCATED, off, mlen, n - off);
                rc = -1;
                break;
            }
            if (mtype != CT_NEW_TYPE) {
                if (mtype == NLMSG_DONE) {
                    acc[A_DONE] = 1;
                    rc = 1;
                    break;
                }
                if (mtype == NLMSG_ERROR) {
                    int64_t err = mlen >= 20 ? -(int64_t)rdi32(m + 16) : 5 /* EIO */;
                    if (err) {
                        e.kind = 0; e.a = err;
                        rc = -2;
                        break;
                    }
                    acc[A_DONE] = 1;
                    rc = 1;
                    break;
                }
                off += align4(mlen);
                continue;
            }
            if (slow_entry(buf, buflen, off + 20, end, &en, &e) < 0) {
                rc = -1;
                break;
            }
        }
        int status = (en.status & IPS_ASSURED) ? 2 : (en.status & IPS_SEEN_REPLY) ? 1 : 0;
        int slot;
        if (en.proto == PROTO_TCP)
            slot = (en.tcp_state >= 0 && en.tcp_state < 10) ? en.tcp_state : 10;
        else
            slot = 16 + en.proto * 3 + status;
        if (mflags & NLM_F_DUMP_INTR) acc[A_INTR] = 1;
        count_state(acc, slot);
        if (en.dport == 53 && (en.proto == PROTO_UDP || en.proto == PROTO_TCP)) {
            count_dns(acc, en.proto);
            if (ctx->check_servers && en.proto == PROTO_UDP && en.reply_at >= 0) {  /* UDP only: see parse.py */
                const uint8_t *addr = 0;
                int len = 0;
                if (tuple_address(buf, en.orig_at, end, 1, &addr, &len, &e) < 0) { rc = -1; break; }
                if (is_server(ctx, addr, len)) {
                    if (tuple_address(buf, en.reply_at, end, 0, &addr, &len, &e) < 0) { rc = -1; break; }
                    if (!is_server(ctx, addr, len)) acc[A_STALE]++;
                }
            }
        }
        if (count_sources) count_source(ctx, en.src, en.src_len);
        acc[A_ENTRIES]++;
        off += align4(mlen);
    }
    if (rc == -1 || rc == -2) {
        acc[A_ERR] = e.kind; acc[A_ERR + 1] = e.a; acc[A_ERR + 2] = e.b; acc[A_ERR + 3] = e.c;
    }
    return rc;
}

int64_t ctd_abi(void) { return ABI_VERSION * 1000000 + (int64_t)sizeof(struct ctd_ctx) * 1000 + A_SIZE % 1000; }

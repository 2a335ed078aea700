/*
 * Native drain of the DNS flow listener's event socket: exporter/dnsflows/listener.py's Python `_drain`
 * (one recv per datagram, exporter/dnsflows/parse.py's `parse_events` on each) in one call.
 *
 * Written for this project; called through ctypes (exporter/dnsflows/native.py), no Python C API. It reads
 * up to `max_read` datagrams from the socket without waiting (recv with MSG_DONTWAIT into one buffer, as
 * the Python loop does), parses each exactly as `parse_events` does (the fixed-offset IPv4 fast path with
 * the same header checks, else the same attribute walk; the same "other" counting; a garbled datagram
 * keeps the events read before the fault, loses its other count and counts as one other) and writes one
 * fixed-size record per DNS event:
 *
 *   - an event whose three addresses (original source and destination, reply source) are 4 bytes long goes
 *     into rec4, 24 bytes laid out as struct "=?B4s4sH4sII" (is NEW, proto, src, dst, sport, reply src,
 *     status, id: the parse.Event tuple, host byte order);
 *   - three 16-byte addresses: into rec6, 60 bytes, "=?B16s16sH16sII";
 *   - runs[] keeps the order between the two: the lengths of alternating runs, IPv4 first (possibly 0).
 *
 * A datagram that holds an event of any other shape (an address missing or of another length: garbled
 * data, the kernel never sends it) or more events than the record buffers have room for is handed back
 * unparsed: its records are taken back, it stays in buf, and the call returns CTE_HANDBACK for the Python
 * parser to read it. tests/unit/dnsflows/test_native.py holds this equal to `parse_events` on recorded
 * events and on generated datagrams fed through a real socket.
 *
 * Build: gcc -O2 -Wall -Wextra -Werror -shared -fPIC -o _ctevents.so ctevents.c (scripts/bootstrap.sh,
 * the Dockerfile).
 */
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>

#include "../netlink.h"

#define ABI_VERSION 1

/* return values of cte_drain; exporter/dnsflows/native.py has the same */
#define CTE_DRAINED 0  /* nothing more queued (EAGAIN), or a zero-length datagram (as the Python loop) */
#define CTE_LIMIT 1    /* max_read datagrams read */
#define CTE_ENOBUFS 2  /* the receive buffer overflowed: events were lost */
#define CTE_ERROR 3    /* another errno (in ctx->err) */
#define CTE_FULL 4     /* the record buffers are full: nothing more was read */
#define CTE_HANDBACK 5 /* the last datagram read (ctx->handback bytes in buf) is for the Python parser */

#define REC4_SIZE 24
#define REC6_SIZE 60

struct cte_ctx {
    uint8_t *buf; /* receive buffer (the Python loop's: 64 KiB) */
    int64_t buflen;
    uint8_t *rec4;
    int64_t cap4; /* records */
    uint8_t *rec6;
    int64_t cap6;
    int64_t *runs;
    int64_t cap_runs;
    /* results of one call */
    int64_t read;     /* datagrams read (a handed-back one included) */
    int64_t n4, n6;   /* records written */
    int64_t nruns;    /* entries of runs[] in use */
    int64_t other;    /* messages that were no DNS flow, plus one per garbled datagram */
    int64_t garbled;  /* garbled datagrams */
    int64_t err;      /* errno of CTE_ERROR */
    int64_t handback; /* length of the handed-back datagram */
    int64_t fault[4]; /* the first garbled datagram's fault: kind, offset, length, bytes left */
};

/* fault kinds: the ParseError messages of parse.py (native.py formats them) */
enum { F_MESSAGE = 1, F_ATTR, F_TUPLE, F_ADDR, F_PROTO };

#define CT_NEW 0x100
#define CT_DELETE 0x102
#define CTA_ID 12
#define CTA_PROTO_SRC_PORT 2
#define DNS_PORT 53
#define AF_INET_ 2
#define FAST4_SIZE 140

/* An address as parse.py holds it: bytes(buf[at:at + len]); len 0 is b"". */
struct addr {
    const uint8_t *at;
    int64_t len;
};

/* One DNS event: parse.Event. */
struct event {
    int is_new, proto;
    uint16_t sport;
    uint32_t status, ct_id;
    struct addr src, dst, rsrc;
};

struct fault {
    int64_t kind, off, len, left;
};

static int fail(struct fault *f, int64_t kind, int64_t off, int64_t len) {
    f->kind = kind; f->off = off; f->len = len;
    return -1;
}

/* parse._tuple: (src, dst, proto, sport, dport) of a CTA_TUPLE_* payload from p to end. */
static int tuple(const uint8_t *buf, int64_t p, int64_t end, struct addr *src, struct addr *dst, int *proto,
                 int *sport, int *dport, struct fault *f) {
    src->len = dst->len = 0;
    src->at = dst->at = buf;
    *proto = *sport = *dport = 0;
    while (p + 4 <= end) {
        int64_t alen = rd16(buf + p), atype = rd16(buf + p + 2) & NLA_TYPE_MASK;
        if (alen < 4 || p + alen > end) return fail(f, F_TUPLE, p, alen);
        int64_t q = p + 4, qe = p + alen;
        if (atype == CTA_TUPLE_IP) {
            while (q + 4 <= qe) {
                int64_t qlen = rd16(buf + q), qtype = rd16(buf + q + 2) & NLA_TYPE_MASK;
                if (qlen < 4 || q + qlen > qe) return fail(f, F_ADDR, q, 0);
                if (qtype == CTA_IP_V4_SRC || qtype == CTA_IP_V6_SRC) {
                    src->at = buf + q + 4; src->len = qlen - 4;
                } else if (qtype == CTA_IP_V4_DST || qtype == CTA_IP_V6_DST) {
                    dst->at = buf + q + 4; dst->len = qlen - 4;
                }
                q += align4(qlen);
            }
        } else if (atype == CTA_TUPLE_PROTO) {
            while (q + 4 <= qe) {
                int64_t qlen = rd16(buf + q), qtype = rd16(buf + q + 2) & NLA_TYPE_MASK;
                if (qlen < 4 || q + qlen > qe) return fail(f, F_PROTO, q, 0);
                if (qtype == CTA_PROTO_NUM && qlen >= 5) *proto = buf[q + 4];
                else if (qtype == CTA_PROTO_SRC_PORT && qlen >= 6) *sport = be16(buf + q + 4);
                else if (qtype == CTA_PROTO_DST_PORT && qlen >= 6) *dport = be16(buf + q + 4);
                q += align4(qlen);
            }
        }
        p += align4(alen);
    }
    return 0;
}

/* parse._walk: 1 and *ev for a DNS flow, 0 for none, -1 on a garbled message. */
static int walk(const uint8_t *buf, int64_t off, int64_t end, struct event *ev, struct fault *f) {
    int64_t p = off + 20;
    int proto = 0, sport = 0, dport = 0, seen_orig = 0;
    struct addr unused;
    int unused_proto, unused_sport, unused_dport;
    ev->status = ev->ct_id = 0;
    ev->src.len = ev->dst.len = ev->rsrc.len = 0;
    ev->src.at = ev->dst.at = ev->rsrc.at = buf;
    while (p + 4 <= end) {
        int64_t alen = rd16(buf + p), atype = rd16(buf + p + 2) & NLA_TYPE_MASK;
        if (alen < 4 || p + alen > end) return fail(f, F_ATTR, p, alen);
        if (atype == CTA_TUPLE_ORIG) {
            if (tuple(buf, p + 4, p + alen, &ev->src, &ev->dst, &proto, &sport, &dport, f) < 0) return -1;
            if (dport != DNS_PORT || (proto != PROTO_UDP && proto != PROTO_TCP)) return 0;
            seen_orig = 1;
        } else if (atype == CTA_TUPLE_REPLY) {
            if (tuple(buf, p + 4, p + alen, &ev->rsrc, &unused, &unused_proto, &unused_sport, &unused_dport, f) < 0)
                return -1;
        } else if (atype == CTA_STATUS && alen >= 8) {
            ev->status = be32(buf + p + 4);
        } else if (atype == CTA_ID && alen >= 8) {
            ev->ct_id = be32(buf + p + 4);
        }
        p += align4(alen);
    }
    if (!seen_orig) return 0;
    ev->proto = proto;
    ev->sport = (uint16_t)sport;
    return 1;
}

/* The fast path's layout (parse._FAST4): every header at its fixed offset. */
static int fast4(const uint8_t *m) {
    return hdr_is(m + 20, 52, CTA_TUPLE_ORIG | NLA_F_NESTED) && hdr_is(m + 24, 20, CTA_TUPLE_IP | NLA_F_NESTED)
        && hdr_is(m + 28, 8, CTA_IP_V4_SRC) && hdr_is(m + 36, 8, CTA_IP_V4_DST)
        && hdr_is(m + 44, 28, CTA_TUPLE_PROTO | NLA_F_NESTED) && hdr_is(m + 48, 5, CTA_PROTO_NUM)
        && hdr_is(m + 56, 6, CTA_PROTO_SRC_PORT) && hdr_is(m + 64, 6, CTA_PROTO_DST_PORT)
        && hdr_is(m + 72, 52, CTA_TUPLE_REPLY | NLA_F_NESTED) && hdr_is(m + 76, 20, CTA_TUPLE_IP | NLA_F_NESTED)
        && hdr_is(m + 80, 8, CTA_IP_V4_SRC) && hdr_is(m + 124, 8, CTA_ID) && hdr_is(m + 132, 8, CTA_STATUS);
}

/* Where the records go (a copy is kept at each datagram's start, to take its records back). runs[] starts
 * with an IPv4 run, maybe empty; the last run is the open one. */
struct out {
    struct cte_ctx *ctx;
    int64_t n4, n6, nruns, family; /* family of the open run: 4 or 6 */
};

static int open_run(struct out *o, int family) {
    if (o->family == family) return 0;
    if (o->nruns >= o->ctx->cap_runs) return -1;
    o->ctx->runs[o->nruns++] = 0;
    o->family = family;
    return 0;
}

/* One record: is NEW, proto, src, dst, sport, reply src, status, id (REC4 or REC6 of native.py). */
static void record(uint8_t *r, const struct event *ev, size_t len) {
    r[0] = (uint8_t)ev->is_new;
    r[1] = (uint8_t)ev->proto;
    memcpy(r + 2, ev->src.at, len);
    memcpy(r + 2 + len, ev->dst.at, len);
    memcpy(r + 2 + 2 * len, &ev->sport, 2);
    memcpy(r + 4 + 2 * len, ev->rsrc.at, len);
    memcpy(r + 4 + 3 * len, &ev->status, 4);
    memcpy(r + 8 + 3 * len, &ev->ct_id, 4);
}

/* 0 written, -1 not representable or no room: the datagram is handed back. */
static int put(struct out *o, const struct event *ev) {
    struct cte_ctx *ctx = o->ctx;
    int64_t len = ev->src.len;
    if ((len != 4 && len != 16) || ev->dst.len != len || ev->rsrc.len != len) return -1;
    if (len == 4) {
        if (o->n4 >= ctx->cap4 || open_run(o, 4) < 0) return -1;
        record(ctx->rec4 + o->n4++ * REC4_SIZE, ev, 4);
    } else {
        if (o->n6 >= ctx->cap6 || open_run(o, 6) < 0) return -1;
        record(ctx->rec6 + o->n6++ * REC6_SIZE, ev, 16);
    }
    ctx->runs[o->nruns - 1]++;
    return 0;
}

/* parse.parse_events on buf[:n]: the other count (>= 0), -1 garbled (records so far kept, *f says where),
 * -2 hand back (records of this datagram not kept). */
static int64_t parse(const uint8_t *buf, int64_t n, struct out *o, struct fault *f) {
    int64_t off = 0, other = 0;
    while (off + 16 <= n) {
        const uint8_t *m = buf + off;
        int64_t mlen = rd32(m);
        uint16_t mtype = rd16(m + 4);
        if (mlen < 16 || off + mlen > n) {
            f->left = n - off;
            return fail(f, F_MESSAGE, off, mlen);
        }
        if (mtype != CT_NEW && mtype != CT_DELETE) {
            other++;
            off += align4(mlen);
            continue;
        }
        struct event ev;
        int found;
        if (mlen >= FAST4_SIZE && m[16] == AF_INET_ && fast4(m)) {
            uint16_t dport = be16(m + 68);
            found = dport == DNS_PORT && (m[52] == PROTO_UDP || m[52] == PROTO_TCP);
            if (found) {
                ev.proto = m[52];
                ev.src.at = m + 32; ev.dst.at = m + 40; ev.rsrc.at = m + 84;
                ev.src.len = ev.dst.len = ev.rsrc.len = 4;
                ev.sport = be16(m + 60);
                ev.ct_id = be32(m + 128);
                ev.status = be32(m + 136);
            }
        } else {
            found = walk(buf, off, off + mlen, &ev, f);
            if (found < 0) return -1;
        }
        if (!found) {
            other++;
        } else {
            ev.is_new = mtype == CT_NEW;
            if (put(o, &ev) < 0) return -2;
        }
        off += align4(mlen);
    }
    return other;
}

int cte_drain(struct cte_ctx *ctx, int fd, int64_t max_read) {
    struct out o = {ctx, 0, 0, 1, 4};
    ctx->read = ctx->other = ctx->garbled = ctx->err = ctx->handback = 0;
    memset(ctx->fault, 0, sizeof ctx->fault);
    ctx->n4 = ctx->n6 = ctx->nruns = 0;
    if (ctx->cap_runs < 1) return CTE_FULL;
    ctx->runs[0] = 0;
    int rc = CTE_LIMIT;
    while (ctx->read < max_read) {
        /* room for one more event of either family (a datagram holds one event, as the kernel sends them) */
        if (o.n4 >= ctx->cap4 || o.n6 >= ctx->cap6 || o.nruns >= ctx->cap_runs) {
            rc = CTE_FULL;
            break;
        }
        ssize_t n = recv(fd, ctx->buf, (size_t)ctx->buflen, MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EINTR) continue; /* as Python's recv_into (PEP 475) */
            if (errno == EAGAIN || errno == EWOULDBLOCK) rc = CTE_DRAINED;
            else if (errno == ENOBUFS) rc = CTE_ENOBUFS;
            else { rc = CTE_ERROR; ctx->err = errno; }
            break;
        }
        if (n == 0) { /* the Python loop stops there too, without counting it */
            rc = CTE_DRAINED;
            break;
        }
        ctx->read++;
        struct out mark = o;
        int64_t mark_run = ctx->runs[o.nruns - 1];
        struct fault f = {0, 0, 0, 0};
        int64_t other = parse(ctx->buf, (int64_t)n, &o, &f);
        if (other == -2) {
            o = mark;
            ctx->runs[o.nruns - 1] = mark_run;
            ctx->handback = n;
            rc = CTE_HANDBACK;
            break;
        }
        if (other == -1) {
            ctx->other++;
            if (ctx->garbled++ == 0) {
                ctx->fault[0] = f.kind; ctx->fault[1] = f.off; ctx->fault[2] = f.len; ctx->fault[3] = f.left;
            }
        } else {
            ctx->other += other;
        }
    }
    ctx->n4 = o.n4;
    ctx->n6 = o.n6;
    ctx->nruns = o.nruns;
    return rc;
}

int64_t cte_abi(void) {
    return ABI_VERSION * 1000000 + (int64_t)sizeof(struct cte_ctx) * 1000 + REC4_SIZE * 10 + REC6_SIZE % 10;
}

/*
 * Reads of netlink bytes for the native pieces (exporter/table/ctdump.c, exporter/dnsflows/ctevents.c),
 * the C twin of exporter/netlink.py's layer: every read through memcpy or bytes (no unaligned access),
 * netlink headers in host order, attribute values in network order. Included by path ("../netlink.h");
 * nothing here is compiled on its own.
 */
#ifndef EXPORTER_NETLINK_H
#define EXPORTER_NETLINK_H

#include <stdint.h>
#include <string.h>

#define NLA_TYPE_MASK 0x3FFF
#define NLA_F_NESTED 0x8000

/* ctnetlink attributes both read (linux/netfilter/nfnetlink_conntrack.h) */
#define CTA_TUPLE_ORIG 1
#define CTA_TUPLE_REPLY 2
#define CTA_STATUS 3
#define CTA_TUPLE_IP 1
#define CTA_TUPLE_PROTO 2
#define CTA_IP_V4_SRC 1
#define CTA_IP_V4_DST 2
#define CTA_IP_V6_SRC 3
#define CTA_IP_V6_DST 4
#define CTA_PROTO_NUM 1
#define CTA_PROTO_DST_PORT 3
#define PROTO_TCP 6
#define PROTO_UDP 17

static inline uint16_t rd16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint32_t rd32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline int32_t rdi32(const uint8_t *p) { int32_t v; memcpy(&v, p, 4); return v; }
static inline uint16_t be16(const uint8_t *p) { return (uint16_t)((p[0] << 8) | p[1]); }
static inline uint32_t be32(const uint8_t *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}
/* an attribute header (u16 length, u16 type) equal to these */
static inline int hdr_is(const uint8_t *p, uint16_t len, uint16_t type) {
    return rd16(p) == len && rd16(p + 2) == type;
}
static inline int64_t align4(int64_t x) { return (x + 3) & ~(int64_t)3; }

#endif

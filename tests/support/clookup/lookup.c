/* One getaddrinfo(name, AF_UNSPEC) as an application does it, timed; built against glibc (gcc) and
 * musl (musl-gcc -static) by tests/support/clookup/__init__.py. Prints one line per lookup:
 *   <result> <seconds> <rc> <families>
 * result: ok (IPv4 and IPv6 addresses), partial (one family), failed (getaddrinfo returned an error).
 * With a count argument N it does N lookups of "<i>.<name>" in one process (glibc keeps its resolver
 * state between them: the sticky single-request fallback). */
#define _GNU_SOURCE
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void one(const char *name) {
    struct addrinfo hints, *res = NULL, *ai;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_DGRAM;
    double t0 = now();
    int rc = getaddrinfo(name, NULL, &hints, &res);
    double dt = now() - t0;
    int v4 = 0, v6 = 0;
    if (rc == 0)
        for (ai = res; ai; ai = ai->ai_next) {
            if (ai->ai_family == AF_INET) v4 = 1;
            if (ai->ai_family == AF_INET6) v6 = 1;
        }
    const char *result = rc != 0 ? "failed" : (v4 && v6) ? "ok" : (v4 || v6) ? "partial" : "failed";
    printf("%s %.6f %d %s%s\n", result, dt, rc, v4 ? "4" : "", v6 ? "6" : "");
    fflush(stdout);
    if (res) freeaddrinfo(res);
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: lookup NAME [COUNT]\n");
        return 2;
    }
    if (argc < 3) {
        one(argv[1]);
        return 0;
    }
    int n = atoi(argv[2]);
    char buf[512];
    for (int i = 0; i < n; i++) {
        snprintf(buf, sizeof buf, "n%d.%s", i, argv[1]);
        one(buf);
    }
    return 0;
}

/*
 * The parallel A/AAAA race for the lab (tests/lab/race.py runs it in the pod's namespace).
 *
 * Two threads, pinned to two CPUs, spin on a shared round counter and send the A and the AAAA query for
 * one name from one fresh connected UDP socket per pair at the same instant, as glibc and musl do. Spinning
 * (not sleeping on a barrier) keeps both CPUs awake, so the two packets really are processed at once; the
 * Python version lost its clashes when a vCPU took long to wake (the GIL hand-off made it worse).
 * The first thread then collects the answers (up to TIMEOUT ms).
 *
 * Usage: racer SERVER PORT NAME PAIRS SECONDS TIMEOUT_MS CPU0 CPU1   (PAIRS or SECONDS 0: no limit)
 * Runs until a limit or SIGTERM/SIGINT; prints "pairs answers lost" on stdout at the end.
 * Written for this project.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static struct sockaddr_in server;
static unsigned char qa[300], qaaaa[300];
static size_t qlen;
static long limit_pairs;
static double limit_seconds;
static int timeout_ms;
static int cpus[2];

static atomic_int go;       /* round number both threads send in */
static atomic_int sent;     /* rounds the second thread has sent in */
static atomic_int stop;
static int fd = -1;
static long pairs, answers, lost;

static void on_signal(int sig) { (void)sig; atomic_store(&stop, 1); }

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static size_t encode(unsigned char *q, const char *name, int qtype) {
    size_t n = 12;
    memset(q, 0, 12);
    q[2] = 0x01; /* RD */
    q[5] = 1;    /* one question */
    const char *p = name;
    while (*p) {
        const char *dot = strchr(p, '.');
        size_t len = dot ? (size_t)(dot - p) : strlen(p);
        if (len == 0 || len > 63 || n + len + 6 > 300) break;
        q[n++] = (unsigned char)len;
        memcpy(q + n, p, len);
        n += len;
        p += len;
        if (*p == '.') p++;
    }
    q[n++] = 0;
    q[n++] = 0; q[n++] = (unsigned char)qtype;
    q[n++] = 0; q[n++] = 1;
    return n;
}

static void pin(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    pthread_setaffinity_np(pthread_self(), sizeof set, &set);
}

static void *second(void *arg) {
    (void)arg;
    pin(cpus[1]);
    int round = 0;
    for (;;) {
        round++;
        while (atomic_load_explicit(&go, memory_order_acquire) < round) {
            if (atomic_load(&stop)) return NULL;
        }
        if (atomic_load(&stop) || fd < 0) return NULL;
        qaaaa[0] = (unsigned char)(round >> 8); qaaaa[1] = (unsigned char)round;
        (void)send(fd, qaaaa, qlen, 0);
        atomic_store_explicit(&sent, round, memory_order_release);
    }
}

int main(int argc, char **argv) {
    if (argc != 9) {
        fprintf(stderr, "usage: racer SERVER PORT NAME PAIRS SECONDS TIMEOUT_MS CPU0 CPU1\n");
        return 2;
    }
    memset(&server, 0, sizeof server);
    server.sin_family = AF_INET;
    server.sin_port = htons((unsigned short)atoi(argv[2]));
    if (inet_pton(AF_INET, argv[1], &server.sin_addr) != 1) {
        fprintf(stderr, "racer: not an IPv4 address: %s\n", argv[1]);
        return 2;
    }
    qlen = encode(qa, argv[3], 1);
    encode(qaaaa, argv[3], 28);
    limit_pairs = atol(argv[4]);
    limit_seconds = atof(argv[5]);
    timeout_ms = atoi(argv[6]);
    cpus[0] = atoi(argv[7]);
    cpus[1] = atoi(argv[8]);
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    pin(cpus[0]);
    pthread_t t;
    if (pthread_create(&t, NULL, second, NULL) != 0) return 1;
    double started = now();
    int round = 0;
    while (!atomic_load(&stop)) {
        if (limit_pairs > 0 && pairs >= limit_pairs) break;
        if (limit_seconds > 0 && now() - started >= limit_seconds) break;
        int s = socket(AF_INET, SOCK_DGRAM, 0);
        if (s < 0 || connect(s, (struct sockaddr *)&server, sizeof server) < 0) {
            fprintf(stderr, "racer: socket: %s\n", strerror(errno));
            atomic_store(&stop, 1);
            break;
        }
        fd = s;
        round++;
        qa[0] = (unsigned char)(round >> 8); qa[1] = (unsigned char)round;
        atomic_store_explicit(&go, round, memory_order_release);
        (void)send(s, qa, qlen, 0);
        while (atomic_load_explicit(&sent, memory_order_acquire) < round && !atomic_load(&stop)) {
        }
        int got = 0;
        double deadline = now() + timeout_ms / 1000.0;
        unsigned char buf[1500];
        while (got < 2) {
            int left = (int)((deadline - now()) * 1000);
            if (left <= 0) break;
            struct pollfd p = {s, POLLIN, 0};
            if (poll(&p, 1, left) <= 0) break;
            if (recv(s, buf, sizeof buf, 0) < 0) break; /* ICMP unreachable */
            got++;
        }
        fd = -1;
        close(s);
        pairs++;
        answers += got;
        lost += 2 - got;
    }
    atomic_store(&stop, 1);
    pthread_join(t, NULL);
    printf("%ld %ld %ld\n", pairs, answers, lost);
    return 0;
}

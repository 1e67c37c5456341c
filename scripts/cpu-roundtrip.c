// Cache-line round trip between CPU 0 and CPU 1, in ns (scripts/bench-net): on a VM the
// host may place the two vCPUs near (a shared cache) or far, and the distance decides what
// any producer/consumer pair across them (a virtio driver and device) can reach.
//   cc -O2 -pthread -o cpu-roundtrip scripts/cpu-roundtrip.c && ./cpu-roundtrip [ROUND_TRIPS]
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static _Alignas(64) _Atomic long line;
static long rounds, warm;

static void pin(int cpu) {
    cpu_set_t s;
    CPU_ZERO(&s);
    CPU_SET(cpu, &s);
    if (pthread_setaffinity_np(pthread_self(), sizeof s, &s) != 0) { perror("affinity"); exit(2); }
}

static void *pong(void *arg) {
    (void)arg;
    pin(1);
    for (long i = 0; i < warm + rounds; i++) {
        while (atomic_load_explicit(&line, memory_order_acquire) != 2 * i + 1) {}
        atomic_store_explicit(&line, 2 * i + 2, memory_order_release);
    }
    return NULL;
}

int main(int argc, char **argv) {
    rounds = argc > 1 ? atol(argv[1]) : 100000;
    if (rounds < 1) rounds = 1;
    warm = rounds / 10;
    pthread_t t;
    pthread_create(&t, NULL, pong, NULL);
    pin(0);
    // A tenth more round trips first, untimed: both threads running and pinned.
    struct timespec a, b;
    for (long i = 0; i < warm + rounds; i++) {
        if (i == warm) clock_gettime(CLOCK_MONOTONIC, &a);
        atomic_store_explicit(&line, 2 * i + 1, memory_order_release);
        while (atomic_load_explicit(&line, memory_order_acquire) != 2 * i + 2) {}
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    pthread_join(t, NULL);
    double ns = ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / rounds;
    printf("%.0f\n", ns);
    return 0;
}

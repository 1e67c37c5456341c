// The latency split of the C poller (a copy of the root's CRingFence/include/rf_split_probe.h,
// renamed: the benchmark package cannot use the root's C shim). Per request: turnaround
// (used index seen -> kick write begins), the kick's eventfd write, and the device's part
// (kick returned -> used index seen), in TSC ticks; recorded only when poller.c is
// built with -DRINGFENCE_SPLIT_PROBE.
#ifndef CBLK_SPLIT_PROBE_H
#define CBLK_SPLIT_PROBE_H
#include <stdint.h>
#include <time.h>

#define CBLK_SPLIT_BUCKETS 2048
/// Bucket width: 1 << CBLK_SPLIT_SHIFT TSC ticks.
#define CBLK_SPLIT_SHIFT 2

struct cblk_split_part {
    uint64_t sum, count;
    uint32_t hist[CBLK_SPLIT_BUCKETS];
};

struct cblk_split_probe {
    int armed;
    uint64_t last_seen, kick_begin, last_kick;
    /// seen -> kick write begins; the write; kick returned -> seen.
    struct cblk_split_part turnaround, write, device;
    /// TSC and CLOCK_MONOTONIC at arm and disarm (the TSC rate).
    uint64_t tsc0, ns0, tsc1, ns1;
};

static inline uint64_t cblk_split_tsc(void) {
#if defined(__x86_64__)
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
#else
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
#endif
}

static inline uint64_t cblk_split_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

static inline void cblk_split_add(struct cblk_split_part *p, uint64_t ticks) {
    p->sum += ticks;
    p->count++;
    uint64_t b = ticks >> CBLK_SPLIT_SHIFT;
    p->hist[b < CBLK_SPLIT_BUCKETS ? b : CBLK_SPLIT_BUCKETS - 1]++;
}

/// The used index was seen to move.
static inline void cblk_split_seen(struct cblk_split_probe *p) {
    uint64_t t = cblk_split_tsc();
    if (p->armed && p->last_kick) cblk_split_add(&p->device, t - p->last_kick);
    p->last_kick = 0;
    p->last_seen = t;
}

/// Right before the kick's eventfd write.
static inline void cblk_split_kick_begin(struct cblk_split_probe *p) { p->kick_begin = cblk_split_tsc(); }

/// Right after the kick's eventfd write returned.
static inline void cblk_split_kicked(struct cblk_split_probe *p) {
    uint64_t t = cblk_split_tsc();
    if (p->armed && p->last_seen) {
        cblk_split_add(&p->turnaround, p->kick_begin - p->last_seen);
        cblk_split_add(&p->write, t - p->kick_begin);
    }
    p->last_seen = 0;
    p->last_kick = t;
}

static inline void cblk_split_arm(struct cblk_split_probe *p) {
    p->armed = 1;
    p->tsc0 = cblk_split_tsc();
    p->ns0 = cblk_split_ns();
}

static inline void cblk_split_disarm(struct cblk_split_probe *p) {
    if (!p->armed) return;
    p->armed = 0;
    p->tsc1 = cblk_split_tsc();
    p->ns1 = cblk_split_ns();
}
#endif

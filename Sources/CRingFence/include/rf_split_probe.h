// Latency split of a closed loop (issue 19, benchmarks only): per request, the driver's
// turnaround (from seeing the used index move to the next kick's eventfd write returning,
// the write itself counted apart) and the device's part (from that kick's return to
// seeing the used index move). Timestamps from the TSC; sums and histograms in fixed
// arrays, no allocation. Compiled into a driver only with -DRINGFENCE_SPLIT_PROBE; the
// C busy-polling baseline in Benchmarks/ includes this file through a symlink.
#ifndef RF_SPLIT_PROBE_H
#define RF_SPLIT_PROBE_H
#include <stdint.h>
#include <time.h>

#define RF_SPLIT_BUCKETS 2048
/// Bucket width: 1 << RF_SPLIT_SHIFT TSC ticks.
#define RF_SPLIT_SHIFT 2

struct rf_split_part {
    uint64_t sum, count;
    uint32_t hist[RF_SPLIT_BUCKETS];
};

struct rf_split_probe {
    int armed;
    uint64_t last_seen, kick_begin, last_kick;
    /// seen -> kick write begins; the write; kick returned -> seen.
    struct rf_split_part turnaround, write, device;
    /// TSC and CLOCK_MONOTONIC at arm and disarm (the TSC rate).
    uint64_t tsc0, ns0, tsc1, ns1;
};

static inline uint64_t rf_split_tsc(void) {
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

static inline uint64_t rf_split_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

static inline void rf_split_add(struct rf_split_part *p, uint64_t ticks) {
    p->sum += ticks;
    p->count++;
    uint64_t b = ticks >> RF_SPLIT_SHIFT;
    p->hist[b < RF_SPLIT_BUCKETS ? b : RF_SPLIT_BUCKETS - 1]++;
}

/// The used index was seen to move.
static inline void rf_split_seen(struct rf_split_probe *p) {
    uint64_t t = rf_split_tsc();
    if (p->armed && p->last_kick) rf_split_add(&p->device, t - p->last_kick);
    p->last_kick = 0;
    p->last_seen = t;
}

/// Right before the kick's eventfd write.
static inline void rf_split_kick_begin(struct rf_split_probe *p) { p->kick_begin = rf_split_tsc(); }

/// Right after the kick's eventfd write returned.
static inline void rf_split_kicked(struct rf_split_probe *p) {
    uint64_t t = rf_split_tsc();
    if (p->armed && p->last_seen) {
        rf_split_add(&p->turnaround, p->kick_begin - p->last_seen);
        rf_split_add(&p->write, t - p->kick_begin);
    }
    p->last_seen = 0;
    p->last_kick = t;
}

static inline void rf_split_arm(struct rf_split_probe *p) {
    p->armed = 1;
    p->tsc0 = rf_split_tsc();
    p->ns0 = rf_split_ns();
}

static inline void rf_split_disarm(struct rf_split_probe *p) {
    if (!p->armed) return;
    p->armed = 0;
    p->tsc1 = rf_split_tsc();
    p->ns1 = rf_split_ns();
}
#endif

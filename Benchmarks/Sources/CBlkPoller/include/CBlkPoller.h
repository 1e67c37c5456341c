// The C busy-polling vhost-user-blk driver that `blk-ratio wait` measures the hardened
// driver's wait strategies against (issue 19): what a user of SPDK or DPDK expects from a
// userspace driver. Written from the virtio 1.2 spec (split virtqueue, virtio-blk) and
// QEMU's docs/interop/vhost-user.rst. It trusts its back-end completely: it is the
// baseline, and it exists only in this benchmark package (rule R8).
#ifndef CBLKPOLLER_H
#define CBLKPOLLER_H
#include <stddef.h>
#include <stdint.h>

#include "rf_split_probe.h"  // the root's CRingFence header, through a symlink
#ifdef __cplusplus
extern "C" {
#endif

/// One closed-loop run of 4 KiB (`block_size`) random reads.
struct cblk_result {
    /// Reads completed inside the measured window, and its length.
    uint64_t ios;
    double seconds;
    /// Every completion (warm-up included), and the kicks sent.
    uint64_t completed;
    uint64_t kicks;
    /// Latencies (ns) written to the caller's array (at most its capacity).
    uint64_t recorded;
    /// Non-zero on failure; `message` says why.
    int error;
    char message[160];
    /// The latency split over the measured window (all zero unless poller.c was built with
    /// -DRINGFENCE_SPLIT_PROBE).
    struct rf_split_probe split;
};

/// Connects to the vhost-user-blk back-end at `socket` (one queue of the smallest power
/// of two >= 3 * depth, at least 128; one memfd region), keeps `depth` reads of
/// `block_size` bytes in flight at xorshift offsets seeded by `seed` for `warmup` +
/// `seconds` seconds, busy polling the used ring (never waits on an eventfd), and records
/// the latency of every read completed in the measured window into `latencies`.
/// Disconnects before returning. 0 on success.
int cblk_poll_run(const char *socket, int depth, int block_size, double warmup, double seconds, uint64_t seed,
                  uint32_t *latencies, size_t capacity, struct cblk_result *out);

#ifdef __cplusplus
}
#endif
#endif

// The trusting Xen netif frontend that xen-net-bench measures the hardened XenRing netfront
// against, built only on the macros of Debian libxen-dev's <xen/io/ring.h> and
// <xen/io/netif.h>. It trusts its backend completely (ids index its tables unchecked,
// offsets and sizes are used as given, grants are revoked with a plain store): it is the
// baseline, and it exists only in this benchmark package (rule R8).
#ifndef CXENNETTRUSTING_H
#define CXENNETTRUSTING_H
#include <stdint.h>
#ifdef __cplusplus
extern "C" {
#endif

/// What the frontend shares with its backend: the tx and rx ring pages, the v1 grant
/// table, the granted frames, and two eventfds (one to signal the backend, one it signals).
struct xen_net_trusting_env {
    void *tx_sring;
    void *rx_sring;
    void *gnttab;
    void *frames;
    int evt_to_peer;
    int evt_from_peer;
};

/// SHARED_RING_INIT / FRONT_RING_INIT on both rings; posts `rx_slots` rx requests (grant
/// `rx_refs[i]` of frame `rx_frame + i`), then keeps `depth` frames of `size` bytes (at
/// most 4096, one slot each, copied from a private buffer into the page of `tx_frame + k`,
/// granted as `tx_refs[k]`) in flight on tx
/// until `frames` frames have come back on rx (loopback backend), copying each out. Each
/// pass takes the tx completions, posts and kicks, then copies the received frames out
/// (the backend works meanwhile), at most `post_max` frames posted a pass; `lockstep` non-zero posts first and copies out before
/// the next post (the order before, for comparison). Returns frames received, -1 on a
/// timeout.
long xen_net_trusting_run(const struct xen_net_trusting_env *env, const uint32_t *rx_refs, uint32_t rx_frame,
                          uint32_t rx_slots, const uint32_t *tx_refs, uint32_t tx_frame, uint32_t depth,
                          uint32_t size, uint64_t frames, uint8_t *out, int timeout_ms, int lockstep,
                          uint32_t post_max);

/// Pins the calling thread to one CPU (0-based), for the benchmark harness (both
/// frontends run on the same pinned thread). Returns 0 or an errno value.
int xen_net_bench_pin(int cpu);

#ifdef __cplusplus
}
#endif
#endif

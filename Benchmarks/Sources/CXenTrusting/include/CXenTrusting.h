// The trusting Xen blkif frontend that xen-bench measures the hardened XenRing frontend
// against, built only on the macros of Debian libxen-dev's <xen/io/ring.h> and
// <xen/io/blkif.h>. It trusts its backend completely: it is the baseline, and it exists
// only in this benchmark package (rule R8).
#ifndef CXENTRUSTING_H
#define CXENTRUSTING_H
#include <stdint.h>
#ifdef __cplusplus
extern "C" {
#endif

/// What the frontend shares with its backend: one ring page, the v1 grant table, the
/// granted frames, and two eventfds (one to signal the backend, one it signals).
struct xen_trusting_env {
    void *sring;
    void *gnttab;
    uint32_t gnttab_entries;
    void *frames;
    uint32_t nr_frames;
    int evt_to_peer;
    int evt_from_peer;
};

/// SHARED_RING_INIT / FRONT_RING_INIT / RING_GET_REQUEST /
/// RING_PUSH_REQUESTS_AND_CHECK_NOTIFY / RING_GET_RESPONSE (in place, unchecked) /
/// RING_FINAL_CHECK_FOR_RESPONSES; grants revoked with a plain store. One 4 KiB segment
/// per request, `depth` in flight, grant refs `first_ref...` and frames `first_frame...`
/// one per slot. Writes `data` (4096 bytes) or reads into it. Returns requests completed,
/// or -1 on a timeout; `*errors` counts non-OKAY statuses.
long xen_trusting_front_run(const struct xen_trusting_env *env, uint32_t first_ref, uint32_t first_frame,
                            uint64_t requests, uint32_t depth, int write, uint64_t disk_sectors, uint8_t *data,
                            int timeout_ms, uint64_t *errors);

#ifdef __cplusplus
}
#endif
#endif

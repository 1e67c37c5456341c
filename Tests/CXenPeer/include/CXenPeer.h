// A reference peer for XenRing's compatibility tests, built only on the macros and
// structs of Debian libxen-dev's <xen/io/ring.h> and <xen/io/blkif.h>. Test code, never
// shipped. It is not a benchmark baseline: the trusting frontend that xen-bench measures
// against lives in Benchmarks/Sources/CXenTrusting (R8).
#ifndef CXENPEER_H
#define CXENPEER_H
#include <stdint.h>
#include "CXenNetPeer.h"

/// Offsets and sizes exactly as the C compiler sees Xen's headers.
struct cxen_layout {
    uint32_t sring_req_prod, sring_req_event, sring_rsp_prod, sring_rsp_event;
    uint32_t sring_pvt, sring_pad, sring_ring, sring_entry_size;
    uint32_t ring_size_one_page;
    uint32_t req_size, req_operation, req_nr_segments, req_handle, req_id, req_sector, req_seg;
    uint32_t seg_size, seg_gref, seg_first_sect, seg_last_sect;
    uint32_t discard_flag, discard_nr_sectors;
    uint32_t rsp_size, rsp_id, rsp_operation, rsp_status;
    uint32_t gnt_size, gnt_flags, gnt_domid, gnt_frame;
    uint32_t gtf_permit_access, gtf_readonly, gtf_reading, gtf_writing;
    int32_t op_read, op_write, op_flush, op_discard, rsp_okay, rsp_error, rsp_eopnotsupp;
    uint32_t max_segments;
};
void cxen_layout(struct cxen_layout *out);

/// What both peers share: one ring page, the v1 grant table, the granted frames, and
/// two eventfds (one to signal the peer, one the peer signals).
struct cxen_env {
    void *sring;
    void *gnttab;
    uint32_t gnttab_entries;
    void *frames;
    uint32_t nr_frames;
    int evt_to_peer;
    int evt_from_peer;
};

/// Backend on BACK_RING_INIT / RING_COPY_REQUEST / RING_PUSH_RESPONSES_AND_CHECK_NOTIFY /
/// RING_FINAL_CHECK_FOR_REQUESTS, over an in-memory disk of 512-byte sectors. Serves
/// until `max_requests` are answered or no request arrives for `idle_timeout_ms`.
/// Returns the number of requests answered.
long cxen_back_serve(const struct cxen_env *env, uint8_t *disk, uint64_t disk_sectors,
                     uint64_t max_requests, int idle_timeout_ms);

/// Frontend on SHARED_RING_INIT / FRONT_RING_INIT / RING_GET_REQUEST /
/// RING_PUSH_REQUESTS_AND_CHECK_NOTIFY / RING_GET_RESPONSE / RING_FINAL_CHECK_FOR_RESPONSES.
/// One 4 KiB segment per request, `depth` in flight, grant refs `first_ref...` and frames
/// `first_frame...` one per slot. Writes `data` (4096 bytes) or reads into it. Returns
/// requests completed, -1 on a timeout, -2 on a response id it never posted; `*errors`
/// counts non-OKAY statuses.
long cxen_front_run(const struct cxen_env *env, uint32_t first_ref, uint32_t first_frame,
                    uint64_t requests, uint32_t depth, int write, uint64_t disk_sectors,
                    uint8_t *data, int timeout_ms, uint64_t *errors);
#endif

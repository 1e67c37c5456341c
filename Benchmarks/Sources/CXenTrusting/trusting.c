#define __XEN_INTERFACE_VERSION__ 0x00040e00 /* the current interface: xen_mb() etc. are ours */
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>
#define xen_mb() __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define xen_rmb() __atomic_thread_fence(__ATOMIC_ACQUIRE)
#define xen_wmb() __atomic_thread_fence(__ATOMIC_RELEASE)
#include <xen/io/blkif.h>
#include "CXenTrusting.h"

#define PAGE 4096

static void kick(int fd) {
    uint64_t one = 1;
    ssize_t n;
    do { n = write(fd, &one, 8); } while (n < 0 && errno == EINTR);
}

/// 1 if the eventfd fired, 0 on timeout.
static int wait_event(int fd, int timeout_ms) {
    struct pollfd p = {.fd = fd, .events = POLLIN};
    int r;
    do { r = poll(&p, 1, timeout_ms); } while (r < 0 && errno == EINTR);
    if (r <= 0) return 0;
    uint64_t v;
    ssize_t n = read(fd, &v, 8);
    (void)n;
    return 1;
}

static void post(blkif_front_ring_t *fr, grant_entry_v1_t *gnt, const struct xen_trusting_env *env,
                 uint32_t slot, uint32_t ref, uint32_t frame, int write, uint64_t sector, uint8_t *data) {
    uint8_t *page = (uint8_t *)env->frames + (size_t)frame * PAGE;
    if (write) memcpy(page, data, PAGE);
    gnt[ref].domid = 0;
    gnt[ref].frame = frame;
    xen_wmb();
    gnt[ref].flags = GTF_permit_access | (write ? GTF_readonly : 0);
    blkif_request_t *req = RING_GET_REQUEST(fr, fr->req_prod_pvt);
    req->operation = write ? BLKIF_OP_WRITE : BLKIF_OP_READ;
    req->nr_segments = 1;
    req->handle = 0;
    req->id = slot;
    req->sector_number = sector;
    req->seg[0].gref = ref;
    req->seg[0].first_sect = 0;
    req->seg[0].last_sect = 7;
    fr->req_prod_pvt++;
}

long xen_trusting_front_run(const struct xen_trusting_env *env, uint32_t first_ref, uint32_t first_frame,
                            uint64_t requests, uint32_t depth, int write, uint64_t disk_sectors, uint8_t *data,
                            int timeout_ms, uint64_t *errors) {
    blkif_sring_t *sring = env->sring;
    blkif_front_ring_t fr;
    SHARED_RING_INIT(sring);
    FRONT_RING_INIT(&fr, sring, PAGE);
    grant_entry_v1_t *gnt = env->gnttab;
    if (depth > RING_SIZE(&fr)) depth = RING_SIZE(&fr);
    uint64_t blocks = disk_sectors / 8, posted = 0, done = 0, next_block = 0;
    *errors = 0;
    for (uint32_t s = 0; s < depth && posted < requests; s++, posted++) {
        post(&fr, gnt, env, s, first_ref + s, first_frame + s, write, (next_block++ % blocks) * 8, data);
    }
    int notify;
    RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&fr, notify);
    if (notify) kick(env->evt_to_peer);
    while (done < requests) {
        RING_IDX rp = fr.sring->rsp_prod;
        xen_rmb();
        int progressed = 0;
        while (fr.rsp_cons != rp) {
            blkif_response_t *rsp = RING_GET_RESPONSE(&fr, fr.rsp_cons);
            uint32_t slot = (uint32_t)rsp->id; /* trusting: no range or in-flight check */
            if (rsp->status != BLKIF_RSP_OKAY) (*errors)++;
            fr.rsp_cons++;
            gnt[first_ref + slot].flags = 0; /* trusting: no try-end, no check */
            if (!write) memcpy(data, (uint8_t *)env->frames + (size_t)(first_frame + slot) * PAGE, PAGE);
            done++;
            progressed = 1;
            if (posted < requests) {
                post(&fr, gnt, env, slot, first_ref + slot, first_frame + slot, write, (next_block++ % blocks) * 8,
                     data);
                posted++;
            }
        }
        if (progressed) {
            RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&fr, notify);
            if (notify) kick(env->evt_to_peer);
            continue;
        }
        int more;
        RING_FINAL_CHECK_FOR_RESPONSES(&fr, more);
        if (!more && !wait_event(env->evt_from_peer, timeout_ms)) return -1;
    }
    return (long)done;
}

#define __XEN_INTERFACE_VERSION__ 0x00040e00  /* the current interface: xen_mb() etc. are ours */
#include <errno.h>
#include <poll.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>
#define xen_mb() __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define xen_rmb() __atomic_thread_fence(__ATOMIC_ACQUIRE)
#define xen_wmb() __atomic_thread_fence(__ATOMIC_RELEASE)
#include <xen/io/blkif.h>
#include "CXenPeer.h"

#define PAGE 4096

void cxen_layout(struct cxen_layout *o) {
    o->sring_req_prod = offsetof(struct blkif_sring, req_prod);
    o->sring_req_event = offsetof(struct blkif_sring, req_event);
    o->sring_rsp_prod = offsetof(struct blkif_sring, rsp_prod);
    o->sring_rsp_event = offsetof(struct blkif_sring, rsp_event);
    o->sring_pvt = offsetof(struct blkif_sring, pvt);
    o->sring_pad = offsetof(struct blkif_sring, __pad);
    o->sring_ring = offsetof(struct blkif_sring, ring);
    o->sring_entry_size = sizeof(union blkif_sring_entry);
    o->ring_size_one_page = __CONST_RING_SIZE(blkif, PAGE);
    o->req_size = sizeof(struct blkif_request);
    o->req_operation = offsetof(struct blkif_request, operation);
    o->req_nr_segments = offsetof(struct blkif_request, nr_segments);
    o->req_handle = offsetof(struct blkif_request, handle);
    o->req_id = offsetof(struct blkif_request, id);
    o->req_sector = offsetof(struct blkif_request, sector_number);
    o->req_seg = offsetof(struct blkif_request, seg);
    o->seg_size = sizeof(struct blkif_request_segment);
    o->seg_gref = offsetof(struct blkif_request_segment, gref);
    o->seg_first_sect = offsetof(struct blkif_request_segment, first_sect);
    o->seg_last_sect = offsetof(struct blkif_request_segment, last_sect);
    o->discard_flag = offsetof(struct blkif_request_discard, flag);
    o->discard_nr_sectors = offsetof(struct blkif_request_discard, nr_sectors);
    o->rsp_size = sizeof(struct blkif_response);
    o->rsp_id = offsetof(struct blkif_response, id);
    o->rsp_operation = offsetof(struct blkif_response, operation);
    o->rsp_status = offsetof(struct blkif_response, status);
    o->gnt_size = sizeof(grant_entry_v1_t);
    o->gnt_flags = offsetof(grant_entry_v1_t, flags);
    o->gnt_domid = offsetof(grant_entry_v1_t, domid);
    o->gnt_frame = offsetof(grant_entry_v1_t, frame);
    o->gtf_permit_access = GTF_permit_access;
    o->gtf_readonly = GTF_readonly;
    o->gtf_reading = GTF_reading;
    o->gtf_writing = GTF_writing;
    o->op_read = BLKIF_OP_READ;
    o->op_write = BLKIF_OP_WRITE;
    o->op_flush = BLKIF_OP_FLUSH_DISKCACHE;
    o->op_discard = BLKIF_OP_DISCARD;
    o->rsp_okay = BLKIF_RSP_OKAY;
    o->rsp_error = BLKIF_RSP_ERROR;
    o->rsp_eopnotsupp = BLKIF_RSP_EOPNOTSUPP;
    o->max_segments = BLKIF_MAX_SEGMENTS_PER_REQUEST;
}

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

long cxen_back_serve(const struct cxen_env *env, uint8_t *disk, uint64_t disk_sectors,
                     uint64_t max_requests, int idle_timeout_ms) {
    blkif_back_ring_t br;
    BACK_RING_INIT(&br, (blkif_sring_t *)env->sring, PAGE);
    grant_entry_v1_t *gnt = env->gnttab;
    long answered = 0;
    while ((uint64_t)answered < max_requests) {
        RING_IDX rc = br.req_cons, rp = br.sring->req_prod;
        xen_rmb();
        while (rc != rp && (uint64_t)answered < max_requests) {
            blkif_request_t req;
            RING_COPY_REQUEST(&br, rc, &req);
            br.req_cons = ++rc;
            int16_t status = BLKIF_RSP_OKAY;
            uint64_t sector = req.sector_number;
            if (req.operation == BLKIF_OP_READ || req.operation == BLKIF_OP_WRITE) {
                if (req.nr_segments == 0 || req.nr_segments > BLKIF_MAX_SEGMENTS_PER_REQUEST)
                    status = BLKIF_RSP_ERROR;
                for (int i = 0; status == BLKIF_RSP_OKAY && i < req.nr_segments; i++) {
                    struct blkif_request_segment s = req.seg[i];
                    unsigned n = (unsigned)s.last_sect - s.first_sect + 1;
                    if (s.gref >= env->gnttab_entries || s.last_sect > 7 || s.first_sect > s.last_sect ||
                        gnt[s.gref].frame >= env->nr_frames || sector + n > disk_sectors) {
                        status = BLKIF_RSP_ERROR;
                        break;
                    }
                    uint8_t *page = (uint8_t *)env->frames + (size_t)gnt[s.gref].frame * PAGE + s.first_sect * 512;
                    if (req.operation == BLKIF_OP_READ)
                        memcpy(page, disk + sector * 512, n * 512);
                    else
                        memcpy(disk + sector * 512, page, n * 512);
                    sector += n;
                }
            } else if (req.operation != BLKIF_OP_FLUSH_DISKCACHE) {
                status = BLKIF_RSP_EOPNOTSUPP;
            }
            blkif_response_t *rsp = RING_GET_RESPONSE(&br, br.rsp_prod_pvt);
            rsp->id = req.id;
            rsp->operation = req.operation;
            rsp->status = status;
            br.rsp_prod_pvt++;
            answered++;
            int notify;
            RING_PUSH_RESPONSES_AND_CHECK_NOTIFY(&br, notify);
            if (notify) kick(env->evt_to_peer);
        }
        int more;
        RING_FINAL_CHECK_FOR_REQUESTS(&br, more);
        if (!more && (uint64_t)answered < max_requests && !wait_event(env->evt_from_peer, idle_timeout_ms))
            break;
    }
    return answered;
}

static void post(blkif_front_ring_t *fr, grant_entry_v1_t *gnt, const struct cxen_env *env,
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

long cxen_front_run(const struct cxen_env *env, uint32_t first_ref, uint32_t first_frame,
                    uint64_t requests, uint32_t depth, int write, uint64_t disk_sectors,
                    uint8_t *data, int timeout_ms, uint64_t *errors) {
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
            uint64_t id = rsp->id;
            if (id >= depth) return -2;  /* a test peer: never index with an id it did not post */
            uint32_t slot = (uint32_t)id;
            if (rsp->status != BLKIF_RSP_OKAY) (*errors)++;
            fr.rsp_cons++;
            gnt[first_ref + slot].flags = 0;
            if (!write) memcpy(data, (uint8_t *)env->frames + (size_t)(first_frame + slot) * PAGE, PAGE);
            done++;
            progressed = 1;
            if (posted < requests) {
                post(&fr, gnt, env, slot, first_ref + slot, first_frame + slot, write, (next_block++ % blocks) * 8, data);
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

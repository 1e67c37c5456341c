#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#define __XEN_INTERFACE_VERSION__ 0x00040e00
#include <sched.h>
#include <errno.h>
#include <poll.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>
#define xen_mb() __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define xen_rmb() __atomic_thread_fence(__ATOMIC_ACQUIRE)
#define xen_wmb() __atomic_thread_fence(__ATOMIC_RELEASE)
#include <xen/io/netif.h>
#include "CXenNetTrusting.h"

#define PAGE 4096

static void kick(int fd) {
    uint64_t one = 1;
    ssize_t n;
    do { n = write(fd, &one, 8); } while (n < 0 && errno == EINTR);
}

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

static void grant(const struct xen_net_trusting_env *env, uint32_t ref, uint32_t frame, int readonly) {
    grant_entry_v1_t *gnt = env->gnttab;
    gnt[ref].domid = 0;
    gnt[ref].frame = frame;
    xen_wmb();
    gnt[ref].flags = GTF_permit_access | (readonly ? GTF_readonly : 0);
}

long xen_net_trusting_run(const struct xen_net_trusting_env *env, const uint32_t *rx_refs, uint32_t rx_frame,
                          uint32_t rx_slots, const uint32_t *tx_refs, uint32_t tx_frame, uint32_t depth,
                          uint32_t size, uint64_t frames, uint8_t *out, int timeout_ms, int lockstep, uint32_t post_max) {
    netif_tx_sring_t *txs = env->tx_sring;
    netif_rx_sring_t *rxs = env->rx_sring;
    netif_tx_front_ring_t tx;
    netif_rx_front_ring_t rx;
    SHARED_RING_INIT(txs);
    FRONT_RING_INIT(&tx, txs, PAGE);
    SHARED_RING_INIT(rxs);
    FRONT_RING_INIT(&rx, rxs, PAGE);
    grant_entry_v1_t *gnt = env->gnttab;
    uint8_t *frames_base = env->frames;
    if (size > PAGE) size = PAGE;
    for (uint32_t i = 0; i < rx_slots; i++) {
        grant(env, rx_refs[i], rx_frame + i, 0);
        netif_rx_request_t *r = RING_GET_REQUEST(&rx, rx.req_prod_pvt++);
        r->id = (uint16_t)i;
        r->gref = rx_refs[i];
    }
    int notify;
    RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&rx, notify);
    if (notify) kick(env->evt_to_peer);
    /* free tx ids: a simple stack */
    uint16_t free_ids[256];
    uint32_t nfree = 0;
    for (uint32_t k = depth; k-- > 0;) free_ids[nfree++] = (uint16_t)k;
    uint64_t sent = 0, received = 0;
    uint8_t data[PAGE];
    memset(data, 0x5a, size);
    /* The loop order overlaps with the backend (as the hardened loop's `exchange` and
     * Linux's netfront under NAPI): tx completions first, then the next tx frames posted
     * and the backend kicked, and only then the received frames copied out (and their rx
     * pages re-posted, each after its own copy) while the backend works on the new batch.
     * At most `post_max` frames are posted per pass.
     * `lockstep`: the order before (post, tx completions, copy-out; the next frames wait
     * for the next pass), for comparison only. */
#define POST_TX()                                                                            \
    do {                                                                                     \
        uint32_t posted = 0;                                                                 \
        while (nfree > 0 && sent < frames && posted < post_max) {                            \
            uint16_t id = free_ids[--nfree];                                                 \
            /* the frame comes from the caller's memory, as for the hardened side */        \
            memcpy(frames_base + (size_t)(tx_frame + id) * PAGE, data, size);                \
            grant(env, tx_refs[id], tx_frame + id, 1);                                       \
            netif_tx_request_t *t = RING_GET_REQUEST(&tx, tx.req_prod_pvt++);                \
            t->gref = tx_refs[id];                                                           \
            t->offset = 0;                                                                   \
            t->flags = 0;                                                                    \
            t->id = id;                                                                      \
            t->size = (uint16_t)size;                                                        \
            sent++;                                                                          \
            posted++;                                                                        \
        }                                                                                    \
        if (posted) {                                                                        \
            RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&tx, notify);                                \
            if (notify) kick(env->evt_to_peer);                                              \
            if (!lockstep) progressed = 1; /* as `exchange`: another pass before waiting */  \
        }                                                                                    \
    } while (0)
    while (received < frames) {
        int progressed = 0;
        if (lockstep) POST_TX();
        RING_IDX rp = tx.sring->rsp_prod;
        xen_rmb();
        while (tx.rsp_cons != rp) {
            netif_tx_response_t *t = RING_GET_RESPONSE(&tx, tx.rsp_cons++);
            if (t->status == NETIF_RSP_NULL) continue;
            gnt[tx_refs[t->id]].flags = 0; /* trusting: a plain store, id unchecked */
            free_ids[nfree++] = t->id;
            progressed = 1;
        }
        if (!lockstep) POST_TX();
        rp = rx.sring->rsp_prod;
        xen_rmb();
        int reposted = 0;
        while (rx.rsp_cons != rp) {
            netif_rx_response_t *r = RING_GET_RESPONSE(&rx, rx.rsp_cons++);
            uint16_t id = r->id;
            memcpy(out, frames_base + (size_t)(rx_frame + id) * PAGE + r->offset, (size_t)r->status);
            if (!(r->flags & NETRXF_more_data)) received++;
            netif_rx_request_t *q = RING_GET_REQUEST(&rx, rx.req_prod_pvt++);
            q->id = id;
            q->gref = rx_refs[id];
            reposted = 1;
            progressed = 1;
        }
        if (reposted) {
            RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&rx, notify);
            if (notify) kick(env->evt_to_peer);
        }
        if (progressed) continue;
        int more_tx, more_rx;
        RING_FINAL_CHECK_FOR_RESPONSES(&tx, more_tx);
        RING_FINAL_CHECK_FOR_RESPONSES(&rx, more_rx);
        if (!more_tx && !more_rx && !wait_event(env->evt_from_peer, timeout_ms)) return -1;
    }
#undef POST_TX
    return (long)received;
}

int xen_net_bench_pin(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    return sched_setaffinity(0, sizeof set, &set) == 0 ? 0 : errno;
}

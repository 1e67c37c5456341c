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
#include <xen/io/netif.h>
#include "CXenNetPeer.h"

#define PAGE 4096

void cxen_net_layout(struct cxen_net_layout *o) {
    o->tx_entry_size = sizeof(union netif_tx_sring_entry);
    o->rx_entry_size = sizeof(union netif_rx_sring_entry);
    o->tx_ring_size = __CONST_RING_SIZE(netif_tx, PAGE);
    o->rx_ring_size = __CONST_RING_SIZE(netif_rx, PAGE);
    o->txreq_size = sizeof(struct netif_tx_request);
    o->txreq_gref = offsetof(struct netif_tx_request, gref);
    o->txreq_offset = offsetof(struct netif_tx_request, offset);
    o->txreq_flags = offsetof(struct netif_tx_request, flags);
    o->txreq_id = offsetof(struct netif_tx_request, id);
    o->txreq_size_field = offsetof(struct netif_tx_request, size);
    o->txrsp_size = sizeof(struct netif_tx_response);
    o->txrsp_id = offsetof(struct netif_tx_response, id);
    o->txrsp_status = offsetof(struct netif_tx_response, status);
    o->rxreq_size = sizeof(struct netif_rx_request);
    o->rxreq_id = offsetof(struct netif_rx_request, id);
    o->rxreq_gref = offsetof(struct netif_rx_request, gref);
    o->rxrsp_size = sizeof(struct netif_rx_response);
    o->rxrsp_id = offsetof(struct netif_rx_response, id);
    o->rxrsp_offset = offsetof(struct netif_rx_response, offset);
    o->rxrsp_flags = offsetof(struct netif_rx_response, flags);
    o->rxrsp_status = offsetof(struct netif_rx_response, status);
    o->extra_size = sizeof(struct netif_extra_info);
    o->extra_type = offsetof(struct netif_extra_info, type);
    o->extra_flags = offsetof(struct netif_extra_info, flags);
    o->gso_size = offsetof(struct netif_extra_info, u.gso.size);
    o->gso_type = offsetof(struct netif_extra_info, u.gso.type);
    o->gso_pad = offsetof(struct netif_extra_info, u.gso.pad);
    o->gso_features = offsetof(struct netif_extra_info, u.gso.features);
    o->mcast_addr = offsetof(struct netif_extra_info, u.mcast.addr);
    o->hash_type = offsetof(struct netif_extra_info, u.hash.type);
    o->hash_algorithm = offsetof(struct netif_extra_info, u.hash.algorithm);
    o->hash_value = offsetof(struct netif_extra_info, u.hash.value);
    o->txf_csum_blank = NETTXF_csum_blank;
    o->txf_data_validated = NETTXF_data_validated;
    o->txf_more_data = NETTXF_more_data;
    o->txf_extra_info = NETTXF_extra_info;
    o->rxf_data_validated = NETRXF_data_validated;
    o->rxf_csum_blank = NETRXF_csum_blank;
    o->rxf_more_data = NETRXF_more_data;
    o->rxf_extra_info = NETRXF_extra_info;
    o->rxf_gso_prefix = NETRXF_gso_prefix;
    o->extra_type_none = XEN_NETIF_EXTRA_TYPE_NONE;
    o->extra_type_gso = XEN_NETIF_EXTRA_TYPE_GSO;
    o->extra_type_mcast_add = XEN_NETIF_EXTRA_TYPE_MCAST_ADD;
    o->extra_type_mcast_del = XEN_NETIF_EXTRA_TYPE_MCAST_DEL;
    o->extra_type_hash = XEN_NETIF_EXTRA_TYPE_HASH;
    o->extra_type_max = XEN_NETIF_EXTRA_TYPE_MAX;
    o->extra_flag_more = XEN_NETIF_EXTRA_FLAG_MORE;
    o->gso_type_tcpv4 = XEN_NETIF_GSO_TYPE_TCPV4;
    o->gso_type_tcpv6 = XEN_NETIF_GSO_TYPE_TCPV6;
    o->rsp_dropped = NETIF_RSP_DROPPED;
    o->rsp_error = NETIF_RSP_ERROR;
    o->rsp_okay = NETIF_RSP_OKAY;
    o->rsp_null = NETIF_RSP_NULL;
    o->max_tx_size = XEN_NETIF_MAX_TX_SIZE;
    o->nr_slots_min = XEN_NETIF_NR_SLOTS_MIN;
}

static void net_kick(int fd) {
    uint64_t one = 1;
    ssize_t n;
    do { n = write(fd, &one, 8); } while (n < 0 && errno == EINTR);
}

/// 1 if the eventfd fired, 0 on timeout.
static int net_wait(int fd, int timeout_ms) {
    struct pollfd p = {.fd = fd, .events = POLLIN};
    int r;
    do { r = poll(&p, 1, timeout_ms); } while (r < 0 && errno == EINTR);
    if (r <= 0) return 0;
    uint64_t v;
    ssize_t n = read(fd, &v, 8);
    (void)n;
    return 1;
}

static uint8_t *net_page(const struct cxen_net_env *env, grant_ref_t ref) {
    grant_entry_v1_t *gnt = env->gnttab;
    if (ref >= env->gnttab_entries || gnt[ref].frame >= env->nr_frames) return NULL;
    return (uint8_t *)env->frames + (size_t)gnt[ref].frame * PAGE;
}

long cxen_net_back_loopback(const struct cxen_net_env *env, uint64_t max_frames, int idle_timeout_ms) {
    netif_tx_back_ring_t tx;
    netif_rx_back_ring_t rx;
    BACK_RING_INIT(&tx, (netif_tx_sring_t *)env->tx_sring, PAGE);
    BACK_RING_INIT(&rx, (netif_rx_sring_t *)env->rx_sring, PAGE);
    static uint8_t frame[65536];
    long echoed = 0;
    while ((uint64_t)echoed < max_frames) {
        int more;
        RING_FINAL_CHECK_FOR_REQUESTS(&tx, more);
        if (!more) {
            if (!net_wait(env->evt_from_peer, idle_timeout_ms)) break;
            continue;
        }
        /* One frame: first request, extras, more_data fragments. */
        netif_tx_request_t first, req;
        RING_COPY_REQUEST(&tx, tx.req_cons, &first);
        tx.req_cons++;
        int extras = 0;
        if (first.flags & NETTXF_extra_info) {
            netif_extra_info_t extra;
            do {
                memcpy(&extra, RING_GET_REQUEST(&tx, tx.req_cons), sizeof extra);
                tx.req_cons++;
                extras++;
            } while ((extra.flags & XEN_NETIF_EXTRA_FLAG_MORE) && extras < 4);
        }
        netif_tx_request_t frags[XEN_NETIF_NR_SLOTS_MIN];
        int nfrags = 0;
        uint32_t rest = 0;
        req = first;
        while ((req.flags & NETTXF_more_data) && nfrags < XEN_NETIF_NR_SLOTS_MIN) {
            RING_COPY_REQUEST(&tx, tx.req_cons, &req);
            tx.req_cons++;
            frags[nfrags++] = req;
            rest += req.size;
        }
        if (rest > first.size) return -3;
        uint32_t len = 0, head = first.size - rest;
        uint8_t *p = net_page(env, first.gref);
        if (!p || first.offset + head > PAGE) return -3;
        memcpy(frame, p + first.offset, head);
        len = head;
        for (int i = 0; i < nfrags; i++) {
            p = net_page(env, frags[i].gref);
            if (!p || frags[i].offset + frags[i].size > PAGE) return -3;
            memcpy(frame + len, p + frags[i].offset, frags[i].size);
            len += frags[i].size;
        }
        /* Responses: the first, NULL for each extra, then each fragment. */
        netif_tx_response_t *rsp = RING_GET_RESPONSE(&tx, tx.rsp_prod_pvt++);
        rsp->id = first.id;
        rsp->status = NETIF_RSP_OKAY;
        for (int i = 0; i < extras; i++) RING_GET_RESPONSE(&tx, tx.rsp_prod_pvt++)->status = NETIF_RSP_NULL;
        for (int i = 0; i < nfrags; i++) {
            rsp = RING_GET_RESPONSE(&tx, tx.rsp_prod_pvt++);
            rsp->id = frags[i].id;
            rsp->status = NETIF_RSP_OKAY;
        }
        int notify;
        RING_PUSH_RESPONSES_AND_CHECK_NOTIFY(&tx, notify);
        if (notify) net_kick(env->evt_to_peer);
        /* Echo on rx: one posted request per 4 KiB, waiting for them if need be. */
        uint32_t slots = (len + PAGE - 1) / PAGE;
        for (;;) {
            RING_IDX avail = rx.sring->req_prod - rx.req_cons;
            xen_rmb();
            if (avail >= slots) break;
            if (!net_wait(env->evt_from_peer, idle_timeout_ms)) return echoed;
        }
        uint32_t off = 0;
        for (uint32_t s = 0; s < slots; s++) {
            netif_rx_request_t rreq;
            RING_COPY_REQUEST(&rx, rx.req_cons, &rreq);
            rx.req_cons++;
            uint32_t n = len - off < PAGE ? len - off : PAGE;
            netif_rx_response_t *rr = RING_GET_RESPONSE(&rx, rx.rsp_prod_pvt++);
            p = net_page(env, rreq.gref);
            rr->id = rreq.id;
            rr->offset = 0;
            rr->flags = s + 1 < slots ? NETRXF_more_data : 0;
            if (p) {
                memcpy(p, frame + off, n);
                rr->status = (int16_t)n;
            } else {
                rr->status = NETIF_RSP_ERROR;
            }
            off += n;
        }
        RING_PUSH_RESPONSES_AND_CHECK_NOTIFY(&rx, notify);
        if (notify) net_kick(env->evt_to_peer);
        echoed++;
    }
    return echoed;
}

static void net_grant(const struct cxen_net_env *env, grant_ref_t ref, uint32_t frame, int readonly) {
    grant_entry_v1_t *gnt = env->gnttab;
    gnt[ref].domid = 0;
    gnt[ref].frame = frame;
    xen_wmb();
    gnt[ref].flags = GTF_permit_access | (readonly ? GTF_readonly : 0);
}

long cxen_net_front_echo(const struct cxen_net_env *env, uint32_t first_ref, uint32_t first_frame,
                         uint32_t rx_slots, uint64_t frames, const uint32_t *sizes, uint32_t nsizes,
                         int timeout_ms) {
    netif_tx_sring_t *txs = env->tx_sring;
    netif_rx_sring_t *rxs = env->rx_sring;
    netif_tx_front_ring_t tx;
    netif_rx_front_ring_t rx;
    SHARED_RING_INIT(txs);
    FRONT_RING_INIT(&tx, txs, PAGE);
    SHARED_RING_INIT(rxs);
    FRONT_RING_INIT(&rx, rxs, PAGE);
    grant_entry_v1_t *gnt = env->gnttab;
    if (rx_slots > RING_SIZE(&rx)) rx_slots = RING_SIZE(&rx);
    /* rx request i: id i, ref first_ref + i, frame first_frame + i (re-posted in place). */
    for (uint32_t i = 0; i < rx_slots; i++) {
        net_grant(env, first_ref + i, first_frame + i, 0);
        netif_rx_request_t *r = RING_GET_REQUEST(&rx, rx.req_prod_pvt++);
        r->id = (uint16_t)i;
        r->gref = first_ref + i;
    }
    int notify;
    RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&rx, notify);
    if (notify) net_kick(env->evt_to_peer);
    uint32_t tx_ref = first_ref + rx_slots, tx_frame = first_frame + rx_slots;
    static uint8_t expect[65536], got[65536];
    long verified = 0;
    for (uint64_t n = 0; n < frames; n++) {
        uint32_t len = sizes[n % nsizes];
        for (uint32_t i = 0; i < len; i++) expect[i] = (uint8_t)((i * 7 + n) & 0xff);
        uint32_t slots = (len + PAGE - 1) / PAGE;
        for (uint32_t s = 0; s < slots; s++) {
            uint32_t off = s * PAGE, bytes = len - off < PAGE ? len - off : PAGE;
            memcpy((uint8_t *)env->frames + (size_t)(tx_frame + s) * PAGE, expect + off, bytes);
            net_grant(env, tx_ref + s, tx_frame + s, 1);
            netif_tx_request_t *r = RING_GET_REQUEST(&tx, tx.req_prod_pvt++);
            r->gref = tx_ref + s;
            r->offset = 0;
            r->flags = s + 1 < slots ? NETTXF_more_data : 0;
            r->id = (uint16_t)s;
            r->size = (uint16_t)(s == 0 ? len : bytes);
        }
        RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&tx, notify);
        if (notify) net_kick(env->evt_to_peer);
        uint32_t tx_done = 0, got_len = 0;
        int rx_done = 0;
        while (tx_done < slots || !rx_done) {
            int progressed = 0;
            RING_IDX rp = tx.sring->rsp_prod;
            xen_rmb();
            while (tx.rsp_cons != rp) {
                netif_tx_response_t *t = RING_GET_RESPONSE(&tx, tx.rsp_cons++);
                if (t->status == NETIF_RSP_NULL) continue;
                if (t->id >= slots) return -2;
                if (t->status != NETIF_RSP_OKAY) return -5;
                gnt[tx_ref + t->id].flags = 0;
                tx_done++;
                progressed = 1;
            }
            rp = rx.sring->rsp_prod;
            xen_rmb();
            while (rx.rsp_cons != rp && !rx_done) {
                netif_rx_response_t *r = RING_GET_RESPONSE(&rx, rx.rsp_cons++);
                if (r->id >= rx_slots) return -2;
                if (r->status < 0 || r->offset + r->status > PAGE || got_len + r->status > sizeof got) return -4;
                memcpy(got + got_len, (uint8_t *)env->frames + (size_t)(first_frame + r->id) * PAGE + r->offset,
                       r->status);
                got_len += r->status;
                /* Re-post the same page under the same id. */
                netif_rx_request_t *q = RING_GET_REQUEST(&rx, rx.req_prod_pvt++);
                q->id = r->id;
                q->gref = first_ref + r->id;
                if (!(r->flags & NETRXF_more_data)) rx_done = 1;
                progressed = 1;
            }
            if (progressed) {
                RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&rx, notify);
                if (notify) net_kick(env->evt_to_peer);
                continue;
            }
            int more_tx, more_rx;
            RING_FINAL_CHECK_FOR_RESPONSES(&tx, more_tx);
            RING_FINAL_CHECK_FOR_RESPONSES(&rx, more_rx);
            if (!more_tx && !more_rx && !net_wait(env->evt_from_peer, timeout_ms)) return -1;
        }
        if (got_len != len || memcmp(got, expect, len) != 0) return -4;
        verified++;
    }
    return verified;
}

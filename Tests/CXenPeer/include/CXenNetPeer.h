// The netif half of the reference peer: built only on the macros and structs of Debian
// libxen-dev's <xen/io/ring.h> and <xen/io/netif.h>. Test code, never shipped.
#ifndef CXENNETPEER_H
#define CXENNETPEER_H
#include <stdint.h>

/// Offsets and sizes exactly as the C compiler sees <xen/io/netif.h>.
struct cxen_net_layout {
    uint32_t tx_entry_size, rx_entry_size, tx_ring_size, rx_ring_size;
    uint32_t txreq_size, txreq_gref, txreq_offset, txreq_flags, txreq_id, txreq_size_field;
    uint32_t txrsp_size, txrsp_id, txrsp_status;
    uint32_t rxreq_size, rxreq_id, rxreq_gref;
    uint32_t rxrsp_size, rxrsp_id, rxrsp_offset, rxrsp_flags, rxrsp_status;
    uint32_t extra_size, extra_type, extra_flags, gso_size, gso_type, gso_pad, gso_features;
    uint32_t mcast_addr, hash_type, hash_algorithm, hash_value;
    uint32_t txf_csum_blank, txf_data_validated, txf_more_data, txf_extra_info;
    uint32_t rxf_data_validated, rxf_csum_blank, rxf_more_data, rxf_extra_info, rxf_gso_prefix;
    uint32_t extra_type_none, extra_type_gso, extra_type_mcast_add, extra_type_mcast_del, extra_type_hash,
        extra_type_max, extra_flag_more, gso_type_tcpv4, gso_type_tcpv6;
    int32_t rsp_dropped, rsp_error, rsp_okay, rsp_null;
    uint32_t max_tx_size, nr_slots_min;
};
void cxen_net_layout(struct cxen_net_layout *out);

/// What both netif peers share: the tx and rx ring pages, the v1 grant table, the granted
/// frames, and two eventfds (one to signal the peer, one the peer signals).
struct cxen_net_env {
    void *tx_sring;
    void *rx_sring;
    void *gnttab;
    uint32_t gnttab_entries;
    void *frames;
    uint32_t nr_frames;
    int evt_to_peer;
    int evt_from_peer;
};

/// Loopback netback on BACK_RING_INIT / RING_COPY_REQUEST / RING_PUSH_RESPONSES_AND_CHECK_NOTIFY
/// / RING_FINAL_CHECK_FOR_REQUESTS: every tx frame (more_data chains, extra info skipped and
/// answered NETIF_RSP_NULL) is answered OKAY and sent back whole on the rx ring, one posted
/// rx request per 4 KiB. Serves until `max_frames` frames are echoed or nothing happens
/// for `idle_timeout_ms`. Returns the frames echoed, or -3 on a malformed request.
long cxen_net_back_loopback(const struct cxen_net_env *env, uint64_t max_frames, int idle_timeout_ms);

/// Netfront on SHARED_RING_INIT / FRONT_RING_INIT / RING_GET_REQUEST /
/// RING_PUSH_REQUESTS_AND_CHECK_NOTIFY / RING_FINAL_CHECK_FOR_RESPONSES. Posts `rx_slots`
/// rx requests (refs `first_ref...`, frames `first_frame...`), then sends `frames` frames,
/// frame n of `sizes[n % nsizes]` bytes with byte i = (i * 7 + n) & 0xff, in 4 KiB slots
/// (tx refs and frames after the rx ones), one frame at a time, and checks that each
/// comes back byte for byte on the rx ring. Returns frames verified; -1 timeout, -2 an
/// id it never posted, -4 a frame that differs, -5 a tx status not OKAY.
long cxen_net_front_echo(const struct cxen_net_env *env, uint32_t first_ref, uint32_t first_frame,
                         uint32_t rx_slots, uint64_t frames, const uint32_t *sizes, uint32_t nsizes,
                         int timeout_ms);
#endif

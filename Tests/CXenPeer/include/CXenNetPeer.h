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
#endif

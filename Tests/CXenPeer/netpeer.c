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

import CXenPeer
import Testing
@testable import XenRing

/// Binary compatibility of netif: every offset, size and constant we use equals what the
/// C compiler sees in Debian libxen-dev's `xen/io/netif.h` and `xen/io/ring.h`.
@Suite struct NetLayoutTests {
    static let c: cxen_net_layout = {
        var l = cxen_net_layout()
        cxen_net_layout(&l)
        return l
    }()

    @Test func ringsMatchNetifH() {
        let c = Self.c
        #expect(Int(c.tx_entry_size) == NetifLayout.txSlotSize)
        #expect(Int(c.rx_entry_size) == NetifLayout.rxSlotSize)
        #expect(Int(c.tx_ring_size) == NetifLayout.txRingSize)
        #expect(Int(c.rx_ring_size) == NetifLayout.rxRingSize)
    }

    @Test func txRequestAndResponseMatchNetifH() {
        let c = Self.c
        #expect(Int(c.txreq_size) == NetifLayout.txRequestSize)
        #expect(Int(c.txreq_gref) == NetifLayout.txRequestGrantRef)
        #expect(Int(c.txreq_offset) == NetifLayout.txRequestOffset)
        #expect(Int(c.txreq_flags) == NetifLayout.txRequestFlags)
        #expect(Int(c.txreq_id) == NetifLayout.txRequestId)
        #expect(Int(c.txreq_size_field) == NetifLayout.txRequestSize16)
        #expect(Int(c.txrsp_size) == NetifLayout.txResponseSize)
        #expect(Int(c.txrsp_id) == NetifLayout.txResponseId)
        #expect(Int(c.txrsp_status) == NetifLayout.txResponseStatus)
    }

    @Test func rxRequestAndResponseMatchNetifH() {
        let c = Self.c
        #expect(Int(c.rxreq_size) == NetifLayout.rxRequestSize)
        #expect(Int(c.rxreq_id) == NetifLayout.rxRequestId)
        #expect(Int(c.rxreq_gref) == NetifLayout.rxRequestGrantRef)
        #expect(Int(c.rxrsp_size) == NetifLayout.rxResponseSize)
        #expect(Int(c.rxrsp_id) == NetifLayout.rxResponseId)
        #expect(Int(c.rxrsp_offset) == NetifLayout.rxResponseOffset)
        #expect(Int(c.rxrsp_flags) == NetifLayout.rxResponseFlags)
        #expect(Int(c.rxrsp_status) == NetifLayout.rxResponseStatus)
    }

    @Test func extraInfoMatchesNetifH() {
        let c = Self.c
        #expect(Int(c.extra_size) == NetifLayout.extraSize)
        #expect(Int(c.extra_type) == NetifLayout.extraType)
        #expect(Int(c.extra_flags) == NetifLayout.extraFlags)
        #expect(Int(c.gso_size) == NetifLayout.gsoSize)
        #expect(Int(c.gso_type) == NetifLayout.gsoType)
        #expect(Int(c.gso_pad) == NetifLayout.gsoPad)
        #expect(Int(c.gso_features) == NetifLayout.gsoFeatures)
        #expect(Int(c.mcast_addr) == NetifLayout.mcastAddress)
        #expect(Int(c.hash_type) == NetifLayout.hashType)
        #expect(Int(c.hash_algorithm) == NetifLayout.hashAlgorithm)
        #expect(Int(c.hash_value) == NetifLayout.hashValue)
        #expect(c.extra_type_none == UInt32(NetExtraType.none.rawValue))
        #expect(c.extra_type_gso == UInt32(NetExtraType.gso.rawValue))
        #expect(c.extra_type_mcast_add == UInt32(NetExtraType.multicastAdd.rawValue))
        #expect(c.extra_type_mcast_del == UInt32(NetExtraType.multicastDelete.rawValue))
        #expect(c.extra_type_hash == UInt32(NetExtraType.hash.rawValue))
        #expect(c.extra_type_max == UInt32(NetExtraType.max.rawValue))
        #expect(c.extra_flag_more == UInt32(NetFlags.extraMore))
        #expect(c.gso_type_tcpv4 == UInt32(NetGSOType.tcpv4.rawValue))
        #expect(c.gso_type_tcpv6 == UInt32(NetGSOType.tcpv6.rawValue))
    }

    @Test func flagsAndStatusesMatchNetifH() {
        let c = Self.c
        #expect(c.txf_csum_blank == UInt32(NetFlags.txChecksumBlank))
        #expect(c.txf_data_validated == UInt32(NetFlags.txDataValidated))
        #expect(c.txf_more_data == UInt32(NetFlags.txMoreData))
        #expect(c.txf_extra_info == UInt32(NetFlags.txExtraInfo))
        #expect(c.rxf_data_validated == UInt32(NetFlags.rxDataValidated))
        #expect(c.rxf_csum_blank == UInt32(NetFlags.rxChecksumBlank))
        #expect(c.rxf_more_data == UInt32(NetFlags.rxMoreData))
        #expect(c.rxf_extra_info == UInt32(NetFlags.rxExtraInfo))
        #expect(c.rxf_gso_prefix == UInt32(NetFlags.rxGSOPrefix))
        #expect(c.rsp_dropped == Int32(NetStatus.dropped.rawValue))
        #expect(c.rsp_error == Int32(NetStatus.error.rawValue))
        #expect(c.rsp_okay == Int32(NetStatus.okay.rawValue))
        #expect(c.rsp_null == Int32(NetStatus.null.rawValue))
        #expect(Int(c.max_tx_size) == NetifLayout.maxFrameSize)
        #expect(Int(c.nr_slots_min) == NetifLayout.maxSlotsPerFrame)
    }
}

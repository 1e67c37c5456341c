import CXenPeer
import Testing
@testable import XenRing

/// Binary compatibility: every offset and size we use equals what the C compiler sees in
/// Debian libxen-dev's `xen/io/ring.h`, `xen/io/blkif.h` and `xen/grant_table.h`.
@Suite struct XenLayoutTests {
    static let c: cxen_layout = {
        var l = cxen_layout()
        cxen_layout(&l)
        return l
    }()

    @Test func sharedRingHeaderMatchesRingH() {
        let c = Self.c
        #expect(Int(c.sring_req_prod) == SharedRingLayout.requestProducer)
        #expect(Int(c.sring_req_event) == SharedRingLayout.requestEvent)
        #expect(Int(c.sring_rsp_prod) == SharedRingLayout.responseProducer)
        #expect(Int(c.sring_rsp_event) == SharedRingLayout.responseEvent)
        #expect(Int(c.sring_pvt) == SharedRingLayout.privatePad)
        #expect(Int(c.sring_pad) == SharedRingLayout.pad)
        #expect(Int(c.sring_ring) == SharedRingLayout.headerSize)
        #expect(Int(c.sring_entry_size) == BlkifLayout.slotSize)
        #expect(Int(c.ring_size_one_page) == BlkifLayout.ringSize)
    }

    @Test func ringSizeRoundsDownToPowerOfTwoLikeRD32() {
        // (4096*n - 64) / 112 rounded down to a power of two, as __CONST_RING_SIZE.
        #expect(SharedRingLayout.slotCount(pages: 1, slotSize: 112) == 32)
        #expect(SharedRingLayout.slotCount(pages: 2, slotSize: 112) == 64)
        #expect(SharedRingLayout.slotCount(pages: 4, slotSize: 112) == 128)
        #expect(SharedRingLayout.slotCount(pages: 1, slotSize: 4096) == 0)
        #expect(SharedRingLayout.slotCount(pages: 0, slotSize: 112) == 0)
    }

    @Test func blkifRequestMatchesBlkifH() {
        let c = Self.c
        #expect(Int(c.req_size) == BlkifLayout.requestSize)
        #expect(Int(c.req_operation) == BlkifLayout.operation)
        #expect(Int(c.req_nr_segments) == BlkifLayout.segmentCount)
        #expect(Int(c.req_handle) == BlkifLayout.handle)
        #expect(Int(c.req_id) == BlkifLayout.id)
        #expect(Int(c.req_sector) == BlkifLayout.sectorNumber)
        #expect(Int(c.req_seg) == BlkifLayout.segments)
        #expect(Int(c.seg_size) == BlkifLayout.segmentSize)
        #expect(Int(c.seg_gref) == BlkifLayout.segmentGrantRef)
        #expect(Int(c.seg_first_sect) == BlkifLayout.segmentFirstSector)
        #expect(Int(c.seg_last_sect) == BlkifLayout.segmentLastSector)
        #expect(Int(c.discard_flag) == BlkifLayout.discardFlag)
        #expect(Int(c.discard_nr_sectors) == BlkifLayout.discardSectorCount)
        #expect(Int(c.max_segments) == BlkifLayout.maxSegments)
    }

    @Test func blkifResponseMatchesBlkifH() {
        let c = Self.c
        #expect(Int(c.rsp_size) == BlkifLayout.responseSize)
        #expect(Int(c.rsp_id) == BlkifLayout.responseId)
        #expect(Int(c.rsp_operation) == BlkifLayout.responseOperation)
        #expect(Int(c.rsp_status) == BlkifLayout.responseStatus)
    }

    @Test func constantsMatchHeaders() {
        let c = Self.c
        #expect(c.op_read == Int32(BlkOperation.read.rawValue))
        #expect(c.op_write == Int32(BlkOperation.write.rawValue))
        #expect(c.op_flush == Int32(BlkOperation.flush.rawValue))
        #expect(c.op_discard == Int32(BlkOperation.discard.rawValue))
        #expect(c.rsp_okay == Int32(BlkStatus.okay.rawValue))
        #expect(c.rsp_error == Int32(BlkStatus.error.rawValue))
        #expect(c.rsp_eopnotsupp == Int32(BlkStatus.notSupported.rawValue))
    }

    @Test func grantEntryV1MatchesGrantTableH() {
        let c = Self.c
        #expect(Int(c.gnt_size) == GrantLayout.entrySize)
        #expect(Int(c.gnt_flags) == GrantLayout.flags)
        #expect(Int(c.gnt_domid) == GrantLayout.domid)
        #expect(Int(c.gnt_frame) == GrantLayout.frame)
        #expect(c.gtf_permit_access == UInt32(GrantLayout.permitAccess))
        #expect(c.gtf_readonly == UInt32(GrantLayout.readOnly))
        #expect(c.gtf_reading == UInt32(GrantLayout.reading))
        #expect(c.gtf_writing == UInt32(GrantLayout.writing))
    }
}

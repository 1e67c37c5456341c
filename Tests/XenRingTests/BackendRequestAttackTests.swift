import SharedMemory
import Testing
@testable import XenRing

/// Frontend attacks on the backend (it does not trust blkfront either): a bad request is
/// answered BLKIF_RSP_ERROR with a typed reason and the backend keeps serving; a corrupt
/// ring (req_prod jump) drops the connection. The test plays the frontend by hand.
@Suite struct BackendRequestAttackTests {
    static let read: UInt8 = 0
    static let write: UInt8 = 1

    /// Publishes one hand-written request, lets the backend serve it, and returns the
    /// status it answered (read straight from the response slot).
    static func serveOne(
        _ p: XenPair, operation: UInt8 = read, id: UInt64 = 3, sector: UInt64 = 0,
        segments: [(UInt32, UInt8, UInt8)], count: UInt8? = nil
    ) throws -> Int16 {
        let index = p.requestProducer
        p.writeRequest(slot: index, operation: operation, id: id, sector: sector, segments: segments, count: count)
        SharedAccess.store32Release(p.ring + SharedRingLayout.requestProducer, index &+ 1)
        #expect(try p.back.serve(budget: 8) == 1)
        _ = p.back.publishResponses()
        let slot = p.slot(index)
        #expect(slot.load(fromByteOffset: 0, as: UInt64.self) == id)
        #expect(slot.load(fromByteOffset: 8, as: UInt8.self) == operation)
        return slot.load(fromByteOffset: 10, as: Int16.self)
    }

    /// After a rejected request, a good one (granted page, in range) is still served.
    static func expectStillServes(_ p: XenPair, sourceLocation: SourceLocation = #_sourceLocation) throws {
        p.grantByHand(ref: 20, frame: 5, flags: GrantLayout.permitAccess)
        let status = try serveOne(p, operation: read, id: 4, sector: 16, segments: [(20, 0, 7)])
        #expect(status == BlkStatus.okay.rawValue, sourceLocation: sourceLocation)
        #expect(p.grantFlags(20) == GrantLayout.permitAccess, sourceLocation: sourceLocation)  // unmapped again
    }

    func rejected(_ p: XenPair, _ v: XenViolation, _ status: Int16, sourceLocation: SourceLocation = #_sourceLocation)
        throws
    {
        #expect(status == BlkStatus.error.rawValue, sourceLocation: sourceLocation)
        #expect(p.back.lastRejection == v, sourceLocation: sourceLocation)
        #expect(p.back.rejectedRequests == 1, sourceLocation: sourceLocation)
        try Self.expectStillServes(p, sourceLocation: sourceLocation)
    }

    @Test func requestProducerJumpDropsConnection() throws {
        let p = try XenPair()
        SharedAccess.store32Release(p.ring + SharedRingLayout.requestProducer, 33)
        #expect(throws: XenViolation.xenRequestProducerOverflow(consumer: 0, producer: 33, ringSize: 32)) {
            try p.back.serve(budget: 64)
        }
        // A fresh connection (new backend ring state) serves a good frontend.
        let q = try XenPair()
        #expect(try q.roundTrip())
    }

    @Test func requestProducerBackwardsDropsConnection() throws {
        let p = try XenPair()
        SharedAccess.store32Release(p.ring + SharedRingLayout.requestProducer, 0 &- 1)
        #expect(throws: XenViolation.xenRequestProducerOverflow(consumer: 0, producer: 0 &- 1, ringSize: 32)) {
            try p.back.serve(budget: 64)
        }
    }

    @Test func moreThanElevenSegmentsFailsRequest() throws {
        let p = try XenPair()
        p.grantByHand(ref: 10, frame: 3, flags: GrantLayout.permitAccess)
        let status = try Self.serveOne(p, segments: Array(repeating: (10, 0, 7), count: 11), count: 12)
        try rejected(p, .xenRequestSegmentCount(id: 3, count: 12), status)
    }

    @Test func zeroSegmentsFailsRequest() throws {
        let p = try XenPair()
        let status = try Self.serveOne(p, segments: [], count: 0)
        try rejected(p, .xenRequestSegmentCount(id: 3, count: 0), status)
    }

    @Test func firstSectorAfterLastFailsRequest() throws {
        let p = try XenPair()
        p.grantByHand(ref: 10, frame: 3, flags: GrantLayout.permitAccess)
        let status = try Self.serveOne(p, segments: [(10, 5, 2)])
        try rejected(p, .xenRequestSectorRange(id: 3, segment: 0, first: 5, last: 2), status)
    }

    @Test func lastSectorBeyondPageFailsRequest() throws {
        let p = try XenPair()
        p.grantByHand(ref: 10, frame: 3, flags: GrantLayout.permitAccess)
        let status = try Self.serveOne(p, segments: [(10, 0, 7), (10, 0, 8)])
        try rejected(p, .xenRequestSectorRange(id: 3, segment: 1, first: 0, last: 8), status)
    }

    @Test func grantRefOutOfRangeFailsRequest() throws {
        let p = try XenPair()
        let status = try Self.serveOne(p, segments: [(512, 0, 7)])
        try rejected(p, .xenGrantRefOutOfRange(ref: 512, entries: 512), status)
    }

    @Test func grantRefHugeFailsRequest() throws {
        let p = try XenPair()
        let status = try Self.serveOne(p, segments: [(.max, 0, 7)])
        try rejected(p, .xenGrantRefOutOfRange(ref: .max, entries: 512), status)
    }

    @Test func grantRefNotGrantedFailsRequest() throws {
        let p = try XenPair()
        let status = try Self.serveOne(p, segments: [(30, 0, 7)])
        try rejected(p, .xenGrantNotGranted(ref: 30, flags: 0), status)
    }

    /// A disk read writes into the page: a read-only grant must be refused.
    @Test func readOnlyGrantForDiskReadFailsRequest() throws {
        let p = try XenPair()
        let flags = GrantLayout.permitAccess | GrantLayout.readOnly
        p.grantByHand(ref: 10, frame: 3, flags: flags)
        let status = try Self.serveOne(p, operation: Self.read, segments: [(10, 0, 7)])
        try rejected(p, .xenGrantNotGranted(ref: 10, flags: flags), status)
    }

    /// A grant whose frame lies outside the shared frames is refused (R7).
    @Test func grantFrameOutsideSharedMemoryFailsRequest() throws {
        let p = try XenPair()
        p.grantByHand(ref: 10, frame: 64, flags: GrantLayout.permitAccess)
        let status = try Self.serveOne(p, segments: [(10, 0, 7)])
        try rejected(p, .xenGrantRefOutOfRange(ref: 10, entries: 512), status)
    }

    /// All or nothing: when the second grant fails, the first is unmapped again.
    @Test func partiallyMappedRequestUnmapsWhatItMapped() throws {
        let p = try XenPair()
        p.grantByHand(ref: 10, frame: 3, flags: GrantLayout.permitAccess)
        let status = try Self.serveOne(p, segments: [(10, 0, 7), (11, 0, 7)])
        try rejected(p, .xenGrantNotGranted(ref: 11, flags: 0), status)
        #expect(p.grantFlags(10) == GrantLayout.permitAccess)
    }

    @Test func sectorBeyondCapacityFailsRequest() throws {
        let p = try XenPair(sectors: 64)
        p.grantByHand(ref: 10, frame: 3, flags: GrantLayout.permitAccess)
        let status = try Self.serveOne(p, sector: 60, segments: [(10, 0, 7)])
        #expect(status == BlkStatus.error.rawValue)
        #expect(p.back.lastRejection == .xenSectorBeyondCapacity(id: 3, sector: 60, count: 8, capacity: 64))
    }

    @Test func sectorOverflowFailsRequest() throws {
        let p = try XenPair()
        p.grantByHand(ref: 10, frame: 3, flags: GrantLayout.permitAccess)
        let status = try Self.serveOne(p, sector: .max - 2, segments: [(10, 0, 7)])
        try rejected(p, .xenSectorBeyondCapacity(id: 3, sector: .max - 2, count: 8, capacity: 2048), status)
    }

    @Test func discardBeyondCapacityFailsRequest() throws {
        let p = try XenPair()
        let index = p.requestProducer
        p.writeRequest(slot: index, operation: BlkOperation.discard.rawValue, id: 9, sector: 2000, segments: [])
        p.slot(index).storeBytes(of: UInt64(100), toByteOffset: 24, as: UInt64.self)
        SharedAccess.store32Release(p.ring + SharedRingLayout.requestProducer, index &+ 1)
        _ = try p.back.serve(budget: 8)
        #expect(p.back.lastRejection == .xenSectorBeyondCapacity(id: 9, sector: 2000, count: 100, capacity: 2048))
        try Self.expectStillServes(p)
    }

    @Test func unknownOperationIsNotSupported() throws {
        let p = try XenPair()
        let status = try Self.serveOne(p, operation: 42, segments: [])
        #expect(status == BlkStatus.notSupported.rawValue)
        try Self.expectStillServes(p)
    }

    /// R2 on the backend: the request is copied once; rewriting the slot after the copy
    /// does not change what was served.
    @Test func requestRewrittenAfterCopyIsNotReread() throws {
        let p = try XenPair()
        p.grantByHand(ref: 10, frame: 3, flags: GrantLayout.permitAccess)
        p.storage.withBytes { $0[0] = 0xab }
        let status = try Self.serveOne(p, segments: [(10, 0, 0)])
        #expect(status == 0)
        p.writeRequest(slot: 0, operation: 1, id: 66, sector: 9999, segments: [(1000, 9, 1)])
        #expect(try p.back.serve(budget: 8) == 0)
        #expect(p.memory.page(3).load(as: UInt8.self) == 0xab)
    }
}

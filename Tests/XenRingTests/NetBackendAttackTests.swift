import SharedMemory
import Testing
@testable import XenRing

/// A malicious netfront, played by writing the tx ring by hand against the hardened
/// netback: structure violations drop the connection (typed), a frame with bad sizes or
/// grants is answered NETIF_RSP_ERROR and serving goes on; other pairs are untouched.
@Suite struct NetBackendAttackTests {
    /// A pair whose ref 100 grants frame 70 to the backend read-only, filled with 0x11.
    func pair() throws -> NetPair {
        let pair = try NetPair()
        pair.memory.page(70).initializeMemory(as: UInt8.self, repeating: 0x11, count: 4096)
        pair.grantByHand(ref: 100, frame: 70, flags: GrantLayout.permitAccess | GrantLayout.readOnly)
        return pair
    }

    func serve(_ pair: NetPair) throws(XenViolation) -> Int {
        try pair.back.serveTx(budget: 64) { pair.delivered.append(Array($0.bytes)) }
    }

    func expectDropped(_ pair: NetPair, _ v: XenViolation, sourceLocation: SourceLocation = #_sourceLocation) throws {
        #expect(throws: v, sourceLocation: sourceLocation) { try serve(pair) }
        #expect(pair.delivered.isEmpty, sourceLocation: sourceLocation)
        #expect(try NetPair().roundTrip(), sourceLocation: sourceLocation)
    }

    @Test func wellFormedHandMadeFrameIsDelivered() throws {
        let p = try pair()
        p.writeTxRequest(slot: 0, ref: 100, flags: NetFlags.txMoreData, id: 9, size: 150)
        p.writeTxRequest(slot: 1, ref: 100, offset: 4000, id: 10, size: 50)
        p.setTxRequestProducer(2)
        #expect(try serve(p) == 1)
        #expect(p.delivered == [[UInt8](repeating: 0x11, count: 150)])
        _ = p.back.publishResponses()
        #expect(p.txResponse(0) == (9, 0) && p.txResponse(1) == (10, 0))
    }

    @Test func requestProducerOverflowDropsConnection() throws {
        let p = try pair()
        p.setTxRequestProducer(257)
        try expectDropped(p, .xenRequestProducerOverflow(consumer: 0, producer: 257, ringSize: 256))
    }

    @Test func moreDataChainPastTheLimitDropsConnection() throws {
        let p = try pair()
        for i in 0..<20 {
            p.writeTxRequest(slot: UInt32(i), ref: 100, flags: NetFlags.txMoreData, id: UInt16(i), size: 1)
        }
        p.setTxRequestProducer(20)
        try expectDropped(p, .xenNetChainTooLong(slots: 19, limit: 18))
    }

    @Test func moreDataChainPastRequestProducerDropsConnection() throws {
        let p = try pair()
        p.writeTxRequest(slot: 0, ref: 100, flags: NetFlags.txMoreData, id: 0, size: 100)
        p.setTxRequestProducer(1)
        try expectDropped(p, .xenNetChainIncomplete(slots: 1))
    }

    @Test func offsetPlusSizePastThePageDropsConnection() throws {
        let p = try pair()
        p.writeTxRequest(slot: 0, ref: 100, offset: 4000, id: 3, size: 200)
        p.setTxRequestProducer(1)
        try expectDropped(p, .xenNetRequestSize(id: 3, offset: 4000, size: 200))
    }

    @Test(arguments: [UInt8(0), 5, 99])
    func bogusExtraInfoTypeDropsConnection(type: UInt8) throws {
        let p = try pair()
        p.writeTxRequest(slot: 0, ref: 100, flags: NetFlags.txExtraInfo, id: 0, size: 100)
        p.writeTxExtra(slot: 1, type: type)
        p.setTxRequestProducer(2)
        try expectDropped(p, .xenNetExtraInfoType(type: type))
    }

    @Test func endlessExtraInfoChainDropsConnection() throws {
        let p = try pair()
        p.writeTxRequest(slot: 0, ref: 100, flags: NetFlags.txExtraInfo, id: 0, size: 100)
        for (i, t) in [NetExtraType.gso, .multicastAdd, .multicastDelete, .hash, .gso].enumerated() {
            p.writeTxExtra(slot: UInt32(i + 1), type: t.rawValue, flags: NetFlags.extraMore)
        }
        p.setTxRequestProducer(6)
        try expectDropped(p, .xenNetExtraInfoChain(count: 5))
    }

    @Test func invalidGSOFieldsDropConnection() throws {
        let p = try pair()
        p.writeTxRequest(slot: 0, ref: 100, flags: NetFlags.txExtraInfo, id: 0, size: 100)
        p.writeTxExtra(slot: 1, type: NetExtraType.gso.rawValue, gsoSize: 0)
        p.setTxRequestProducer(2)
        try expectDropped(p, .xenNetGSOField(type: 1, size: 0))
    }

    /// Fragments bigger than the frame, a runt frame, and grants that are not ours fail
    /// their frame (ERROR on every slot, NULL on the extra) and serving goes on.
    @Test func badSizesAndGrantsFailOnlyTheirFrame() throws {
        let p = try pair()
        p.writeTxRequest(slot: 0, ref: 100, flags: NetFlags.txMoreData, id: 1, size: 100)
        p.writeTxRequest(slot: 1, ref: 100, id: 2, size: 200)
        p.writeTxRequest(slot: 2, ref: 100, id: 3, size: 10)
        p.writeTxRequest(slot: 3, ref: 9999, flags: NetFlags.txExtraInfo, id: 4, size: 100)
        p.writeTxExtra(slot: 4, type: NetExtraType.gso.rawValue)
        p.writeTxRequest(slot: 5, ref: 101, id: 5, size: 100)
        p.writeTxRequest(slot: 6, ref: 100, id: 6, size: 64)
        p.setTxRequestProducer(7)
        #expect(try serve(p) == 5)
        _ = p.back.publishResponses()
        let error = NetStatus.error.rawValue
        #expect((0..<7).map { p.txResponse(UInt32($0)).status } == [error, error, error, error, 1, error, 0])
        #expect(p.back.rejectedFrames == 4)
        #expect(p.back.lastRejection == .xenGrantNotGranted(ref: 101, flags: 0))
        #expect(p.delivered == [[UInt8](repeating: 0x11, count: 64)])
    }

    /// rx: a request whose grant is not writable is answered ERROR; the frame is failed.
    @Test func rxRequestWithReadOnlyGrantIsAnsweredError() throws {
        let p = try pair()
        p.rxSlot(0).storeBytes(of: UInt64(0) | UInt64(100) << 32, as: UInt64.self)
        SharedAccess.store32Release(p.rxRing + SharedRingLayout.requestProducer, 1)
        let result = try [UInt8](repeating: 1, count: 60).withUnsafeBytes { try p.back.send($0) }
        #expect(
            result == .failed(.xenGrantNotGranted(ref: 100, flags: GrantLayout.permitAccess | GrantLayout.readOnly)))
        #expect(p.rxSlot(0).load(fromByteOffset: 6, as: Int16.self) == NetStatus.error.rawValue)
    }

    @Test func rxRequestProducerOverflowDropsConnection() throws {
        let p = try pair()
        SharedAccess.store32Release(p.rxRing + SharedRingLayout.requestProducer, 300)
        #expect(throws: XenViolation.xenRequestProducerOverflow(consumer: 0, producer: 300, ringSize: 256)) {
            try [UInt8](repeating: 1, count: 60).withUnsafeBytes { try p.back.send($0) }
        }
    }

    @Test func rxWithoutPostedBuffersWaits() throws {
        let p = try pair()
        #expect(try [UInt8](repeating: 1, count: 60).withUnsafeBytes { try p.back.send($0) } == .noBuffers)
    }
}

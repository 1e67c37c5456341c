import SharedMemory
import Testing
@testable import XenRing

/// A malicious netback, played by writing the rings by hand: each check of the hardened
/// netfront provoked, the exact typed violation asserted, the R6 contract checked.
@Suite struct NetFrontendAttackTests {
    /// A pair with `rx` rx pages posted and one 60-byte frame (token 7) in flight on tx.
    func posted(rx: Int = 8, tx: Bool = true) throws -> NetPair {
        let pair = try NetPair(rxPages: rx)
        pair.front.refillRx()
        _ = pair.front.publishRx()
        if tx {
            try [UInt8](repeating: 1, count: 60).withUnsafeBytes { try pair.front.submit(frame: $0, token: 7) }
            _ = pair.front.publishTx()
        }
        return pair
    }

    func receive(_ pair: NetPair) throws(XenViolation) -> NetReceivedFrame? {
        var buffer = [UInt8](repeating: 0, count: 65536)
        var result: Result<NetReceivedFrame?, XenViolation> = .success(nil)
        buffer.withUnsafeMutableBytes { b in
            result = Result { () throws(XenViolation) in try pair.front.nextReceived(into: b) }
        }
        return try result.get()
    }

    func expectRx(_ pair: NetPair, _ v: XenViolation, sourceLocation: SourceLocation = #_sourceLocation) throws {
        #expect(throws: v, sourceLocation: sourceLocation) { try receive(pair) }
        try expectNetDisabled(pair, v, inFlight: [7], other: try NetPair(), sourceLocation: sourceLocation)
    }

    // MARK: rx responses

    @Test func rxIdOutOfRangeDisablesDevice() throws {
        let pair = try posted()
        pair.writeRxResponse(slot: 0, id: 300, status: 10)
        pair.setRxResponseProducer(1)
        try expectRx(pair, .xenResponseIdOutOfRange(id: 300, ringSize: 256))
    }

    @Test func rxIdNeverPostedDisablesDevice() throws {
        let pair = try posted(rx: 2)
        pair.writeRxResponse(slot: 0, id: 5, status: 10)
        pair.setRxResponseProducer(1)
        try expectRx(pair, .xenResponseIdNotInFlight(id: 5))
    }

    @Test func rxIdDuplicatedDisablesDevice() throws {
        let pair = try posted()
        pair.writeRxResponse(slot: 0, id: 0, status: 10)
        pair.writeRxResponse(slot: 1, id: 0, status: 10)
        pair.setRxResponseProducer(2)
        #expect(try receive(pair)?.length == 10)
        try expectRx(pair, .xenResponseIdNotInFlight(id: 0))
    }

    @Test func rxIdOfAnotherSlotDisablesDevice() throws {
        let pair = try posted()
        pair.writeRxResponse(slot: 0, id: 3, status: 10)
        pair.setRxResponseProducer(1)
        try expectRx(pair, .xenNetRxIdOutOfOrder(id: 3, expected: 0))
    }

    @Test func rxOffsetPlusSizePastThePageDisablesDevice() throws {
        let pair = try posted()
        pair.writeRxResponse(slot: 0, id: 0, offset: 4000, status: 200)
        pair.setRxResponseProducer(1)
        try expectRx(pair, .xenNetRxOffsetBeyondPage(id: 0, offset: 4000, size: 200))
    }

    @Test func rxStatusGarbageDisablesDevice() throws {
        let pair = try posted()
        pair.writeRxResponse(slot: 0, id: 0, status: -7)
        pair.setRxResponseProducer(1)
        try expectRx(pair, .xenNetStatusUnknown(ring: "rx", id: 0, status: -7))
    }

    /// Every posted slot answered with more_data: the chain runs into rsp_prod.
    @Test func endlessMoreDataWithinThePostedSlotsDisablesDevice() throws {
        let pair = try posted(rx: 8)
        for i in 0..<8 { pair.writeRxResponse(slot: UInt32(i), id: UInt16(i), flags: NetFlags.rxMoreData, status: 100) }
        pair.setRxResponseProducer(8)
        try expectRx(pair, .xenNetChainIncomplete(slots: 8))
    }

    @Test func moreDataChainLongerThanAFrameDisablesDevice() throws {
        let pair = try posted(rx: 64)
        for i in 0..<64 {
            pair.writeRxResponse(slot: UInt32(i), id: UInt16(i), flags: NetFlags.rxMoreData, status: 100)
        }
        pair.setRxResponseProducer(64)
        try expectRx(pair, .xenNetChainTooLong(slots: 19, limit: 18))
    }

    @Test(arguments: [UInt8(0), 2, 3, 5, 200])
    func bogusExtraInfoTypeDisablesDevice(type: UInt8) throws {
        let pair = try posted()
        pair.writeRxResponse(slot: 0, id: 0, flags: NetFlags.rxExtraInfo, status: 60)
        pair.writeRxExtra(slot: 1, type: type)
        pair.setRxResponseProducer(2)
        try expectRx(pair, .xenNetExtraInfoType(type: type))
    }

    @Test func extraInfoTypeTwiceDisablesDevice() throws {
        let pair = try posted()
        pair.writeRxResponse(slot: 0, id: 0, flags: NetFlags.rxExtraInfo, status: 60)
        pair.writeRxExtra(slot: 1, type: NetExtraType.gso.rawValue, flags: NetFlags.extraMore)
        pair.writeRxExtra(slot: 2, type: NetExtraType.gso.rawValue)
        pair.setRxResponseProducer(3)
        try expectRx(pair, .xenNetExtraInfoChain(count: 2))
    }

    @Test func endlessExtraInfoChainDisablesDevice() throws {
        let pair = try posted()
        pair.writeRxResponse(slot: 0, id: 0, flags: NetFlags.rxExtraInfo, status: 60)
        pair.writeRxExtra(slot: 1, type: NetExtraType.hash.rawValue, flags: NetFlags.extraMore)
        pair.setRxResponseProducer(2)
        try expectRx(pair, .xenNetChainIncomplete(slots: 2))
    }

    @Test(arguments: [(UInt8(1), UInt16(0)), (0, 1448), (3, 1448)])
    func invalidGSOFieldsDisableDevice(type: UInt8, size: UInt16) throws {
        let pair = try posted()
        pair.writeRxResponse(slot: 0, id: 0, flags: NetFlags.rxExtraInfo, status: 60)
        pair.writeRxExtra(slot: 1, type: NetExtraType.gso.rawValue, gsoSize: size, gsoType: type)
        pair.setRxResponseProducer(2)
        try expectRx(pair, .xenNetGSOField(type: type, size: size))
    }

    @Test func rxResponseProducerRunAheadDisablesDevice() throws {
        let pair = try posted(rx: 4)
        pair.setRxResponseProducer(5)
        try expectRx(pair, .xenResponseProducerBeyondInFlight(consumer: 0, producer: 5, inFlight: 4))
    }

    @Test func rxResponseProducerBackwardsDisablesDevice() throws {
        let pair = try posted(rx: 4)
        pair.writeRxResponse(slot: 0, id: 0, status: 10)
        pair.setRxResponseProducer(1)
        #expect(try receive(pair)?.length == 10)
        pair.setRxResponseProducer(0)
        try expectRx(pair, .xenResponseProducerWentBackwards(consumer: 1, producer: 0))
    }

    // An rx page kept mapped after answering is no violation while the connection lives
    // (persistent rx grants): `NetPersistentGrantTests.failAllRevokesEveryRxGrantAndQuarantinesOneStillMapped`.

    // MARK: tx responses

    func expectTx(_ pair: NetPair, _ v: XenViolation, sourceLocation: SourceLocation = #_sourceLocation) throws {
        #expect(throws: v, sourceLocation: sourceLocation) { try pair.front.nextTxCompletion() }
        try expectNetDisabled(pair, v, inFlight: [7], other: try NetPair(), sourceLocation: sourceLocation)
    }

    @Test func txStatusGarbageDisablesDevice() throws {
        let pair = try posted()
        pair.writeTxResponse(slot: 0, id: 0, status: 77)
        pair.setTxResponseProducer(1)
        try expectTx(pair, .xenNetStatusUnknown(ring: "tx", id: 0, status: 77))
    }

    @Test func txIdOutOfRangeDisablesDevice() throws {
        let pair = try posted()
        pair.writeTxResponse(slot: 0, id: 999, status: 0)
        pair.setTxResponseProducer(1)
        try expectTx(pair, .xenResponseIdOutOfRange(id: 999, ringSize: 256))
    }

    @Test func txIdNotInFlightDisablesDevice() throws {
        let pair = try posted()
        pair.writeTxResponse(slot: 0, id: 5, status: 0)
        pair.setTxResponseProducer(1)
        try expectTx(pair, .xenResponseIdNotInFlight(id: 5))
    }

    @Test func txNullWithoutExtraSlotDisablesDevice() throws {
        let pair = try posted()
        pair.writeTxResponse(slot: 0, id: 0, status: NetStatus.null.rawValue)
        pair.setTxResponseProducer(1)
        try expectTx(pair, .xenNetUnexpectedNullResponse(position: 0))
    }

    @Test func txResponseProducerRunAheadDisablesDevice() throws {
        let pair = try posted()
        pair.setTxResponseProducer(2)
        try expectTx(pair, .xenResponseProducerBeyondInFlight(consumer: 0, producer: 2, inFlight: 1))
    }

    @Test func txResponseProducerBackwardsDisablesDevice() throws {
        let pair = try posted()
        pair.setTxResponseProducer(0xffff_fff0)
        try expectTx(pair, .xenResponseProducerWentBackwards(consumer: 0, producer: 0xffff_fff0))
    }

    @Test func txGrantKeptMappedIsQuarantined() throws {
        let pair = try posted()
        let ref = pair.txRequestRef(0)
        _ = try pair.back.mapper.map(ref, write: false)
        pair.writeTxResponse(slot: 0, id: 0, status: 0)
        pair.setTxResponseProducer(1)
        let flags = GrantLayout.permitAccess | GrantLayout.readOnly | GrantLayout.reading
        try expectTx(pair, .xenGrantStillMapped(ref: ref, flags: flags))
        #expect(pair.issuer.quarantined == [ref])
    }

    @Test func txErrorStatusFailsTheFrameNotTheDevice() throws {
        let pair = try posted()
        pair.writeTxResponse(slot: 0, id: 0, status: NetStatus.dropped.rawValue)
        pair.setTxResponseProducer(1)
        #expect(try pair.front.nextTxCompletion() == NetTxCompletion(token: 7, status: .dropped))
        #expect(!pair.front.isBroken)
    }
}

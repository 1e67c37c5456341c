import RingTestSupport
import SharedMemory
import Testing
import Virtqueue

/// R3 + R6 on the driver: the test plays a malicious device that writes the used ring of
/// queue 0 by hand. Each check must throw its exact `Violation`, break queue 0 for good
/// (until `reset()`), hand back exactly the in-flight tokens, and leave queue 1 alone.
@Suite struct DriverUsedRingViolationTests {
    static func makePair() throws -> RingPair { try RingPair(queueCount: 2, queueSize: 8) }

    /// The R6 contract after `v`: sticky, `failAll` == `inFlight`, queue 1 unaffected,
    /// `reset()` recovers queue 0.
    static func expectBrokenAndContained(
        _ pair: RingPair, _ v: Violation, inFlight: [UInt64], sourceLocation: SourceLocation = #_sourceLocation
    ) throws {
        let d = pair.driver
        #expect(d.isBroken, sourceLocation: sourceLocation)
        #expect(d.violation == v, sourceLocation: sourceLocation)
        // Sticky: the same violation again, whatever the device does now.
        #expect(throws: v, sourceLocation: sourceLocation) { try d.nextCompletion() }
        RingAttacker(pair).complete(slot: d.lastUsed, id: 0, length: 0)
        #expect(throws: v, sourceLocation: sourceLocation) { try d.nextCompletion() }
        let s = Segment(address: pair.pool.guestAddress, length: 8, deviceWritable: true)
        #expect(throws: SubmitError.broken(v), sourceLocation: sourceLocation) { try d.add([s], token: 99) }
        #expect(d.publish() == false, sourceLocation: sourceLocation)
        #expect(d.failAll().sorted() == inFlight.sorted(), sourceLocation: sourceLocation)
        #expect(d.failAll() == [], sourceLocation: sourceLocation)
        #expect(d.inFlightCount == 0, sourceLocation: sourceLocation)
        // Blast radius = one queue (R6): queue 1 of the same region still round-trips.
        #expect(!pair.drivers[1].isBroken, sourceLocation: sourceLocation)
        try echoWorks(pair, queue: 1)
        // Recovery is explicit: reset, then a fresh device on the zeroed ring.
        d.reset()
        #expect(!d.isBroken && d.freeCount == 8 && d.inFlightCount == 0, sourceLocation: sourceLocation)
        let device = try freshDevice(pair)
        for i in 0..<10 {
            try echo(
                driver: d, pool: pair.pool, device: device, memory: pair.memory,
                payload: [UInt8](repeating: UInt8(i), count: 33 + i), token: 500 + UInt64(i))
        }
        #expect(d.freeCount == 8, sourceLocation: sourceLocation)
    }

    // MARK: used.idx

    @Test func usedIndexJumpBeyondInFlightBreaksQueue() throws {
        let pair = try Self.makePair()
        try post(pair, token: 10)
        try post(pair, token: 11)
        _ = pair.driver.publish()
        RingAttacker(pair).setUsedIndex(3)
        let v = Violation.usedIndexBeyondInFlight(lastSeen: 0, published: 3, inFlight: 2)
        #expect(throws: v) { try pair.driver.nextCompletion() }
        try Self.expectBrokenAndContained(pair, v, inFlight: [10, 11])
    }

    @Test func usedIndexMovingWithNothingInFlightBreaksQueue() throws {
        let pair = try Self.makePair()
        RingAttacker(pair).setUsedIndex(1)
        let v = Violation.usedIndexBeyondInFlight(lastSeen: 0, published: 1, inFlight: 0)
        #expect(throws: v) { try pair.driver.nextCompletion() }
        try Self.expectBrokenAndContained(pair, v, inFlight: [])
    }

    @Test func usedIndexEqualToInFlightIsAccepted() throws {
        let pair = try Self.makePair()
        let a = RingAttacker(pair)
        for t in 0..<8 { try post(pair, readable: 0, token: UInt64(t)) }
        _ = pair.driver.publish()
        for slot in 0..<8 { a.writeUsed(slot: slot, id: UInt32(7 - slot), length: 0) }
        a.setUsedIndex(8)
        var tokens: [UInt64] = []
        while let c = try pair.driver.nextCompletion() { tokens.append(c.token) }
        #expect(tokens == (0..<8).reversed().map { UInt64($0) })
        #expect(pair.driver.freeCount == 8 && !pair.driver.isBroken)
    }

    @Test func usedIndexWentBackwardsBreaksQueue() throws {
        let pair = try Self.makePair()
        let a = RingAttacker(pair)
        let h0 = try post(pair, token: 10)
        try post(pair, token: 11)
        _ = pair.driver.publish()
        a.complete(slot: 0, id: UInt32(h0), length: 4)
        #expect(try pair.driver.nextCompletion()?.token == 10)
        #expect(try pair.driver.nextCompletion() == nil)
        a.setUsedIndex(0)
        let v = Violation.usedIndexWentBackwards(lastSeen: 1, published: 0)
        #expect(throws: v) { try pair.driver.nextCompletion() }
        try Self.expectBrokenAndContained(pair, v, inFlight: [11])
    }

    // MARK: used id

    @Test(arguments: [UInt32(8), 0x1_0000, 0x1_0001, 0xFFFF_FFFF])
    func usedIdOutOfRangeBreaksQueue(id: UInt32) throws {
        // 0x10000 and 0x10001 truncate to in-flight heads 0 and 1: must still be out of range.
        let pair = try Self.makePair()
        try post(pair, token: 10)
        try post(pair, token: 11)
        _ = pair.driver.publish()
        RingAttacker(pair).complete(slot: 0, id: id, length: 0)
        let v = Violation.usedIdOutOfRange(id: id, queueSize: 8)
        #expect(throws: v) { try pair.driver.nextCompletion() }
        try Self.expectBrokenAndContained(pair, v, inFlight: [10, 11])
    }

    @Test func usedIdNeverPostedBreaksQueue() throws {
        let pair = try Self.makePair()
        let h = try post(pair, token: 10)
        #expect(h == 0)
        _ = pair.driver.publish()
        RingAttacker(pair).complete(slot: 0, id: 5, length: 0)
        let v = Violation.usedIdNotInFlight(id: 5)
        #expect(throws: v) { try pair.driver.nextCompletion() }
        try Self.expectBrokenAndContained(pair, v, inFlight: [10])
    }

    @Test(arguments: [UInt32(1), 2])
    func usedIdNonHeadOfChainBreaksQueue(id: UInt32) throws {
        // A 3-descriptor chain occupies 0 -> 1 -> 2; only 0 may complete it.
        let pair = try Self.makePair()
        let h = try post(pair, readable: 16, writable: 64, writableSegments: 2, token: 10)
        #expect(h == 0 && pair.driver.freeCount == 5)
        _ = pair.driver.publish()
        RingAttacker(pair).complete(slot: 0, id: id, length: 0)
        let v = Violation.usedIdNotInFlight(id: id)
        #expect(throws: v) { try pair.driver.nextCompletion() }
        try Self.expectBrokenAndContained(pair, v, inFlight: [10])
    }

    @Test func duplicateCompletionInOneBatchBreaksQueue() throws {
        let pair = try Self.makePair()
        let a = RingAttacker(pair)
        let h0 = try post(pair, token: 10)
        try post(pair, token: 11)
        _ = pair.driver.publish()
        a.writeUsed(slot: 0, id: UInt32(h0), length: 1)
        a.writeUsed(slot: 1, id: UInt32(h0), length: 1)
        a.setUsedIndex(2)
        #expect(try pair.driver.nextCompletion()?.token == 10)
        let v = Violation.usedIdNotInFlight(id: UInt32(h0))
        #expect(throws: v) { try pair.driver.nextCompletion() }
        try Self.expectBrokenAndContained(pair, v, inFlight: [11])
    }

    @Test func duplicateCompletionAcrossBatchesBreaksQueue() throws {
        let pair = try Self.makePair()
        let a = RingAttacker(pair)
        let h0 = try post(pair, token: 10)
        try post(pair, token: 11)
        _ = pair.driver.publish()
        a.complete(slot: 0, id: UInt32(h0), length: 1)
        #expect(try pair.driver.nextCompletion()?.token == 10)
        #expect(try pair.driver.nextCompletion() == nil)
        a.complete(slot: 1, id: UInt32(h0), length: 1)
        let v = Violation.usedIdNotInFlight(id: UInt32(h0))
        #expect(throws: v) { try pair.driver.nextCompletion() }
        try Self.expectBrokenAndContained(pair, v, inFlight: [11])
    }

    // MARK: used len

    @Test(arguments: [(UInt32(65), 1), (65, 2), (0xFFFF_FFFF, 1), (0x8000_0000, 2)])
    func usedLengthBeyondWritableBreaksQueue(length: UInt32, writableSegments: Int) throws {
        let pair = try Self.makePair()
        try post(pair, readable: 100, writable: 64, writableSegments: writableSegments, token: 10)
        try post(pair, token: 11)
        _ = pair.driver.publish()
        RingAttacker(pair).complete(slot: 0, id: 0, length: length)
        let v = Violation.usedLengthTooLarge(id: 0, length: length, writable: 64)
        #expect(throws: v) { try pair.driver.nextCompletion() }
        try Self.expectBrokenAndContained(pair, v, inFlight: [10, 11])
    }

    @Test func usedLengthOnReadOnlyRequestBreaksQueue() throws {
        let pair = try Self.makePair()
        try pair.driver.add([Segment(address: pair.pool.guestAddress, length: 512, deviceWritable: false)], token: 10)
        _ = pair.driver.publish()
        RingAttacker(pair).complete(slot: 0, id: 0, length: 1)
        let v = Violation.usedLengthTooLarge(id: 0, length: 1, writable: 0)
        #expect(throws: v) { try pair.driver.nextCompletion() }
        try Self.expectBrokenAndContained(pair, v, inFlight: [10])
    }

    @Test(arguments: [UInt32(0), 1, 63, 64])
    func usedLengthUpToWritableIsAccepted(length: UInt32) throws {
        let pair = try Self.makePair()
        let a = RingAttacker(pair)
        try post(pair, readable: 100, writable: 64, writableSegments: 2, token: 10)
        _ = pair.driver.publish()
        a.complete(slot: 0, id: 0, length: length)
        let c = try #require(try pair.driver.nextCompletion())
        #expect(c.token == 10 && c.head == 0 && c.length == length)
        #expect(!pair.driver.isBroken)
        #expect(pair.driver.freeCount == 8 && pair.driver.inFlightCount == 0)
        #expect(try pair.driver.nextCompletion() == nil)
        // The queue keeps working (the device side never consumed the hand-completed chain,
        // so go on with a fresh one after a reset of both).
        pair.driver.reset()
        try echo(
            driver: pair.driver, pool: pair.pool, device: try freshDevice(pair), memory: pair.memory,
            payload: [1, 2, 3])
    }
}

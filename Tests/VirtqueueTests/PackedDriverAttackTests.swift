import RingTestSupport
import SharedMemory
import Testing
import Virtqueue

/// Issue 7, driver side: the test plays a malicious device writing the packed ring of
/// queue 0 by hand. Each attack must throw its exact `Violation`, break queue 0 for good
/// (until `reset()`), hand back exactly the in-flight tokens, and leave queue 1 alone.
@Suite struct PackedDriverAttackTests {
    static let size = 8

    static func makePair(_ features: RingFeatures = RingFeatures()) throws -> PackedRingPair {
        try PackedRingPair(queueCount: 2, queueSize: size, features: features, bounceBytesPerQueue: 64 * 1024)
    }

    /// Posts one request of a readable and a 64-byte writable segment (2 slots).
    @discardableResult
    static func post(_ pair: PackedRingPair, token: UInt64, queue q: Int = 0) throws -> UInt16 {
        let pool = pair.pools[q]
        let out = try #require(pool.allocate(16))
        let back = try #require(pool.allocate(64))
        let id = try pair.drivers[q].add(
            [pool.segment(out, deviceWritable: false), pool.segment(back, deviceWritable: true)], token: token)
        _ = pair.drivers[q].publish()
        return id
    }

    /// One honest round trip on queue `q` with the library's device.
    static func roundTrip(_ pair: PackedRingPair, queue q: Int, token: UInt64) throws {
        try post(pair, token: token, queue: q)
        var chain = DescriptorChain()
        #expect(try pair.devices[q].nextChain(into: &chain, memory: pair.memory) == .ready)
        #expect(chain.writableLength == 64 && chain.readableLength == 16)
        pair.devices[q].complete(head: chain.head, length: 64)
        _ = pair.devices[q].publishUsed()
        let c = try #require(try pair.drivers[q].nextCompletion())
        #expect(c.token == token && c.length == 64)
    }

    /// The R6 contract after `v`.
    static func expectBrokenAndContained(
        _ pair: PackedRingPair, _ v: Violation, inFlight: [UInt64], sourceLocation: SourceLocation = #_sourceLocation
    ) throws {
        let d = pair.driver
        #expect(d.isBroken && d.violation == v, sourceLocation: sourceLocation)
        #expect(throws: v, sourceLocation: sourceLocation) { try d.nextCompletion() }
        let s = Segment(address: pair.pool.guestAddress, length: 8, deviceWritable: true)
        #expect(throws: SubmitError.broken(v), sourceLocation: sourceLocation) { try d.add([s], token: 99) }
        #expect(d.publish() == false, sourceLocation: sourceLocation)
        #expect(d.failAll().sorted() == inFlight.sorted(), sourceLocation: sourceLocation)
        #expect(d.failAll() == [], sourceLocation: sourceLocation)
        // Blast radius = one queue: queue 1 of the same region still round-trips.
        #expect(!pair.drivers[1].isBroken, sourceLocation: sourceLocation)
        try roundTrip(pair, queue: 1, token: 700)
        // Explicit recovery: reset, then a fresh device on the zeroed ring.
        d.reset()
        #expect(!d.isBroken && d.freeCount == size && d.inFlightCount == 0, sourceLocation: sourceLocation)
        let a = pair.layout.ringAddresses(queue: 0, guestBase: pair.guestBase)
        let device = try PackedDeviceQueue(
            queueSize: size, ringAddress: a.descriptors, driverAreaAddress: a.avail, deviceAreaAddress: a.used,
            features: pair.features, memory: pair.memory)
        for i in 0..<10 {
            try post(pair, token: 800 + UInt64(i))
            var chain = DescriptorChain()
            #expect(try device.nextChain(into: &chain, memory: pair.memory) == .ready, sourceLocation: sourceLocation)
            device.complete(head: chain.head, length: 1)
            _ = device.publishUsed()
            #expect(try d.nextCompletion()?.token == 800 + UInt64(i), sourceLocation: sourceLocation)
        }
    }

    @Test func usedFlagsWithWrongWrapCounterBreakQueue() throws {
        let pair = try Self.makePair()
        try Self.post(pair, token: 1)
        pair.writeUsed(0, id: 0, length: 8, wrap: false)  // AVAIL = USED = 0: last lap's mark
        let v = Violation.packedUsedWrapCounter(slot: 0, flags: 0, wrap: true)
        #expect(throws: v) { try pair.driver.nextCompletion() }
        try Self.expectBrokenAndContained(pair, v, inFlight: [1])
    }

    @Test func halfUsedMarkBreaksQueue() throws {
        let pair = try Self.makePair()
        try Self.post(pair, token: 1)
        pair.writeDescriptor(0, length: 8, id: 0, flags: PackedLayout.flagUsed | PackedLayout.flagWrite)
        let v = Violation.packedUsedWrapCounter(slot: 0, flags: 0x8002, wrap: true)
        #expect(throws: v) { try pair.driver.nextCompletion() }
        try Self.expectBrokenAndContained(pair, v, inFlight: [1])
    }

    @Test func usedIdOutOfRangeBreaksQueue() throws {
        let pair = try Self.makePair()
        try Self.post(pair, token: 1)
        pair.writeUsed(0, id: 8, length: 0)
        let v = Violation.usedIdOutOfRange(id: 8, queueSize: 8)
        #expect(throws: v) { try pair.driver.nextCompletion() }
        try Self.expectBrokenAndContained(pair, v, inFlight: [1])
    }

    @Test func usedIdNotInFlightBreaksQueue() throws {
        let pair = try Self.makePair()
        try Self.post(pair, token: 1)
        pair.writeUsed(0, id: 3, length: 0)
        let v = Violation.usedIdNotInFlight(id: 3)
        #expect(throws: v) { try pair.driver.nextCompletion() }
        try Self.expectBrokenAndContained(pair, v, inFlight: [1])
    }

    @Test func duplicatedUsedIdBreaksQueue() throws {
        let pair = try Self.makePair()
        #expect(try Self.post(pair, token: 1) == 0)
        #expect(try Self.post(pair, token: 2) == 1)
        pair.writeUsed(0, id: 0, length: 4)
        #expect(try pair.driver.nextCompletion().map { [$0.token, UInt64($0.head), UInt64($0.length)] } == [1, 0, 4])
        pair.writeUsed(2, id: 0, length: 4)  // the same id again, where id 1 sits
        let v = Violation.usedIdNotInFlight(id: 0)
        #expect(throws: v) { try pair.driver.nextCompletion() }
        try Self.expectBrokenAndContained(pair, v, inFlight: [2])
    }

    @Test func usedLengthBeyondPostedBreaksQueue() throws {
        let pair = try Self.makePair()
        try Self.post(pair, token: 1)
        pair.writeUsed(0, id: 0, length: 65)
        let v = Violation.usedLengthTooLarge(id: 0, length: 65, writable: 64)
        #expect(throws: v) { try pair.driver.nextCompletion() }
        try Self.expectBrokenAndContained(pair, v, inFlight: [1])
    }

    @Test func usedMarkInSlotNeverMadeAvailableBreaksQueue() throws {
        let pair = try Self.makePair()
        try Self.roundTrip(pair, queue: 0, token: 1)  // the driver now looks at slot 2
        pair.writeUsed(2, id: 0, length: 0)
        let v = Violation.packedUsedSlotNotAvailable(slot: 2)
        #expect(throws: v) { try pair.driver.nextCompletion() }
        try Self.expectBrokenAndContained(pair, v, inFlight: [])
    }

    @Test func eventSuppressionFlagsThreeBreakQueue() throws {
        let pair = try Self.makePair()
        SharedAccess.store16(pair.deviceArea() + PackedLayout.eventFlags, 3)
        let pool = pair.pool
        let back = try #require(pool.allocate(8))
        try pair.driver.add([pool.segment(back, deviceWritable: true)], token: 5)
        #expect(pair.driver.publish() == false)
        let v = Violation.packedEventSuppressionInvalid(flags: 3, offWrap: 0, queueSize: 8)
        SharedAccess.store16(pair.deviceArea() + PackedLayout.eventFlags, 0)
        try Self.expectBrokenAndContained(pair, v, inFlight: [5])
    }

    @Test func eventSuppressionOffsetBeyondRingBreaksQueue() throws {
        let pair = try Self.makePair(RingFeatures(eventIndex: true))
        SharedAccess.store16(pair.deviceArea() + PackedLayout.eventOffWrap, 0x8000 | 9)
        SharedAccess.store16(pair.deviceArea() + PackedLayout.eventFlags, PackedLayout.eventFlagDescriptor)
        let back = try #require(pair.pool.allocate(8))
        try pair.driver.add([pair.pool.segment(back, deviceWritable: true)], token: 5)
        #expect(pair.driver.publish() == false)
        let v = Violation.packedEventSuppressionInvalid(flags: 2, offWrap: 0x8009, queueSize: 8)
        SharedAccess.store32(pair.deviceArea(), 0)
        try Self.expectBrokenAndContained(pair, v, inFlight: [5])
    }

    @Test func eventSuppressionDescriptorModeWithoutEventIndexBreaksQueue() throws {
        let pair = try Self.makePair()
        SharedAccess.store16(pair.deviceArea() + PackedLayout.eventFlags, PackedLayout.eventFlagDescriptor)
        let back = try #require(pair.pool.allocate(8))
        try pair.driver.add([pair.pool.segment(back, deviceWritable: true)], token: 5)
        #expect(pair.driver.publish() == false)
        #expect(pair.driver.violation == .packedEventSuppressionInvalid(flags: 2, offWrap: 0, queueSize: 8))
    }

    /// R2: a used descriptor is read once; rewriting it after the driver consumed it
    /// (another id, a huge length) changes nothing: the driver never looks at it again.
    @Test func rewritingUsedDescriptorAfterTheDriverReadItHasNoEffect() throws {
        let pair = try Self.makePair()
        #expect(try Self.post(pair, token: 1) == 0)
        #expect(try Self.post(pair, token: 2) == 1)
        pair.writeUsed(0, id: 0, length: 10)
        #expect(try pair.driver.nextCompletion().map { [$0.token, UInt64($0.head), UInt64($0.length)] } == [1, 0, 10])
        pair.writeUsed(0, id: 1, length: 0xffff_ffff)
        #expect(try pair.driver.nextCompletion() == nil)  // slot 2 still carries our own mark
        #expect(pair.driver.inFlightCount == 1 && !pair.driver.isBroken)
        pair.writeUsed(2, id: 1, length: 64)
        #expect(try pair.driver.nextCompletion().map { [$0.token, UInt64($0.head), UInt64($0.length)] } == [2, 1, 64])
    }

    /// The driver advances by its own slot count, never by what the device wrote: out of
    /// order completions of chains of different lengths, across many wraps, with indirect.
    @Test func outOfOrderCompletionsAcrossWrapsAdvanceByPrivateLength() throws {
        for indirect in [false, true] {
            let pair = try PackedRingPair(
                queueSize: 8, features: RingFeatures(eventIndex: true, indirectDescriptors: indirect),
                indirectEntries: indirect ? 4 : 0, bounceBytesPerQueue: 64 * 1024)
            let driver = pair.driver
            let device = pair.device
            var token: UInt64 = 0
            var chain = DescriptorChain()
            var slices: [BounceSlice] = []
            for _ in 0..<3 { slices.append(try #require(pair.pool.allocate(32))) }
            for round in 0..<200 {
                // Two requests of 1 + (round % 3) segments each.
                var posted: [UInt64: Int] = [:]
                for _ in 0..<2 {
                    let n = 1 + round % 3
                    let segs = (0..<n).map { k in pair.pool.segment(slices[k], deviceWritable: k == n - 1) }
                    token += 1
                    try driver.add(segs, token: token)
                    posted[token] = n
                }
                _ = driver.publish()
                var heads: [UInt16] = []
                while case .ready = try device.nextChain(into: &chain, memory: pair.memory) { heads.append(chain.head) }
                #expect(heads.count == 2)
                for h in heads.reversed() { device.complete(head: h, length: 32) }  // out of order
                _ = device.publishUsed()
                var got: [UInt64] = []
                while let c = try driver.nextCompletion() { got.append(c.token) }
                #expect(got.sorted() == posted.keys.sorted(), "round \(round)")
                #expect(driver.freeCount == 8 && driver.inFlightCount == 0)
            }
        }
    }

    @Test func eventSuppressionIsHonouredBothWays() throws {
        let pair = try PackedRingPair(queueSize: 8, features: RingFeatures(eventIndex: true))
        let driver = pair.driver
        let device = pair.device
        var chain = DescriptorChain()
        // Device area zero = ENABLE: every publish kicks.
        let s = try #require(pair.pool.allocate(8))
        try driver.add([pair.pool.segment(s, deviceWritable: true)], token: 1)
        #expect(driver.publish() == true)
        device.disableNotifications()
        try driver.add([pair.pool.segment(s, deviceWritable: true)], token: 2)
        #expect(driver.publish() == false)
        #expect(try device.nextChain(into: &chain, memory: pair.memory) == .ready)
        #expect(try device.nextChain(into: &chain, memory: pair.memory) == .ready)
        #expect(device.enableNotifications() == false)  // armed at slot 2
        try driver.add([pair.pool.segment(s, deviceWritable: true)], token: 3)
        #expect(driver.publish() == true)
        try driver.add([pair.pool.segment(s, deviceWritable: true)], token: 4)
        #expect(driver.publish() == false)  // not re-armed
        // Interrupts: disabled, then armed at the next used slot.
        driver.disableInterrupts()
        device.complete(head: 0, length: 0)
        #expect(device.publishUsed() == false)
        #expect(driver.enableInterrupts() == true)  // one is already there: poll first
        #expect(try driver.nextCompletion()?.token == 1)
        #expect(driver.enableInterrupts() == false)
        device.complete(head: 1, length: 0)
        #expect(device.publishUsed() == true)
    }
}

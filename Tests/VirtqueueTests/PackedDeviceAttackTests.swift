import RingTestSupport
import SharedMemory
import Testing
import Virtqueue

/// Issue 7, device side: the test plays a malicious driver writing the packed ring by
/// hand. A chain whose extent is known but whose content is bad is rejected with its id
/// and the queue goes on; a chain whose extent or id is unusable breaks the queue.
@Suite struct PackedDeviceAttackTests {
    static let avail = PackedLayout.availableMarker(wrap: true)
    static let next = PackedLayout.flagNext
    static let write = PackedLayout.flagWrite
    static let indirect = PackedLayout.flagIndirect

    static func makePair(_ features: RingFeatures = RingFeatures(indirectDescriptors: true)) throws -> PackedRingPair {
        try PackedRingPair(queueSize: 8, features: features, bounceBytesPerQueue: 64 * 1024)
    }

    /// A guest address inside the bounce pool.
    static func buffer(_ pair: PackedRingPair, _ offset: Int = 0) -> UInt64 { pair.pool.guestAddress + UInt64(offset) }

    static func expectBroken(_ pair: PackedRingPair, _ v: Violation, sourceLocation: SourceLocation = #_sourceLocation)
    {
        var chain = DescriptorChain()
        #expect(throws: v, sourceLocation: sourceLocation) {
            try pair.device.nextChain(into: &chain, memory: pair.memory)
        }
        #expect(pair.device.violation == v, sourceLocation: sourceLocation)
        // Sticky, whatever the driver writes now.
        pair.writeDescriptor(0, address: buffer(pair), length: 8, id: 0, flags: avail)
        #expect(throws: v, sourceLocation: sourceLocation) {
            try pair.device.nextChain(into: &chain, memory: pair.memory)
        }
    }

    /// The rejected chain is completed with its id; the next one is served.
    static func expectRejectedThenServes(
        _ pair: PackedRingPair, id: UInt16, _ v: Violation, nextSlot: Int,
        sourceLocation: SourceLocation = #_sourceLocation
    ) throws {
        var chain = DescriptorChain()
        #expect(
            try pair.device.nextChain(into: &chain, memory: pair.memory) == .rejected(head: id, v),
            sourceLocation: sourceLocation)
        pair.device.complete(head: id, length: 0)
        pair.writeDescriptor(nextSlot, address: buffer(pair), length: 8, id: 7, flags: avail | write)
        #expect(try pair.device.nextChain(into: &chain, memory: pair.memory) == .ready, sourceLocation: sourceLocation)
        #expect(chain.head == 7 && chain.writableLength == 8, sourceLocation: sourceLocation)
    }

    @Test func usedMarkWrittenByTheDriverBreaksQueue() throws {
        let pair = try Self.makePair()
        pair.writeDescriptor(
            0, address: Self.buffer(pair), length: 8, id: 0, flags: PackedLayout.usedMarker(wrap: true))
        Self.expectBroken(pair, .packedAvailFlagsInvalid(slot: 0, flags: 0x8080))
    }

    @Test func nothingAvailableIsEmpty() throws {
        let pair = try Self.makePair()
        var chain = DescriptorChain()
        #expect(try pair.device.nextChain(into: &chain, memory: pair.memory) == .empty)
        // Last lap's marks (wrap 0) are not available in lap 1.
        pair.writeDescriptor(
            0, address: Self.buffer(pair), length: 8, id: 0, flags: PackedLayout.availableMarker(wrap: false))
        #expect(try pair.device.nextChain(into: &chain, memory: pair.memory) == .empty)
    }

    @Test func chainIntoUnavailableSlotBreaksQueue() throws {
        let pair = try Self.makePair()
        pair.writeDescriptor(
            1, address: Self.buffer(pair), length: 8, id: 0, flags: PackedLayout.availableMarker(wrap: false))
        pair.writeDescriptor(0, address: Self.buffer(pair), length: 8, id: 0, flags: Self.avail | Self.next)
        Self.expectBroken(pair, .packedChainIncomplete(slot: 1))
    }

    @Test func chainLongerThanTheRingBreaksQueue() throws {
        let pair = try Self.makePair()
        for i in (0..<8).reversed() {
            pair.writeDescriptor(i, address: Self.buffer(pair), length: 8, id: 0, flags: Self.avail | Self.next)
        }
        Self.expectBroken(pair, .chainTooLong(head: 0, limit: 8))
    }

    @Test func bufferIdOutOfRangeBreaksQueue() throws {
        let pair = try Self.makePair()
        pair.writeDescriptor(0, address: Self.buffer(pair), length: 8, id: 8, flags: Self.avail)
        Self.expectBroken(pair, .packedBufferIdOutOfRange(id: 8, queueSize: 8))
    }

    @Test func duplicateBufferIdInFlightBreaksQueue() throws {
        let pair = try Self.makePair()
        pair.writeDescriptor(0, address: Self.buffer(pair), length: 8, id: 3, flags: Self.avail)
        pair.writeDescriptor(1, address: Self.buffer(pair), length: 8, id: 3, flags: Self.avail)
        var chain = DescriptorChain()
        #expect(try pair.device.nextChain(into: &chain, memory: pair.memory) == .ready)
        Self.expectBroken(pair, .packedBufferIdInFlight(id: 3))
    }

    @Test func overrunWhileEverySlotIsInFlightBreaksQueue() throws {
        let pair = try Self.makePair()
        var chain = DescriptorChain()
        for i in 0..<8 {
            pair.writeDescriptor(i, address: Self.buffer(pair), length: 8, id: UInt16(i), flags: Self.avail)
            #expect(try pair.device.nextChain(into: &chain, memory: pair.memory) == .ready)
        }
        // Lap 2 mark on slot 0 although nothing was completed.
        let mark = PackedLayout.availableMarker(wrap: false)
        pair.writeDescriptor(0, address: Self.buffer(pair), length: 8, id: 0, flags: mark)
        Self.expectBroken(pair, .packedAvailFlagsInvalid(slot: 0, flags: mark))
    }

    @Test func addressOutsideMemoryRejectsChainAndQueueGoesOn() throws {
        let pair = try Self.makePair()
        let bad: UInt64 = 0x10
        pair.writeDescriptor(1, address: bad, length: 8, id: 2, flags: Self.avail | Self.write)
        pair.writeDescriptor(0, address: Self.buffer(pair), length: 16, id: 2, flags: Self.avail | Self.next)
        try Self.expectRejectedThenServes(
            pair, id: 2, .descriptorAddressInvalid(head: 0, .unmapped(address: bad, length: 8)), nextSlot: 2)
    }

    @Test func readableAfterWritableRejectsChain() throws {
        let pair = try Self.makePair()
        pair.writeDescriptor(1, address: Self.buffer(pair), length: 8, id: 4, flags: Self.avail)
        pair.writeDescriptor(
            0, address: Self.buffer(pair), length: 8, id: 4, flags: Self.avail | Self.next | Self.write)
        try Self.expectRejectedThenServes(pair, id: 4, .readableAfterWritable(head: 0), nextSlot: 2)
    }

    @Test func indirectWithoutNegotiationRejectsChain() throws {
        let pair = try Self.makePair(RingFeatures())
        pair.writeDescriptor(0, address: Self.buffer(pair), length: 32, id: 1, flags: Self.avail | Self.indirect)
        try Self.expectRejectedThenServes(pair, id: 1, .indirectNotNegotiated(head: 0), nextSlot: 1)
    }

    @Test func indirectWithNextRejectsChain() throws {
        let pair = try Self.makePair()
        pair.writeDescriptor(1, address: Self.buffer(pair), length: 8, id: 1, flags: Self.avail | Self.write)
        pair.writeDescriptor(
            0, address: Self.buffer(pair), length: 32, id: 1, flags: Self.avail | Self.indirect | Self.next)
        try Self.expectRejectedThenServes(pair, id: 1, .indirectWithNext(head: 0), nextSlot: 2)
    }

    @Test func indirectTableLengthNotMultipleOf16RejectsChain() throws {
        let pair = try Self.makePair()
        pair.writeDescriptor(0, address: Self.buffer(pair), length: 24, id: 1, flags: Self.avail | Self.indirect)
        try Self.expectRejectedThenServes(pair, id: 1, .indirectTableLength(head: 0, length: 24), nextSlot: 1)
    }

    @Test func nestedIndirectRejectsChain() throws {
        let pair = try Self.makePair()
        let table = pair.region.base + pair.layout.queues[0].bounceOffset + 4096
        let tableGuest = Self.buffer(pair, 4096)
        SharedAccess.store64(table, Self.buffer(pair))
        SharedAccess.store32(table + 8, 8)
        SharedAccess.store16(table + 14, Self.indirect)
        pair.writeDescriptor(0, address: tableGuest, length: 16, id: 1, flags: Self.avail | Self.indirect)
        try Self.expectRejectedThenServes(pair, id: 1, .nestedIndirect(head: 0), nextSlot: 1)
    }

    @Test func indirectTableIsWalkedWithOnlyTheWriteFlag() throws {
        let pair = try Self.makePair()
        let table = pair.region.base + pair.layout.queues[0].bounceOffset + 4096
        for i in 0..<3 {
            let e = table + 16 * i
            SharedAccess.store64(e, Self.buffer(pair, 64 * i))
            SharedAccess.store32(e + 8, 64)
            SharedAccess.store16(e + 12, 0xdead)  // id: reserved in a table, ignored
            SharedAccess.store16(e + 14, i == 2 ? Self.write | Self.next : Self.next)  // NEXT ignored
        }
        pair.writeDescriptor(0, address: Self.buffer(pair, 4096), length: 48, id: 5, flags: Self.avail | Self.indirect)
        var chain = DescriptorChain()
        #expect(try pair.device.nextChain(into: &chain, memory: pair.memory) == .ready)
        #expect(chain.head == 5 && chain.readableLength == 128 && chain.writableLength == 64)
    }

    @Test func driverEventSuppressionGarbageBreaksQueueButStillInterrupts() throws {
        let pair = try Self.makePair()
        pair.writeDescriptor(0, address: Self.buffer(pair), length: 8, id: 0, flags: Self.avail | Self.write)
        var chain = DescriptorChain()
        #expect(try pair.device.nextChain(into: &chain, memory: pair.memory) == .ready)
        pair.device.complete(head: 0, length: 8)
        SharedAccess.store16(pair.driverArea() + PackedLayout.eventFlags, 3)
        #expect(pair.device.publishUsed() == true)
        Self.expectBroken(pair, .packedEventSuppressionInvalid(flags: 3, offWrap: 0, queueSize: 8))
    }

    /// R2: each field is fetched once. The driver rewriting a descriptor after the device
    /// read it (address outside memory, huge length) changes nothing in the popped chain.
    @Test func rewritingDescriptorAfterTheDeviceReadItHasNoEffect() throws {
        let pair = try Self.makePair()
        pair.writeDescriptor(0, address: Self.buffer(pair), length: 8, id: 0, flags: Self.avail | Self.write)
        var chain = DescriptorChain()
        #expect(try pair.device.nextChain(into: &chain, memory: pair.memory) == .ready)
        let before = chain.segments.map { ($0.guestAddress, $0.buffer.count) }
        pair.writeDescriptor(0, address: 0x10, length: 0xffff_ffff, id: 6, flags: Self.avail | Self.write)
        #expect(chain.segments.map { $0.guestAddress } == before.map { $0.0 })
        #expect(chain.segments.map { $0.buffer.count } == before.map { $0.1 })
        // And the device does not pop the rewritten slot again.
        #expect(try pair.device.nextChain(into: &chain, memory: pair.memory) == .empty)
        #expect(pair.device.vringBase == PackedLayout.encodeBase(avail: 1, availWrap: true, used: 0, usedWrap: true))
    }

    @Test func vringBaseRoundTripsWrapCounters() {
        let cases: [(UInt16, Bool, UInt16, Bool)] = [(0, true, 0, true), (5, false, 3, true), (0x7fff, true, 1, false)]
        for c in cases {
            let b = PackedLayout.encodeBase(avail: c.0, availWrap: c.1, used: c.2, usedWrap: c.3)
            let d = PackedLayout.decodeBase(b)
            #expect(d.avail == c.0 && d.availWrap == c.1 && d.used == c.2 && d.usedWrap == c.3)
        }
        // DPDK sends 16 bits only: used follows avail.
        let d = PackedLayout.decodeBase(0x8003)
        #expect(d.avail == 3 && d.availWrap && d.used == 3 && d.usedWrap)
    }
}

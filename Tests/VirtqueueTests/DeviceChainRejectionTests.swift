import RingTestSupport
import SharedMemory
import Testing
import Virtqueue

/// R3/R4/R5/R7 on the device: the test plays a malicious driver writing descriptor chains
/// by hand. A malformed chain is rejected with its exact reason (naming the head, never a
/// later index) and the queue keeps serving good chains.
@Suite struct DeviceChainRejectionTests {
    static let withIndirect = RingFeatures(indirectDescriptors: true)
    static let flagN = SplitLayout.flagNext
    static let flagW = SplitLayout.flagWrite
    static let flagI = SplitLayout.flagIndirect

    static func makePair(_ features: RingFeatures = withIndirect) throws -> RingPair {
        try RingPair(queueSize: 8, features: features)
    }

    /// Where hand-made indirect tables go: inside the shared region, past the scratch buffers.
    static func tableOffset(_ a: RingAttacker) -> Int { a.scratchOffset + 64 * 1024 }
    static func table(_ a: RingAttacker) -> UnsafeMutableRawPointer { a.pair.region.base + tableOffset(a) }
    static func tableGuest(_ a: RingAttacker) -> UInt64 { a.guest(tableOffset(a)) }
    static func buffer(_ a: RingAttacker, _ k: Int) -> UInt64 { a.scratchGuest + UInt64(k * 256) }

    /// Offers `head` and expects `.rejected(head, v)`; then the queue must still be usable.
    static func expectRejected(
        _ pair: RingPair, head: UInt16, _ v: Violation, memory: GuestMemory? = nil,
        sourceLocation: SourceLocation = #_sourceLocation
    ) throws {
        let a = RingAttacker(pair)
        a.offer(head)
        var chain = DescriptorChain()
        let got = try pair.device.nextChain(into: &chain, memory: memory ?? pair.memory)
        #expect(got == .rejected(head: head, v), sourceLocation: sourceLocation)
        #expect(!pair.device.isBroken, sourceLocation: sourceLocation)
        pair.device.complete(head: head, length: 0)
        try expectServesGoodChain(pair, sourceLocation: sourceLocation)
    }

    /// A good two-descriptor chain (6 -> 7) is popped with the right buffers.
    static func expectServesGoodChain(_ pair: RingPair, sourceLocation: SourceLocation = #_sourceLocation) throws {
        let a = RingAttacker(pair)
        a.writeDescriptor(6, address: buffer(a, 10), length: 32, flags: flagN, next: 7)
        a.writeDescriptor(7, address: buffer(a, 11), length: 64, flags: flagW)
        a.offer(6)
        var chain = DescriptorChain()
        #expect(try pair.device.nextChain(into: &chain, memory: pair.memory) == .ready, sourceLocation: sourceLocation)
        #expect(chain.head == 6, sourceLocation: sourceLocation)
        #expect(chain.segments.map(\.guestAddress) == [buffer(a, 10), buffer(a, 11)], sourceLocation: sourceLocation)
        #expect(chain.segments.map(\.buffer.count) == [32, 64], sourceLocation: sourceLocation)
        #expect(
            chain.segments.first?.buffer.baseAddress == pair.region.base + a.scratchOffset + 10 * 256,
            sourceLocation: sourceLocation)
        #expect(chain.readableLength == 32 && chain.writableLength == 64, sourceLocation: sourceLocation)
        pair.device.complete(head: 6, length: 64)
        _ = pair.device.publishUsed()
    }

    // MARK: walking the table (R5: bounded by the table size)

    @Test func descriptorLoopIsRejectedAsChainTooLong() throws {
        let pair = try Self.makePair()
        let a = RingAttacker(pair)
        a.writeDescriptor(0, address: Self.buffer(a, 0), length: 8, flags: Self.flagN, next: 1)
        a.writeDescriptor(1, address: Self.buffer(a, 1), length: 8, flags: Self.flagN, next: 0)
        try Self.expectRejected(pair, head: 0, .chainTooLong(head: 0, limit: 8))
        a.writeDescriptor(2, address: Self.buffer(a, 2), length: 8, flags: Self.flagN | Self.flagW, next: 2)
        try Self.expectRejected(pair, head: 2, .chainTooLong(head: 2, limit: 8))
    }

    @Test func chainAsLongAsTheTableIsAcceptedOneMoreIsNot() throws {
        let pair = try Self.makePair()
        let a = RingAttacker(pair)
        for i in 0..<8 {
            a.writeDescriptor(
                i, address: Self.buffer(a, i), length: 8, flags: i < 7 ? Self.flagN : 0, next: UInt16(i + 1))
        }
        a.offer(0)
        var chain = DescriptorChain()
        #expect(try pair.device.nextChain(into: &chain, memory: pair.memory) == .ready)
        #expect(chain.segments.count == 8 && chain.readableLength == 64)
        pair.device.complete(head: 0, length: 0)
        // Closing the chain into a ring (7 -> 0) makes it endless.
        a.writeDescriptor(7, address: Self.buffer(a, 7), length: 8, flags: Self.flagN, next: 0)
        try Self.expectRejected(pair, head: 0, .chainTooLong(head: 0, limit: 8))
    }

    @Test(arguments: [UInt16(8), 9, 0x8000, 0xFFFF])
    func nextOutOfRangeIsRejected(next: UInt16) throws {
        let pair = try Self.makePair()
        let a = RingAttacker(pair)
        a.writeDescriptor(0, address: Self.buffer(a, 0), length: 8, flags: Self.flagN, next: next)
        try Self.expectRejected(pair, head: 0, .descriptorNextOutOfRange(head: 0, next: next, tableSize: 8))
    }

    // MARK: addresses (R7: only through GuestMemory.translate)

    enum Bad: CaseIterable {
        case zero, belowRegion, straddlesEnd, atEndZeroLength, wrapsFromTop, maxAddress, maxLength, hugeLength
    }

    static func badRange(_ a: RingAttacker, _ b: Bad) -> (UInt64, UInt32, TranslationError) {
        let end = a.regionEndGuest
        let base = a.pair.guestBase
        switch b {
        case .zero: return (0, 16, .unmapped(address: 0, length: 16))
        case .belowRegion: return (base - 1, 2, .unmapped(address: base - 1, length: 2))
        case .straddlesEnd: return (end - 8, 16, .unmapped(address: end - 8, length: 16))
        case .atEndZeroLength: return (end, 0, .unmapped(address: end, length: 0))
        case .wrapsFromTop:
            return (0xFFFF_FFFF_FFFF_FFF0, 0x20, .overflow(address: 0xFFFF_FFFF_FFFF_FFF0, length: 0x20))
        case .maxAddress: return (.max, 1, .overflow(address: .max, length: 1))
        case .maxLength: return (base, 0xFFFF_FFFF, .unmapped(address: base, length: 0xFFFF_FFFF))
        case .hugeLength:
            return (
                a.scratchGuest, UInt32(a.pair.region.size),
                .unmapped(address: a.scratchGuest, length: UInt64(a.pair.region.size))
            )
        }
    }

    @Test(arguments: Bad.allCases)
    func descriptorAddressOutsideSharedMemoryIsRejected(bad: Bad) throws {
        let pair = try Self.makePair()
        let a = RingAttacker(pair)
        let (address, length, error) = Self.badRange(a, bad)
        // As the head...
        a.writeDescriptor(0, address: address, length: length, flags: 0)
        try Self.expectRejected(pair, head: 0, .descriptorAddressInvalid(head: 0, error))
        // ...and in the middle of a chain: the violation names the head (3), not 4. (The
        // first descriptor is empty so the total stays within 32 bits whatever the order
        // of the checks.)
        a.writeDescriptor(3, address: Self.buffer(a, 3), length: 0, flags: Self.flagN, next: 4)
        a.writeDescriptor(4, address: address, length: length, flags: Self.flagW)
        try Self.expectRejected(pair, head: 3, .descriptorAddressInvalid(head: 3, error))
        // ...and inside an indirect table.
        let t = Self.table(a)
        RingAttacker.writeDescriptor(t, 0, address: Self.buffer(a, 5), length: 0, flags: Self.flagN, next: 1)
        RingAttacker.writeDescriptor(t, 1, address: address, length: length, flags: Self.flagW, next: 0)
        a.writeDescriptor(5, address: Self.tableGuest(a), length: 32, flags: Self.flagI)
        try Self.expectRejected(pair, head: 5, .descriptorAddressInvalid(head: 5, error))
    }

    @Test func zeroLengthDescriptorInsideTheRegionIsAnEmptySegment() throws {
        let pair = try Self.makePair()
        let a = RingAttacker(pair)
        a.writeDescriptor(0, address: Self.buffer(a, 0), length: 0, flags: Self.flagN, next: 1)
        a.writeDescriptor(1, address: a.regionEndGuest - 1, length: 0, flags: Self.flagW)
        a.offer(0)
        var chain = DescriptorChain()
        #expect(try pair.device.nextChain(into: &chain, memory: pair.memory) == .ready)
        #expect(chain.segments.map(\.buffer.count) == [0, 0])
        #expect(chain.readableLength == 0 && chain.writableLength == 0 && chain.firstWritable == 1)
        pair.device.complete(head: 0, length: 0)
        try Self.expectServesGoodChain(pair)
    }

    @Test func descriptorCoveringTheWholeRegionIsAccepted() throws {
        let pair = try Self.makePair()
        let a = RingAttacker(pair)
        a.writeDescriptor(0, address: pair.guestBase, length: UInt32(pair.region.size), flags: Self.flagW)
        a.offer(0)
        var chain = DescriptorChain()
        #expect(try pair.device.nextChain(into: &chain, memory: pair.memory) == .ready)
        #expect(chain.segments.first?.buffer.baseAddress == pair.region.base)
        #expect(chain.segments.first?.buffer.count == pair.region.size)
    }

    // MARK: order of buffers

    @Test func readableAfterWritableIsRejected() throws {
        let pair = try Self.makePair()
        let a = RingAttacker(pair)
        a.writeDescriptor(0, address: Self.buffer(a, 0), length: 8, flags: Self.flagW | Self.flagN, next: 1)
        a.writeDescriptor(1, address: Self.buffer(a, 1), length: 8, flags: 0)
        try Self.expectRejected(pair, head: 0, .readableAfterWritable(head: 0))
        // Inside an indirect table too.
        let t = Self.table(a)
        RingAttacker.writeDescriptor(
            t, 0, address: Self.buffer(a, 2), length: 8, flags: Self.flagW | Self.flagN, next: 1)
        RingAttacker.writeDescriptor(t, 1, address: Self.buffer(a, 3), length: 8, flags: 0, next: 0)
        a.writeDescriptor(2, address: Self.tableGuest(a), length: 32, flags: Self.flagI)
        try Self.expectRejected(pair, head: 2, .readableAfterWritable(head: 2))
    }

    // MARK: indirect tables

    @Test func nestedIndirectIsRejected() throws {
        let pair = try Self.makePair()
        let a = RingAttacker(pair)
        let t = Self.table(a)
        RingAttacker.writeDescriptor(t, 0, address: Self.buffer(a, 0), length: 8, flags: Self.flagN, next: 1)
        RingAttacker.writeDescriptor(t, 1, address: Self.tableGuest(a), length: 32, flags: Self.flagI, next: 0)
        a.writeDescriptor(0, address: Self.tableGuest(a), length: 32, flags: Self.flagI)
        try Self.expectRejected(pair, head: 0, .nestedIndirect(head: 0))
    }

    @Test(arguments: [UInt16(0), 1, 5])
    func indirectPointingAtTheDescriptorTableItselfIsRejected(head: UInt16) throws {
        // The "indirect table" is the ring's own table, starting at the head itself: its
        // first entry is the INDIRECT head again.
        let pair = try Self.makePair()
        let a = RingAttacker(pair)
        let address = a.descriptorTableGuest + UInt64(head) * 16
        a.writeDescriptor(Int(head), address: address, length: UInt32(8 - head) * 16, flags: Self.flagI)
        try Self.expectRejected(pair, head: head, .nestedIndirect(head: head))
    }

    @Test(arguments: [0, 8, 17, 15, 144, 0xFFFF_FFF0, 0xFFFF_FFFF] as [UInt32])
    func indirectTableLengthIsRejected(length: UInt32) throws {
        let pair = try Self.makePair()
        let a = RingAttacker(pair)
        for i in 0..<8 {
            RingAttacker.writeDescriptor(Self.table(a), i, address: Self.buffer(a, i), length: 8, flags: 0, next: 0)
        }
        a.writeDescriptor(0, address: Self.tableGuest(a), length: length, flags: Self.flagI)
        try Self.expectRejected(pair, head: 0, .indirectTableLength(head: 0, length: length))
    }

    @Test func indirectTableOfQueueSizeEntriesIsAccepted() throws {
        let pair = try Self.makePair()
        let a = RingAttacker(pair)
        for i in 0..<8 {
            RingAttacker.writeDescriptor(
                Self.table(a), i, address: Self.buffer(a, i), length: UInt32(i + 1),
                flags: (i < 7 ? Self.flagN : 0) | (i >= 4 ? Self.flagW : 0), next: UInt16(i + 1))
        }
        a.writeDescriptor(0, address: Self.tableGuest(a), length: 128, flags: Self.flagI)
        a.offer(0)
        var chain = DescriptorChain()
        #expect(try pair.device.nextChain(into: &chain, memory: pair.memory) == .ready)
        #expect(chain.segments.map(\.guestAddress) == (0..<8).map { Self.buffer(a, $0) })
        #expect(chain.firstWritable == 4 && chain.readableLength == 10 && chain.writableLength == 26)
    }

    @Test func indirectWithoutFeatureIsRejected() throws {
        let pair = try Self.makePair(RingFeatures())
        let a = RingAttacker(pair)
        RingAttacker.writeDescriptor(Self.table(a), 0, address: Self.buffer(a, 0), length: 8, flags: 0, next: 0)
        a.writeDescriptor(0, address: Self.tableGuest(a), length: 16, flags: Self.flagI)
        try Self.expectRejected(pair, head: 0, .indirectNotNegotiated(head: 0))
    }

    @Test func indirectWithNextIsRejected() throws {
        let pair = try Self.makePair()
        let a = RingAttacker(pair)
        RingAttacker.writeDescriptor(Self.table(a), 0, address: Self.buffer(a, 0), length: 8, flags: 0, next: 0)
        a.writeDescriptor(0, address: Self.tableGuest(a), length: 16, flags: Self.flagI | Self.flagN, next: 1)
        a.writeDescriptor(1, address: Self.buffer(a, 1), length: 8, flags: 0)
        try Self.expectRejected(pair, head: 0, .indirectWithNext(head: 0))
    }

    @Test(arguments: [Bad.zero, .straddlesEnd, .wrapsFromTop])
    func indirectTableOutsideSharedMemoryIsRejected(bad: Bad) throws {
        let pair = try Self.makePair()
        let a = RingAttacker(pair)
        let address: UInt64
        switch bad {
        case .zero: address = 0
        case .straddlesEnd: address = a.regionEndGuest - 16
        default: address = 0xFFFF_FFFF_FFFF_FFF0
        }
        a.writeDescriptor(0, address: address, length: 32, flags: Self.flagI)
        let error: TranslationError =
            bad == .wrapsFromTop ? .overflow(address: address, length: 32) : .unmapped(address: address, length: 32)
        try Self.expectRejected(pair, head: 0, .descriptorAddressInvalid(head: 0, error))
    }

    @Test func loopInsideIndirectTableIsRejected() throws {
        let pair = try Self.makePair()
        let a = RingAttacker(pair)
        let t = Self.table(a)
        RingAttacker.writeDescriptor(t, 0, address: Self.buffer(a, 0), length: 8, flags: Self.flagN, next: 1)
        RingAttacker.writeDescriptor(t, 1, address: Self.buffer(a, 1), length: 8, flags: Self.flagN, next: 0)
        a.writeDescriptor(0, address: Self.tableGuest(a), length: 32, flags: Self.flagI)
        try Self.expectRejected(pair, head: 0, .chainTooLong(head: 0, limit: 2))
    }

    @Test func nextOutOfIndirectTableIsRejected() throws {
        let pair = try Self.makePair()
        let a = RingAttacker(pair)
        let t = Self.table(a)
        RingAttacker.writeDescriptor(t, 0, address: Self.buffer(a, 0), length: 8, flags: Self.flagN, next: 1)
        RingAttacker.writeDescriptor(t, 1, address: Self.buffer(a, 1), length: 8, flags: Self.flagN, next: 2)
        // Entry 2 exists in memory (and in the main table's range), but not in this table.
        RingAttacker.writeDescriptor(t, 2, address: Self.buffer(a, 2), length: 8, flags: 0, next: 0)
        a.writeDescriptor(0, address: Self.tableGuest(a), length: 32, flags: Self.flagI)
        try Self.expectRejected(pair, head: 0, .descriptorNextOutOfRange(head: 0, next: 2, tableSize: 2))
    }

    // MARK: total length (R4: the used length is 32 bits)

    /// The pair's region plus a sparse 4 GiB one, so single descriptors of ~2^32 bytes
    /// translate and only the total-length check stands in the way.
    static func bigMemory(_ pair: RingPair) throws -> (GuestMemory, UInt64, SharedRegion) {
        let big = try SharedRegion(name: "ringfence-big", size: 1 << 32)
        let bigBase: UInt64 = 0x10_0000_0000
        var memory = pair.memory
        try memory.add(GuestRegion(guestAddress: bigBase, userAddress: 0x20_0000_0000, mapping: big))
        return (memory, bigBase, big)
    }

    @Test(arguments: [
        (UInt32(0xFFFF_FFFF), UInt32(0xFFFF_FFFF), false),
        (0x8000_0000, 0x8000_0000, false),
        (0x8000_0000, 0x7FFF_FFFF, true),
        (1, 0xFFFF_FFFF, false),
        (0, 0xFFFF_FFFF, true),
    ])
    func totalChainLengthBeyond32BitsIsRejected(first: UInt32, second: UInt32, fits: Bool) throws {
        let pair = try Self.makePair()
        let a = RingAttacker(pair)
        let (memory, bigBase, big) = try Self.bigMemory(pair)
        defer { withExtendedLifetime(big) {} }
        for readableFirst in [false, true] {
            a.writeDescriptor(
                0, address: bigBase, length: first, flags: Self.flagN | (readableFirst ? 0 : Self.flagW), next: 1)
            a.writeDescriptor(1, address: bigBase, length: second, flags: Self.flagW)
            if fits {
                a.offer(0)
                var chain = DescriptorChain()
                #expect(try pair.device.nextChain(into: &chain, memory: memory) == .ready)
                #expect(chain.readableLength + chain.writableLength == UInt64(first) + UInt64(second))
                pair.device.complete(head: 0, length: 0)
            } else {
                try Self.expectRejected(pair, head: 0, .chainLengthOverflow(head: 0), memory: memory)
            }
        }
        // The same through an indirect table.
        let t = Self.table(a)
        RingAttacker.writeDescriptor(t, 0, address: bigBase, length: first, flags: Self.flagN, next: 1)
        RingAttacker.writeDescriptor(t, 1, address: bigBase, length: second, flags: Self.flagW, next: 0)
        a.writeDescriptor(2, address: Self.tableGuest(a), length: 32, flags: Self.flagI)
        if fits {
            a.offer(2)
            var chain = DescriptorChain()
            #expect(try pair.device.nextChain(into: &chain, memory: memory) == .ready)
        } else {
            try Self.expectRejected(pair, head: 2, .chainLengthOverflow(head: 2), memory: memory)
        }
    }
}

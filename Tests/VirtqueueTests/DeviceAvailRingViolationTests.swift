import RingTestSupport
import SharedMemory
import Testing
import Virtqueue

/// R3 + R6 on the device: the test plays a malicious driver writing queue 0's avail ring
/// by hand. A bad avail index or head breaks queue 0 for good; queue 1 keeps serving.
@Suite struct DeviceAvailRingViolationTests {
    static func makePair() throws -> RingPair { try RingPair(queueCount: 2, queueSize: 8) }

    /// A valid one-segment chain at descriptor `i`.
    static func goodDescriptor(_ a: RingAttacker, _ i: Int) {
        a.writeDescriptor(i, address: a.scratchGuest + UInt64(i * 64), length: 64, flags: SplitLayout.flagWrite)
    }

    static func expectBrokenAndContained(
        _ pair: RingPair, _ v: Violation, sourceLocation: SourceLocation = #_sourceLocation
    ) throws {
        let device = pair.device
        #expect(device.isBroken, sourceLocation: sourceLocation)
        #expect(device.violation == v, sourceLocation: sourceLocation)
        var chain = DescriptorChain()
        // Sticky, even once the ring looks sane again.
        let a = RingAttacker(pair)
        a.setAvailIndex(device.lastAvail)
        #expect(throws: v, sourceLocation: sourceLocation) { try device.nextChain(into: &chain, memory: pair.memory) }
        Self.goodDescriptor(a, 0)
        a.setAvailEntry(slot: Int(device.lastAvail), head: 0)
        a.setAvailIndex(device.lastAvail &+ 1)
        #expect(throws: v, sourceLocation: sourceLocation) { try device.nextChain(into: &chain, memory: pair.memory) }
        // The other queue of the same region is untouched.
        #expect(!pair.devices[1].isBroken, sourceLocation: sourceLocation)
        try echoWorks(pair, queue: 1)
    }

    @Test(arguments: [UInt16(9), 0x100, 0x7FFF, 0x8000])
    func availIndexJumpBeyondQueueSizeBreaksQueue(published: UInt16) throws {
        let pair = try Self.makePair()
        let a = RingAttacker(pair)
        for i in 0..<8 {
            Self.goodDescriptor(a, i)
            a.setAvailEntry(slot: i, head: UInt16(i))
        }
        a.setAvailIndex(published)
        var chain = DescriptorChain()
        let v = Violation.availIndexBeyondQueueSize(lastSeen: 0, published: published, queueSize: 8)
        #expect(throws: v) { try pair.device.nextChain(into: &chain, memory: pair.memory) }
        try Self.expectBrokenAndContained(pair, v)
    }

    @Test func availIndexEqualToQueueSizeIsAccepted() throws {
        let pair = try Self.makePair()
        let a = RingAttacker(pair)
        for i in 0..<8 {
            Self.goodDescriptor(a, i)
            a.setAvailEntry(slot: i, head: UInt16(7 - i))
        }
        a.setAvailIndex(8)
        var chain = DescriptorChain()
        var heads: [UInt16] = []
        for _ in 0..<8 {
            #expect(try pair.device.nextChain(into: &chain, memory: pair.memory) == .ready)
            heads.append(chain.head)
        }
        #expect(heads == [7, 6, 5, 4, 3, 2, 1, 0])
        #expect(try pair.device.nextChain(into: &chain, memory: pair.memory) == .empty)
        #expect(!pair.device.isBroken)
    }

    @Test(arguments: [UInt16(0), 0xFFFF, 0xFFF0])
    func availIndexWentBackwardsBreaksQueue(published: UInt16) throws {
        let pair = try Self.makePair()
        let a = RingAttacker(pair)
        Self.goodDescriptor(a, 0)
        a.offer(0)
        var chain = DescriptorChain()
        #expect(try pair.device.nextChain(into: &chain, memory: pair.memory) == .ready)
        #expect(try pair.device.nextChain(into: &chain, memory: pair.memory) == .empty)
        a.setAvailIndex(published)
        let v = Violation.availIndexBeyondQueueSize(lastSeen: 1, published: published, queueSize: 8)
        #expect(throws: v) { try pair.device.nextChain(into: &chain, memory: pair.memory) }
        try Self.expectBrokenAndContained(pair, v)
    }

    @Test(arguments: [UInt16(8), 9, 0x100, 0xFFFF])
    func availHeadOutOfRangeBreaksQueue(head: UInt16) throws {
        let pair = try Self.makePair()
        let a = RingAttacker(pair)
        Self.goodDescriptor(a, 0)
        a.offer(0)
        a.offer(head)
        var chain = DescriptorChain()
        #expect(try pair.device.nextChain(into: &chain, memory: pair.memory) == .ready)
        let v = Violation.availHeadOutOfRange(head: head, queueSize: 8)
        #expect(throws: v) { try pair.device.nextChain(into: &chain, memory: pair.memory) }
        try Self.expectBrokenAndContained(pair, v)
    }
}

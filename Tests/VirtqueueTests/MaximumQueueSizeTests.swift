import RingTestSupport
import SharedMemory
import Testing
import Virtqueue

/// Queue size 32768 (the virtio maximum, which does not fit `UInt16` + 1): indices, counts
/// and bounds must not truncate or trap at the edge.
@Suite struct MaximumQueueSizeTests {
    static let size = SplitLayout.maximumQueueSize

    @Test func fullQueueOfOneDescriptorRequestsCompletesInAnyOrder() throws {
        let pair = try RingPair(queueSize: Self.size, bounceBytesPerQueue: 4096)
        let driver = pair.driver
        let segment = Segment(address: pair.pool.guestAddress, length: 8, deviceWritable: true)
        for t in 0..<Self.size { try driver.add([segment], token: UInt64(t)) }
        #expect(driver.freeCount == 0 && driver.inFlightCount == Self.size)
        #expect(throws: SubmitError.full) { try driver.add([segment], token: 0) }
        _ = driver.publish()
        var chain = DescriptorChain()
        var heads: [UInt16] = []
        while try pair.device.nextChain(into: &chain, memory: pair.memory) == .ready { heads.append(chain.head) }
        #expect(heads.count == Self.size)
        // Complete them in reverse, all in one batch: used.idx moves by 0x8000 at once, the
        // largest delta the driver may accept (and the one the backwards check sits next to).
        for h in heads.reversed() { pair.device.complete(head: h, length: 8) }
        _ = pair.device.publishUsed()
        var tokens = 0
        var sum: UInt64 = 0
        while let c = try driver.nextCompletion() {
            tokens += 1
            sum += c.token
        }
        #expect(tokens == Self.size)
        #expect(sum == UInt64(Self.size) * UInt64(Self.size - 1) / 2)
        #expect(driver.freeCount == Self.size && !driver.isBroken)
        // And once more past the 16-bit wrap of the indices.
        for t in 0..<Self.size { try driver.add([segment], token: UInt64(t)) }
        _ = driver.publish()
        var n = 0
        while try pair.device.nextChain(into: &chain, memory: pair.memory) == .ready {
            pair.device.complete(head: chain.head, length: 0)
            n += 1
        }
        _ = pair.device.publishUsed()
        while try driver.nextCompletion() != nil { n += 1 }
        #expect(n == 2 * Self.size && driver.freeCount == Self.size && driver.lastUsed == 0)
    }

    @Test func chainOfEveryDescriptorIsAcceptedAndALoopIsNot() throws {
        let pair = try RingPair(queueSize: Self.size, bounceBytesPerQueue: 4096)
        let segments = (0..<Self.size).map { i in
            Segment(address: pair.pool.guestAddress + UInt64(i % 64), length: 1, deviceWritable: i >= Self.size / 2)
        }
        let head = try pair.driver.add(segments, token: 1)
        #expect(pair.driver.freeCount == 0)
        _ = pair.driver.publish()
        var chain = DescriptorChain()
        #expect(try pair.device.nextChain(into: &chain, memory: pair.memory) == .ready)
        #expect(chain.segments.count == Self.size && chain.writableLength == UInt64(Self.size / 2))
        pair.device.complete(head: head, length: UInt32(Self.size / 2))
        _ = pair.device.publishUsed()
        let c = try #require(try pair.driver.nextCompletion())
        #expect(c.token == 1 && c.length == UInt32(Self.size / 2) && pair.driver.freeCount == Self.size)
        // The driver as attacker: the last descriptor links back to the first.
        let a = RingAttacker(pair)
        for i in 0..<Self.size {
            a.writeDescriptor(
                i, address: pair.pool.guestAddress, length: 1, flags: SplitLayout.flagNext,
                next: UInt16((i + 1) % Self.size))
        }
        a.offer(0)
        #expect(
            try pair.device.nextChain(into: &chain, memory: pair.memory)
                == .rejected(head: 0, .chainTooLong(head: 0, limit: Self.size)))
    }

    @Test func availIndexJumpOfQueueSizeIsAcceptedOneMoreIsNot() throws {
        let pair = try RingPair(queueSize: Self.size, bounceBytesPerQueue: 4096)
        let a = RingAttacker(pair)
        a.setAvailIndex(UInt16(Self.size + 1))
        var chain = DescriptorChain()
        let v = Violation.availIndexBeyondQueueSize(
            lastSeen: 0, published: UInt16(Self.size + 1), queueSize: UInt16(Self.size))
        #expect(throws: v) { try pair.device.nextChain(into: &chain, memory: pair.memory) }
        let fresh = try freshDevice(pair)
        a.setAvailIndex(UInt16(Self.size))  // all entries name descriptor 0 (zeroed: a 0-byte buffer at 0)
        #expect(
            try fresh.nextChain(into: &chain, memory: pair.memory)
                == .rejected(head: 0, .descriptorAddressInvalid(head: 0, .unmapped(address: 0, length: 0))))
        #expect(!fresh.isBroken)
    }
}

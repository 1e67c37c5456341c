import RingTestSupport
import SharedMemory
import Testing
import Virtqueue

/// VIRTIO_F_IN_ORDER on the packed device queue: a run of buffers completed unwritten
/// (`completeUnwritten`, a transmitted frame) gets one used descriptor, at the run's first
/// slot with its last buffer id (virtio 1.2 §2.8.20), as DPDK's vhost writes it; a
/// completion with a length ends the run; without IN_ORDER every buffer gets its own.
@Suite struct InOrderUsedTests {
    struct Written: Equatable, CustomStringConvertible {
        let id: UInt16
        let length: UInt32
        let flags: UInt16
        var description: String { "id \(id) len \(length) flags \(flags)" }
    }

    static func written(_ p: PackedRingPair, _ slot: Int) -> Written {
        let d = p.descriptor(slot)
        return Written(
            id: d.load(fromByteOffset: PackedLayout.descID, as: UInt16.self),
            length: d.load(fromByteOffset: PackedLayout.descLen, as: UInt32.self),
            flags: d.load(fromByteOffset: PackedLayout.descFlags, as: UInt16.self))
    }

    /// Posts one chain of `segments` readable 64-byte buffers; returns its buffer id.
    static func post(_ p: PackedRingPair, segments: Int = 1, token: UInt64) throws -> UInt16 {
        var list: [Segment] = []
        for _ in 0..<segments {
            let slice = try #require(p.pool.allocate(64))
            list.append(p.pool.segment(slice, deviceWritable: false))
        }
        let id = try p.driver.add(list, token: token)
        _ = p.driver.publish()
        return id
    }

    static let used = PackedLayout.usedMarker(wrap: true)
    static let available = PackedLayout.availableMarker(wrap: true)

    @Test func aRunOfUnwrittenBuffersGetsOneUsedDescriptorWithItsLastID() throws {
        let p = try PackedRingPair(queueSize: 8, features: RingFeatures(inOrder: true))
        // A two-descriptor chain (slots 0-1), then two single ones (slots 2, 3).
        let ids = [
            try Self.post(p, segments: 2, token: 0), try Self.post(p, token: 1), try Self.post(p, token: 2),
        ]
        var chain = DescriptorChain()
        for id in ids {
            #expect(try p.device.nextChain(into: &chain, memory: p.memory) == .ready)
            #expect(chain.head == id)
            p.device.completeUnwritten(head: id)
        }
        #expect(Self.written(p, 0).flags & Self.used == Self.available, "nothing visible before the publish")
        _ = p.device.publishUsed()
        #expect(Self.written(p, 0) == Written(id: ids[2], length: 0, flags: Self.used), "one descriptor, last id")
        for slot in 1...3 {
            #expect(Self.written(p, slot).flags == Self.available, "slot \(slot) skipped, left as the driver wrote it")
        }
        #expect(p.device.usedIndex == 4, "the used position skips the run's four slots")

        // A run ends at a completion with a length: the run's descriptor, then its own.
        let more = [try Self.post(p, token: 3), try Self.post(p, token: 4), try Self.post(p, token: 5)]
        for _ in more { #expect(try p.device.nextChain(into: &chain, memory: p.memory) == .ready) }
        p.device.completeUnwritten(head: more[0])
        p.device.completeUnwritten(head: more[1])
        p.device.complete(head: more[2], length: 0)
        _ = p.device.publishUsed()
        #expect(Self.written(p, 4) == Written(id: more[1], length: 0, flags: Self.used))
        #expect(Self.written(p, 5).flags == Self.available)
        #expect(Self.written(p, 6) == Written(id: more[2], length: 0, flags: Self.used))
        #expect(p.device.usedIndex == 7)
    }

    @Test func withoutInOrderEveryUnwrittenBufferGetsItsOwnUsedDescriptor() throws {
        let p = try PackedRingPair(queueSize: 8, features: RingFeatures())
        let ids = [try Self.post(p, token: 0), try Self.post(p, token: 1), try Self.post(p, token: 2)]
        var chain = DescriptorChain()
        for id in ids {
            #expect(try p.device.nextChain(into: &chain, memory: p.memory) == .ready)
            p.device.completeUnwritten(head: id)
        }
        _ = p.device.publishUsed()
        for (slot, id) in ids.enumerated() {
            #expect(Self.written(p, slot) == Written(id: id, length: 0, flags: Self.used))
        }
        // Our driver (which never acks IN_ORDER) reads them back one by one.
        var tokens: [UInt64] = []
        while let c = try p.driver.nextCompletion() { tokens.append(c.token) }
        #expect(tokens == [0, 1, 2])
    }

    @Test func runAcrossTheWrapIsWrittenWithTheWrapCounterOfItsFirstSlot() throws {
        let p = try PackedRingPair(queueSize: 4, features: RingFeatures(inOrder: true))
        var chain = DescriptorChain()
        // Slots 0-2 used and reclaimed one by one, so the next run starts at slot 3, lap 1.
        for n in 0..<3 {
            let id = try Self.post(p, token: UInt64(n))
            #expect(try p.device.nextChain(into: &chain, memory: p.memory) == .ready)
            p.device.complete(head: id, length: 0)
            _ = p.device.publishUsed()
            #expect(try p.driver.nextCompletion()?.token == UInt64(n))
        }
        let a = try Self.post(p, token: 10)  // slot 3, lap 1
        let b = try Self.post(p, token: 11)  // slot 0, lap 2
        for _ in 0..<2 { #expect(try p.device.nextChain(into: &chain, memory: p.memory) == .ready) }
        p.device.completeUnwritten(head: a)
        p.device.completeUnwritten(head: b)
        _ = p.device.publishUsed()
        #expect(Self.written(p, 3) == Written(id: b, length: 0, flags: Self.used), "at slot 3 with lap 1's marker")
        #expect(p.device.usedIndex == 1)
        #expect(p.device.usedWrap == false)
    }
}

import RingTestSupport
import SharedMemory
import Testing
import Virtqueue

/// `PackedDeviceQueue.nextBuffers`, the packed device's batch pop of chains of one direct
/// descriptor (four flags tested together, one acquire, buffers translated against the
/// last region): every buffer comes out as `nextChain` gives it, the run stops before
/// anything `nextChain` must judge, and a hostile id breaks the queue as it always does.
@Suite struct PackedBatchPopTests {
    static let avail = PackedLayout.availableMarker(wrap: true)
    static let write = PackedLayout.flagWrite
    /// No region holds it.
    static let unmapped: UInt64 = 0x7f00_0000_0000

    /// Pops with `nextBuffers` (capacity `capacity`) into an array.
    static func pop(_ device: PackedDeviceQueue, _ memory: GuestMemory, capacity: Int = 8) throws(Violation)
        -> [PoppedBuffer]
    {
        let out = UnsafeMutablePointer<PoppedBuffer>.allocate(capacity: capacity)
        defer { out.deallocate() }
        let n = try device.nextBuffers(into: out, capacity: capacity, memory: memory)
        return Array(UnsafeBufferPointer(start: out, count: n))
    }

    /// Posts one single-descriptor buffer of `length` bytes (first byte `mark`); its id.
    static func post(_ p: PackedRingPair, length: Int, writable: Bool, mark: UInt8) throws -> UInt16 {
        let slice = try #require(p.pool.allocate(length))
        [UInt8](repeating: mark, count: length).withUnsafeBytes { p.pool.copyIn(slice, from: $0) }
        let id = try p.driver.add([p.pool.segment(slice, deviceWritable: writable)], token: UInt64(mark))
        _ = p.driver.publish()
        return id
    }

    /// Hand-written single descriptors in slots `0..<ids.count` (lap 1), each 64 bytes of
    /// the pool unless `addresses` says otherwise.
    static func writeSingles(
        _ p: PackedRingPair, ids: [UInt16], addresses: [Int: UInt64] = [:], flags: [Int: UInt16] = [:]
    ) {
        // Back to front, so no slot is available before the ones behind it are written.
        for slot in ids.indices.reversed() {
            p.writeDescriptor(
                slot, address: addresses[slot] ?? p.pool.guestAddress + UInt64(slot * 64), length: 64, id: ids[slot],
                flags: flags[slot] ?? avail)
        }
    }

    @Test func aRunOfSingleDescriptorsComesOutAsPosted() throws {
        let p = try PackedRingPair(queueSize: 8)
        // Writable ones at 1, 3 and 6: the WRITE bit of each slot of a group of four.
        let shape: [(Int, Bool)] = [
            (60, false), (70, true), (80, false), (90, true), (100, false), (110, false), (120, true),
        ]
        var ids: [UInt16] = []
        for (n, (length, writable)) in shape.enumerated() {
            ids.append(try Self.post(p, length: length, writable: writable, mark: UInt8(n + 1)))
        }
        let popped = try Self.pop(p.device, p.memory)
        #expect(popped.map(\.id) == ids)
        #expect(popped.map(\.bytes.count) == shape.map(\.0))
        #expect(popped.map(\.deviceWritable) == shape.map(\.1))
        #expect(popped.map { $0.bytes.load(as: UInt8.self) } == (1...7).map { UInt8($0) }, "each its own bytes")
        #expect(try Self.pop(p.device, p.memory).isEmpty, "nothing more")
        popped.withUnsafeBufferPointer { p.device.completeUnwritten($0.baseAddress!, count: $0.count) }
        _ = p.device.publishUsed()
        var reclaimed: [UInt16] = []
        while let c = try p.driver.nextCompletion() { reclaimed.append(c.head) }
        #expect(reclaimed == ids, "without IN_ORDER each buffer gets its own used descriptor")
    }

    @Test func theRunStopsBeforeAWalkedChainWhichNextChainTakes() throws {
        let p = try PackedRingPair(queueSize: 8)
        let a = try Self.post(p, length: 64, writable: false, mark: 1)
        let b = try Self.post(p, length: 64, writable: false, mark: 2)
        let s1 = try #require(p.pool.allocate(12))
        let s2 = try #require(p.pool.allocate(64))
        let walked = try p.driver.add(
            [p.pool.segment(s1, deviceWritable: false), p.pool.segment(s2, deviceWritable: false)], token: 3)
        _ = p.driver.publish()
        let c = try Self.post(p, length: 64, writable: false, mark: 4)
        #expect(try Self.pop(p.device, p.memory).map(\.id) == [a, b])
        var chain = DescriptorChain()
        #expect(try p.device.nextChain(into: &chain, memory: p.memory) == .ready)
        #expect(chain.head == walked && chain.segments.count == 2 && chain.readableLength == 76)
        #expect(try Self.pop(p.device, p.memory).map(\.id) == [c])
    }

    @Test func theRunStopsBeforeABufferOutsideMemoryWhichNextChainRejects() throws {
        let p = try PackedRingPair(queueSize: 8)
        Self.writeSingles(p, ids: [0, 1, 2, 3, 4], addresses: [2: Self.unmapped])
        #expect(try Self.pop(p.device, p.memory).map(\.id) == [0, 1])
        var chain = DescriptorChain()
        let fetch = try p.device.nextChain(into: &chain, memory: p.memory)
        #expect(
            fetch
                == .rejected(head: 2, .descriptorAddressInvalid(head: 2, .unmapped(address: Self.unmapped, length: 64)))
        )
        #expect(try Self.pop(p.device, p.memory).map(\.id) == [3, 4], "the queue goes on")
    }

    @Test func aBufferIDTwiceInOneGroupBreaksTheQueueAfterTheBuffersBeforeIt() throws {
        let p = try PackedRingPair(queueSize: 8)
        Self.writeSingles(p, ids: [5, 6, 6, 7])
        #expect(try Self.pop(p.device, p.memory).map(\.id) == [5, 6], "the two before it are returned, to complete")
        #expect(p.device.violation == .packedBufferIdInFlight(id: 6))
        #expect(throws: Violation.packedBufferIdInFlight(id: 6)) { try Self.pop(p.device, p.memory) }
    }

    @Test func aBufferIDOutOfRangeBreaksTheQueue() throws {
        let p = try PackedRingPair(queueSize: 8)
        Self.writeSingles(p, ids: [8, 0, 1, 2])
        #expect(throws: Violation.packedBufferIdOutOfRange(id: 8, queueSize: 8)) { try Self.pop(p.device, p.memory) }
        #expect(p.device.isBroken)
    }

    @Test func aUsedMarkStopsTheRunAndNextChainBreaksTheQueue() throws {
        let p = try PackedRingPair(queueSize: 8)
        Self.writeSingles(p, ids: [0, 1, 2, 3], flags: [2: PackedLayout.usedMarker(wrap: true)])
        #expect(try Self.pop(p.device, p.memory).map(\.id) == [0, 1])
        var chain = DescriptorChain()
        #expect(throws: Violation.packedAvailFlagsInvalid(slot: 2, flags: 0x8080)) {
            try p.device.nextChain(into: &chain, memory: p.memory)
        }
    }

    @Test func slotsBeyondWhatTheDriverMayFillAreLeftToNextChain() throws {
        let p = try PackedRingPair(queueSize: 4)
        Self.writeSingles(p, ids: [0, 1, 2, 3])
        #expect(try Self.pop(p.device, p.memory).map(\.id) == [0, 1, 2, 3])
        // Lap 2 marks on slot 0 while all four buffers are still out: an overrun.
        p.writeDescriptor(
            0, address: p.pool.guestAddress, length: 64, id: 0, flags: PackedLayout.availableMarker(wrap: false))
        #expect(try Self.pop(p.device, p.memory).isEmpty)
        var chain = DescriptorChain()
        #expect(throws: Violation.packedAvailFlagsInvalid(slot: 0, flags: PackedLayout.availableMarker(wrap: false))) {
            try p.device.nextChain(into: &chain, memory: p.memory)
        }
    }

    /// Across the end of the ring: groups of four only inside a lap, the wrap counter
    /// toggled at the end, ids reused once completed.
    @Test func runsCrossTheEndOfTheRing() throws {
        let p = try PackedRingPair(queueSize: 8)
        for lap in 0..<3 {
            var ids: [UInt16] = []
            for n in 0..<6 { ids.append(try Self.post(p, length: 64, writable: false, mark: UInt8(10 * lap + n))) }
            let popped = try Self.pop(p.device, p.memory)
            #expect(popped.map(\.id) == ids, "round \(lap)")
            #expect(popped.map { $0.bytes.load(as: UInt8.self) } == (0..<6).map { UInt8(10 * lap + $0) })
            popped.withUnsafeBufferPointer { p.device.completeUnwritten($0.baseAddress!, count: $0.count) }
            _ = p.device.publishUsed()
            var reclaimed: [UInt16] = []
            while let c = try p.driver.nextCompletion() { reclaimed.append(c.head) }
            #expect(reclaimed == ids, "round \(lap)")
        }
        #expect(p.device.nextAvail == 2 && p.device.availWrap == true, "18 slots: two laps and two")
    }

    /// With IN_ORDER a popped batch completed unwritten is one used descriptor at its
    /// first slot with its last id.
    @Test func aPoppedBatchCompletedUnwrittenIsOneUsedDescriptorWithInOrder() throws {
        let p = try PackedRingPair(queueSize: 8, features: RingFeatures(inOrder: true))
        var ids: [UInt16] = []
        for n in 0..<5 { ids.append(try Self.post(p, length: 64, writable: false, mark: UInt8(n))) }
        let popped = try Self.pop(p.device, p.memory)
        #expect(popped.count == 5)
        popped.withUnsafeBufferPointer { p.device.completeUnwritten($0.baseAddress!, count: $0.count) }
        _ = p.device.publishUsed()
        let d = p.descriptor(0)
        #expect(d.load(fromByteOffset: PackedLayout.descFlags, as: UInt16.self) == PackedLayout.usedMarker(wrap: true))
        #expect(d.load(fromByteOffset: PackedLayout.descID, as: UInt16.self) == ids[4])
        for slot in 1..<5 {
            #expect(p.descriptor(slot).load(fromByteOffset: PackedLayout.descFlags, as: UInt16.self) == Self.avail)
        }
        #expect(p.device.usedIndex == 5)
    }

    /// What one pop gives, in a form two queues' answers can be compared by.
    enum Event: Equatable, CustomStringConvertible {
        case buffer(id: UInt16, address: UInt64, length: Int, writable: Bool)
        case chain(id: UInt16, segments: Int)
        case rejected(id: UInt16, Violation)
        case broken(Violation)
        var description: String {
            switch self {
            case .buffer(let id, let a, let l, let w): "buffer \(id) 0x\(String(a, radix: 16)) \(l) \(w ? "w" : "r")"
            case .chain(let id, let s): "chain \(id) \(s) segments"
            case .rejected(let id, let v): "rejected \(id) \(v)"
            case .broken(let v): "broken \(v)"
            }
        }
    }

    /// Random hostile rings, read by two device queues over the same memory: one with
    /// `nextChain` alone, one with `nextBuffers` and `nextChain` where a run stops (as
    /// serve-net's transmit handler does). Both must see the same buffers, rejections and
    /// violations, in the same order.
    @Test func nextBuffersAgreesWithNextChainOnRandomHostileRings() throws {
        var rng = SplitMix(seed: 0x5eed_0006)
        for round in 0..<400 {
            let size = [4, 8, 13, 16][round % 4]
            let p = try PackedRingPair(queueSize: size, features: RingFeatures(indirectDescriptors: true))
            let a = p.layout.ringAddresses(queue: 0, guestBase: p.guestBase)
            let twin = try PackedDeviceQueue(
                queueSize: size, ringAddress: a.descriptors, driverAreaAddress: a.avail, deviceAreaAddress: a.used,
                features: p.features, memory: p.memory)
            for slot in 0..<size {
                let kind = rng.next() % 18
                let flags: UInt16
                switch kind {
                case 0: flags = PackedLayout.availableMarker(wrap: false)  // not available
                case 1: flags = PackedLayout.usedMarker(wrap: true)
                case 16: flags = 0  // never written (lap 0's used mark)
                case 17: flags = UInt16(truncatingIfNeeded: rng.next())  // anything
                case 2: flags = Self.avail | PackedLayout.flagNext
                case 3: flags = Self.avail | PackedLayout.flagIndirect
                case 4, 5, 6: flags = Self.avail | Self.write
                default: flags = Self.avail
                }
                let address: UInt64
                switch rng.next() % 12 {
                case 0: address = Self.unmapped
                case 1: address = p.pool.guestAddress + UInt64(p.pool.size) - 32  // runs past the region's end
                default: address = p.pool.guestAddress + UInt64(rng.next() % 4096)
                }
                let id = UInt16(rng.next() % UInt64(size + 2))  // some out of range, some repeated
                p.writeDescriptor(slot, address: address, length: UInt32(rng.next() % 200), id: id, flags: flags)
            }
            let capacity = Int(rng.next() % 6) + 1
            #expect(
                Self.events(nextChainOnly: p.device, p.memory)
                    == Self.events(batched: twin, p.memory, capacity: capacity), "round \(round)")
        }
    }

    static func events(nextChainOnly q: PackedDeviceQueue, _ memory: GuestMemory) -> [Event] {
        var out: [Event] = []
        var chain = DescriptorChain()
        while out.count < 64 {
            do {
                guard try nextChainEvent(q, memory, &chain, into: &out) else { return out }
            } catch {
                out.append(.broken(error))
                return out
            }
        }
        return out
    }

    static func events(batched q: PackedDeviceQueue, _ memory: GuestMemory, capacity: Int) -> [Event] {
        var out: [Event] = []
        var chain = DescriptorChain()
        while out.count < 64 {
            do {
                let popped = try pop(q, memory, capacity: capacity)
                for b in popped {
                    let offset = b.bytes.baseAddress! - memory.regions[0].mapping.base
                    out.append(
                        .buffer(
                            id: b.id, address: memory.regions[0].guestAddress + UInt64(offset), length: b.bytes.count,
                            writable: b.deviceWritable))
                }
                if q.isBroken { continue }  // the next pop throws
                guard try nextChainEvent(q, memory, &chain, into: &out) else { return out }
            } catch {
                out.append(.broken(error))
                return out
            }
        }
        return out
    }

    /// One `nextChain` call recorded in `out`; false when the ring was empty.
    static func nextChainEvent(
        _ q: PackedDeviceQueue, _ memory: GuestMemory, _ chain: inout DescriptorChain, into out: inout [Event]
    ) throws(Violation) -> Bool {
        switch try q.nextChain(into: &chain, memory: memory) {
        case .empty: return false
        case .rejected(let id, let v): out.append(.rejected(id: id, v))
        case .ready: out.append(event(chain))
        }
        return true
    }

    /// A one-segment chain as the buffer `nextBuffers` would give; longer ones by shape.
    static func event(_ chain: DescriptorChain) -> Event {
        guard chain.segments.count == 1 else { return .chain(id: chain.head, segments: chain.segments.count) }
        let s = chain.segments[0]
        return .buffer(id: chain.head, address: s.guestAddress, length: s.buffer.count, writable: s.deviceWritable)
    }
}

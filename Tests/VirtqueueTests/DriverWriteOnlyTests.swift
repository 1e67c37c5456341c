import RingTestSupport
import SharedMemory
import Testing
import Virtqueue

/// R1 (write-only sharing): the driver keeps descriptors, free list and avail entries in
/// private shadow state. A device that overwrites the descriptor table, the avail ring or
/// the indirect tables after the driver posted cannot change what the driver frees.
@Suite struct DriverWriteOnlyTests {
    static let featureSets = [RingFeatures(), RingFeatures(eventIndex: true, indirectDescriptors: true)]

    /// Everything the driver wrote to shared memory for queue 0, overwritten with garbage.
    static func scribbleDriverWrittenParts(_ pair: RingPair, seed: UInt8) {
        let a = RingAttacker(pair)
        RingAttacker.scribble(a.descriptors, count: SplitLayout.descriptorTableSize(a.size), seed: seed)
        RingAttacker.scribble(a.avail, count: SplitLayout.availRingSize(a.size), seed: seed &+ 1)
        let indirectBytes = a.size * a.area.indirectEntries * SplitLayout.descriptorSize
        if indirectBytes > 0 { RingAttacker.scribble(a.indirect, count: indirectBytes, seed: seed &+ 2) }
    }

    @Test(arguments: featureSets)
    func scribbledDescriptorTableAndAvailRingDoNotChangeWhatTheDriverFrees(features: RingFeatures) throws {
        let pair = try RingPair(queueSize: 8, features: features, indirectEntries: 4)
        let driver = pair.driver
        let hA = try post(pair, readable: 16, writable: 64, writableSegments: 2, token: 1)  // 3 segments
        let hB = try post(pair, readable: 0, writable: 64, token: 2)  // 1 segment
        let hC = try post(pair, readable: 8, writable: 8, token: 3)  // 2 segments
        let used = features.indirectDescriptors ? 3 : 6
        #expect(driver.freeCount == 8 - used)
        _ = driver.publish()
        // The device takes all three chains (while the ring is still honest)...
        var chain = DescriptorChain()
        var heads: [UInt16] = []
        for _ in 0..<3 {
            #expect(try pair.device.nextChain(into: &chain, memory: pair.memory) == .ready)
            heads.append(chain.head)
        }
        #expect(heads == [hA, hB, hC])
        // ...then turns hostile: every byte the driver ever wrote is now garbage.
        Self.scribbleDriverWrittenParts(pair, seed: 0x3C)
        // Completions out of order, by hand.
        let a = RingAttacker(pair)
        a.writeUsed(slot: 0, id: UInt32(hB), length: 64)
        a.writeUsed(slot: 1, id: UInt32(hA), length: 10)
        a.writeUsed(slot: 2, id: UInt32(hC), length: 0)
        a.setUsedIndex(3)
        var got: [Completion] = []
        while let c = try driver.nextCompletion() { got.append(c) }
        #expect(got.map(\.token) == [2, 1, 3])
        #expect(got.map(\.length) == [64, 10, 0])
        #expect(got.map(\.head) == [hB, hA, hC])
        #expect(driver.freeCount == 8 && driver.inFlightCount == 0 && !driver.isBroken)

        // The free list is intact: 8 one-descriptor requests get 8 distinct heads, a 9th
        // does not fit.
        let device = try freshDevice(pair, startIndex: 3)
        var fill: [UInt16] = []
        for t in 0..<8 { fill.append(try post(pair, readable: 0, writable: 16, token: 100 + UInt64(t))) }
        #expect(Set(fill).count == 8 && fill.allSatisfy { $0 < 8 })
        #expect(throws: SubmitError.full) { try post(pair, readable: 0, writable: 16, token: 999) }
        _ = driver.publish()
        var echoDevice = EchoDevice()
        #expect(try echoDevice.serve(device, memory: pair.memory) == 8)
        _ = device.publishUsed()
        var tokens: [UInt64] = []
        while let c = try driver.nextCompletion() { tokens.append(c.token) }
        #expect(tokens.sorted() == (100..<108).map { UInt64($0) })
        #expect(driver.freeCount == 8)
        // And real requests (multi-segment, indirect when negotiated) still round-trip.
        for i in 0..<20 {
            try echo(
                driver: driver, pool: pair.pool, device: device, memory: pair.memory,
                payload: (0..<(1 + i * 29)).map { UInt8(truncatingIfNeeded: $0 ^ i) }, token: UInt64(i))
        }
        #expect(driver.freeCount == 8 && !driver.isBroken)
    }

    @Test func deviceRewritingNextFieldsCannotRedirectFrees() throws {
        let pair = try RingPair(queueSize: 8)
        let driver = pair.driver
        let a = RingAttacker(pair)
        let hA = try post(pair, readable: 16, writable: 64, writableSegments: 2, token: 1)  // 0 -> 1 -> 2
        let hB = try post(pair, readable: 0, writable: 64, token: 2)  // 3
        let hC = try post(pair, readable: 8, writable: 8, token: 3)  // 4 -> 5
        #expect([hA, hB, hC] == [0, 3, 4])
        _ = driver.publish()
        var chain = DescriptorChain()
        for _ in 0..<3 { #expect(try pair.device.nextChain(into: &chain, memory: pair.memory) == .ready) }
        // Every descriptor now claims to continue into B (still in flight) or into the free
        // descriptors 6 and 7, as if the chains were longer or shorter than posted.
        for i in 0..<8 {
            a.writeDescriptor(
                i, address: 0xdead_0000 + UInt64(i), length: 0xFFFF_FFFF, flags: 0xFFFF,
                next: i % 2 == 0 ? hB : 6)
        }
        pair.device.complete(head: hA, length: 0)
        _ = pair.device.publishUsed()
        #expect(try driver.nextCompletion()?.token == 1)
        #expect(driver.freeCount == 5)  // A's three, nothing of B or C
        pair.device.complete(head: hC, length: 8)
        _ = pair.device.publishUsed()
        #expect(try driver.nextCompletion()?.token == 3)
        #expect(driver.freeCount == 7 && driver.inFlightCount == 1)
        // B's descriptor was not freed: seven new one-descriptor requests never get it.
        var heads: [UInt16] = []
        for t in 0..<7 { heads.append(try post(pair, readable: 0, writable: 8, token: 10 + UInt64(t))) }
        #expect(Set(heads) == Set([0, 1, 2, 4, 5, 6, 7]))
        #expect(throws: SubmitError.full) { try post(pair, readable: 0, writable: 8, token: 99) }
        _ = driver.publish()
        var echoDevice = EchoDevice()
        #expect(try echoDevice.serve(pair.device, memory: pair.memory) == 7)  // zero-length answers
        pair.device.complete(head: hB, length: 64)
        _ = pair.device.publishUsed()
        var tokens: [UInt64] = []
        while let c = try driver.nextCompletion() { tokens.append(c.token) }
        #expect(tokens.sorted() == [2] + (10..<17).map { UInt64($0) })
        #expect(driver.freeCount == 8)
        try echoWorks(pair, queue: 0, rounds: 10)
        #expect(driver.freeCount == 8 && !driver.isBroken)
    }

    /// The 16 bytes of shared descriptor `i`, as the device would load them.
    static func sharedDescriptor(_ a: RingAttacker, _ i: Int) -> [UInt64] {
        let d = a.descriptors + i * SplitLayout.descriptorSize
        return [SharedAccess.load64(d), SharedAccess.load64(d + 8)]
    }

    /// A ring of 8 and one chain in a bounce slice: a 16-byte readable header, then
    /// writable pieces of `writable` bytes each, back to back.
    static func repostBed(writable: [Int]) throws -> (RingPair, RingAttacker, [Segment]) {
        let pair = try RingPair(queueSize: 8)
        let buffer = try #require(pair.pool.allocate(16 + writable.reduce(0, +)))
        var segments = [pair.pool.segment(buffer, offset: 0, length: 16, deviceWritable: false)]
        var offset = 16
        for n in writable {
            segments.append(pair.pool.segment(buffer, offset: offset, length: n, deviceWritable: true))
            offset += n
        }
        return (pair, RingAttacker(pair), segments)
    }

    /// A chain reposted on the same descriptors stores nothing (the descriptor cache lines
    /// stay clean); a descriptor the device scribbled on is compared, found different and
    /// rewritten, so the device reads exactly the chain posted (R1: what is loaded only
    /// decides whether to store).
    @Test func repostedChainStoresOnlyTheDescriptorHalvesThatDiffer() throws {
        let (pair, a, segments) = try Self.repostBed(writable: [64, 1])
        let driver = pair.driver
        let expected: [[UInt64]] = [
            [segments[0].address, 16 | UInt64(SplitLayout.flagNext) << 32 | 1 << 48],
            [segments[1].address, 64 | UInt64(SplitLayout.flagNext | SplitLayout.flagWrite) << 32 | 2 << 48],
            // The last descriptor's shared next is 0 (the shadow keeps the free link, 3).
            [segments[2].address, 1 | UInt64(SplitLayout.flagWrite) << 32],
        ]
        var chain = DescriptorChain()
        func roundTrip(token: UInt64) throws {
            #expect(try driver.add(segments, token: token) == 0)
            _ = driver.publish()
            #expect(try pair.device.nextChain(into: &chain, memory: pair.memory) == .ready)
            #expect(chain.head == 0 && chain.segments.count == 3)
            #expect((0..<3).map { Self.sharedDescriptor(a, $0) } == expected)
            pair.device.complete(head: 0, length: 65)
            _ = pair.device.publishUsed()
            #expect(try driver.nextCompletion()?.token == token)
        }
        try roundTrip(token: 1)
        #expect(driver.descriptorStores == 6)  // a fresh (zeroed) table: every half
        for t in 2..<6 { try roundTrip(token: UInt64(t)) }
        #expect(driver.descriptorStores == 6)  // the same chain four times: nothing stored
        // The device scribbles on the middle descriptor's length and the last one's address.
        a.writeDescriptor(1, address: segments[1].address, length: 0xFFFF_FFFF, flags: 0xFFFF, next: 7)
        a.writeDescriptor(2, address: 0xdead_0000, length: 1, flags: SplitLayout.flagWrite, next: 0)
        try roundTrip(token: 6)
        #expect(driver.descriptorStores == 8)  // exactly the two halves that differed
        // A vandal that fills the whole table with 0xff: every half is rewritten.
        RingAttacker.scribble(a.descriptors, count: SplitLayout.descriptorTableSize(8), seed: 0xff)
        try roundTrip(token: 7)
        #expect(driver.descriptorStores == 14)
        #expect(!driver.isBroken && driver.freeCount == 8)
    }

    /// An avail entry is stored only when it differs from the head posted: laps of a
    /// closed loop on the same head leave the entries' lines clean, and an entry the device
    /// scribbled on is found different and rewritten, so the device pops exactly the head
    /// posted (R1: what is loaded only decides whether to store).
    @Test func availEntriesAreStoredOnlyWhenTheyDiffer() throws {
        let (pair, a, segments) = try Self.repostBed(writable: [64])
        let driver = pair.driver
        var chain = DescriptorChain()
        func roundTrip(token: UInt64) throws -> UInt16 {
            let head = try driver.add(segments, token: token)
            _ = driver.publish()
            #expect(try pair.device.nextChain(into: &chain, memory: pair.memory) == .ready)
            #expect(chain.head == head)
            pair.device.complete(head: chain.head, length: 64)
            _ = pair.device.publishUsed()
            #expect(try driver.nextCompletion()?.token == token)
            return head
        }
        // Two laps and a half of the ring, always on head 0: the zeroed ring already holds
        // 0 in every entry, so nothing is stored.
        for t in 0..<20 { #expect(try roundTrip(token: UInt64(t)) == 0) }
        #expect(driver.availEntryStores == 0)
        // The device writes 5 into the next entry (20 % 8): rewritten, and only it.
        a.setAvailEntry(slot: 4, head: 5)
        #expect(try roundTrip(token: 20) == 0)
        #expect(driver.availEntryStores == 1)
        for t in 21..<29 { _ = try roundTrip(token: UInt64(t)) }
        #expect(driver.availEntryStores == 1)
        // Another head (two chains in flight, the second on descriptors 2-3) is stored.
        try driver.add(segments, token: 100)
        let second = try driver.add(segments, token: 101)
        #expect(second == 2)
        _ = driver.publish()
        #expect(driver.availEntryStores == 2)
        for expected: UInt16 in [0, 2] {
            #expect(try pair.device.nextChain(into: &chain, memory: pair.memory) == .ready)
            #expect(chain.head == expected)
        }
        #expect(!driver.isBroken)
    }

    @Test func driverNeverReadsAvailIndexBack() throws {
        // A device that rewinds or advances avail.idx cannot make the driver re-post or skip
        // entries: the next publish writes the driver's private index again.
        let pair = try RingPair(queueSize: 8)
        let a = RingAttacker(pair)
        try post(pair, readable: 0, writable: 8, token: 1)
        _ = pair.driver.publish()
        #expect(a.availIndex == 1)
        a.setAvailIndex(0x7777)
        try post(pair, readable: 0, writable: 8, token: 2)
        _ = pair.driver.publish()
        #expect(a.availIndex == 2)
    }
}

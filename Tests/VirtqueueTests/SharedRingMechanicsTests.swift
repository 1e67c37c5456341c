import RingTestSupport
import SharedMemory
import Testing
import Virtqueue

/// Issue 14: the split and packed queues share one chain walker, one in-flight table and
/// one packed event-suppression helper, so the same hostile input is refused the same way
/// by both formats (and, for event suppression, by both sides).
@Suite struct SharedRingMechanicsTests {
    static let next = SplitLayout.flagNext
    static let write = SplitLayout.flagWrite
    static let indirect = SplitLayout.flagIndirect
    static let unmapped: UInt64 = 0xdead_0000_0000
    static let bigBase: UInt64 = 0x10_0000_0000

    enum Address {
        /// Buffer `k` of the bounce pool (256 bytes apart).
        case buffer(Int)
        /// The hand-made indirect table.
        case table
        case raw(UInt64)
    }

    /// One descriptor as the malicious driver writes it. NEXT is added to every ring
    /// descriptor but the last (and, split, to every table entry but the last).
    struct Desc {
        var address: Address
        var length: UInt32
        var flags: UInt16 = 0
    }

    struct Hostile: CustomTestStringConvertible, Sendable {
        let name: String
        let ring: [Desc]
        var table: [Desc] = []
        var features = RingFeatures(indirectDescriptors: true)
        /// Adds a sparse 4 GiB region at `bigBase`, so ~2^32-byte buffers translate.
        var big = false
        let expected: Violation
        var testDescription: String { name }
    }

    static let cases: [Hostile] = [
        Hostile(
            name: "readable after writable",
            ring: [Desc(address: .buffer(0), length: 8, flags: write), Desc(address: .buffer(1), length: 8)],
            expected: .readableAfterWritable(head: 0)),
        Hostile(
            name: "unmapped buffer", ring: [Desc(address: .raw(unmapped), length: 8)],
            expected: .descriptorAddressInvalid(head: 0, .unmapped(address: unmapped, length: 8))),
        Hostile(
            name: "address wraps 2^64", ring: [Desc(address: .raw(UInt64.max - 7), length: 16)],
            expected: .descriptorAddressInvalid(head: 0, .overflow(address: UInt64.max - 7, length: 16))),
        Hostile(
            name: "total length beyond 32 bits",
            ring: [
                Desc(address: .raw(bigBase), length: 0xFFFF_FFFF),
                Desc(address: .raw(bigBase), length: 1, flags: write),
            ],
            big: true, expected: .chainLengthOverflow(head: 0)),
        Hostile(
            name: "indirect not negotiated", ring: [Desc(address: .table, length: 16, flags: indirect)],
            table: [Desc(address: .buffer(0), length: 8)], features: RingFeatures(),
            expected: .indirectNotNegotiated(head: 0)),
        Hostile(
            name: "indirect with next",
            ring: [Desc(address: .table, length: 16, flags: indirect | next), Desc(address: .buffer(1), length: 8)],
            table: [Desc(address: .buffer(0), length: 8)], expected: .indirectWithNext(head: 0)),
        Hostile(
            name: "indirect table empty", ring: [Desc(address: .table, length: 0, flags: indirect)],
            expected: .indirectTableLength(head: 0, length: 0)),
        Hostile(
            name: "indirect table not whole descriptors", ring: [Desc(address: .table, length: 24, flags: indirect)],
            table: [Desc(address: .buffer(0), length: 8), Desc(address: .buffer(1), length: 8)],
            expected: .indirectTableLength(head: 0, length: 24)),
        Hostile(
            name: "indirect table beyond the limit", ring: [Desc(address: .table, length: 16 * 9, flags: indirect)],
            table: (0..<9).map { Desc(address: .buffer($0), length: 8) },
            expected: .indirectTableLength(head: 0, length: 16 * 9)),
        Hostile(
            name: "indirect table unmapped", ring: [Desc(address: .raw(unmapped), length: 32, flags: indirect)],
            expected: .descriptorAddressInvalid(head: 0, .unmapped(address: unmapped, length: 32))),
        Hostile(
            name: "nested indirect", ring: [Desc(address: .table, length: 32, flags: indirect)],
            table: [Desc(address: .buffer(0), length: 8), Desc(address: .table, length: 16, flags: indirect)],
            expected: .nestedIndirect(head: 0)),
        Hostile(
            name: "readable after writable in the table", ring: [Desc(address: .table, length: 32, flags: indirect)],
            table: [Desc(address: .buffer(0), length: 8, flags: write), Desc(address: .buffer(1), length: 8)],
            expected: .readableAfterWritable(head: 0)),
        Hostile(
            name: "writable in the ring, readable in the table",
            ring: [
                Desc(address: .buffer(0), length: 8, flags: write), Desc(address: .table, length: 16, flags: indirect),
            ],
            table: [Desc(address: .buffer(1), length: 8)], expected: .readableAfterWritable(head: 0)),
        Hostile(
            name: "unmapped buffer in the table", ring: [Desc(address: .table, length: 16, flags: indirect)],
            table: [Desc(address: .raw(unmapped), length: 8)],
            expected: .descriptorAddressInvalid(head: 0, .unmapped(address: unmapped, length: 8))),
    ]

    static func resolve(_ a: Address, pool: BouncePool) -> UInt64 {
        switch a {
        case .buffer(let k): return pool.guestAddress + UInt64(k * 256)
        case .table: return pool.guestAddress + 64 * 1024
        case .raw(let v): return v
        }
    }

    static func withBig(_ memory: GuestMemory, _ c: Hostile) throws -> (GuestMemory, SharedRegion?) {
        guard c.big else { return (memory, nil) }
        let big = try SharedRegion(name: "ringfence-big", size: 1 << 32)
        var m = memory
        try m.add(GuestRegion(guestAddress: bigBase, userAddress: 0x20_0000_0000, mapping: big))
        return (m, big)
    }

    /// The split device's verdict: ring descriptors 0, 1, ... linked by `next`; the table's
    /// entries linked by `next` too.
    static func splitVerdict(_ c: Hostile) throws -> (ChainFetch, Bool) {
        let pair = try RingPair(queueSize: 8, features: c.features)
        let a = RingAttacker(pair)
        let (memory, big) = try withBig(pair.memory, c)
        defer { withExtendedLifetime(big) {} }
        let table = pair.pool.base + 64 * 1024
        for (i, d) in c.table.enumerated() {
            let more = i + 1 < c.table.count
            RingAttacker.writeDescriptor(
                table, i, address: resolve(d.address, pool: pair.pool), length: d.length,
                flags: d.flags | (more ? next : 0), next: UInt16(i + 1))
        }
        for (i, d) in c.ring.enumerated() {
            let more = i + 1 < c.ring.count
            a.writeDescriptor(
                i, address: resolve(d.address, pool: pair.pool), length: d.length, flags: d.flags | (more ? next : 0),
                next: UInt16(i + 1))
        }
        a.offer(0)
        var chain = DescriptorChain()
        let got = try pair.device.nextChain(into: &chain, memory: memory)
        return (got, pair.device.isBroken)
    }

    /// The packed device's verdict: ring slots 0, 1, ... (id 0 in the last); the table's
    /// entries in order, NEXT unused.
    static func packedVerdict(_ c: Hostile) throws -> (ChainFetch, Bool) {
        let pair = try PackedRingPair(queueSize: 8, features: c.features)
        let (memory, big) = try withBig(pair.memory, c)
        defer { withExtendedLifetime(big) {} }
        let table = pair.pool.base + 64 * 1024
        for (i, d) in c.table.enumerated() {
            let e = table + i * PackedLayout.descriptorSize
            SharedAccess.store64(e + PackedLayout.descAddr, resolve(d.address, pool: pair.pool))
            SharedAccess.store32(e + PackedLayout.descLen, d.length)
            SharedAccess.store16(e + PackedLayout.descFlags, d.flags)
        }
        // Head last, as a driver publishes.
        for (i, d) in c.ring.enumerated().reversed() {
            let more = i + 1 < c.ring.count
            pair.writeDescriptor(
                i, address: resolve(d.address, pool: pair.pool), length: d.length, id: 0,
                flags: d.flags | (more ? next : 0) | PackedLayout.availableMarker(wrap: true))
        }
        var chain = DescriptorChain()
        let got = try pair.device.nextChain(into: &chain, memory: memory)
        return (got, pair.device.isBroken)
    }

    @Test(arguments: cases)
    func hostileChainIsRejectedIdenticallyBySplitAndPacked(_ c: Hostile) throws {
        let split = try Self.splitVerdict(c)
        let packed = try Self.packedVerdict(c)
        #expect(split.0 == .rejected(head: 0, c.expected))
        #expect(packed.0 == .rejected(head: 0, c.expected))
        // A malformed chain is that chain's problem: neither queue breaks.
        #expect(!split.1 && !packed.1)
    }

    // MARK: the in-flight table (driver side)

    /// Posts one request (16 readable, 32 writable bytes) on each driver, then has the
    /// device complete it with a forged (id, length).
    static func forgedCompletion(id: UInt16, length: UInt32) throws -> (split: Violation?, packed: Violation?) {
        let split = try RingPair(queueSize: 8)
        let r = try #require(split.pool.allocate(16))
        let w = try #require(split.pool.allocate(32))
        let head = try split.driver.add(
            [split.pool.segment(r, deviceWritable: false), split.pool.segment(w, deviceWritable: true)], token: 1)
        #expect(head == 0)
        _ = split.driver.publish()
        let a = RingAttacker(split)
        a.writeUsed(slot: 0, id: UInt32(id), length: length)
        a.setUsedIndex(1)
        var splitError: Violation?
        do { _ = try split.driver.nextCompletion() } catch { splitError = error }

        let packed = try PackedRingPair(queueSize: 8)
        let pr = try #require(packed.pool.allocate(16))
        let pw = try #require(packed.pool.allocate(32))
        let pid = try packed.driver.add(
            [packed.pool.segment(pr, deviceWritable: false), packed.pool.segment(pw, deviceWritable: true)], token: 1)
        #expect(pid == 0)
        _ = packed.driver.publish()
        packed.writeUsed(0, id: id, length: length)
        var packedError: Violation?
        do { _ = try packed.driver.nextCompletion() } catch { packedError = error }
        #expect(split.driver.violation == splitError && packed.driver.violation == packedError)
        return (splitError, packedError)
    }

    @Test(arguments: [
        (UInt16(9), UInt32(0), Violation.usedIdOutOfRange(id: 9, queueSize: 8)),
        (3, 0, .usedIdNotInFlight(id: 3)),
        (0, 33, .usedLengthTooLarge(id: 0, length: 33, writable: 32)),
    ])
    func forgedCompletionIsRefusedIdenticallyBySplitAndPacked(id: UInt16, length: UInt32, expected: Violation) throws {
        let got = try Self.forgedCompletion(id: id, length: length)
        #expect(got.split == expected)
        #expect(got.packed == expected)
    }

    @Test func honestCompletionPassesBothTables() throws {
        let got = try Self.forgedCompletion(id: 0, length: 32)
        #expect(got.split == nil && got.packed == nil)
    }

    // MARK: packed event suppression (both sides)

    /// The same garbage in the peer's event suppression area breaks the packed driver (on
    /// publish) and the packed device (on publishUsed) with the same violation.
    @Test(arguments: [
        (UInt16(3), UInt16(0), false),
        (PackedLayout.eventFlagDescriptor, 0, false),  // DESC without EVENT_IDX
        (PackedLayout.eventFlagDescriptor, 8, true),  // offset outside the ring
        (0xffff, 0x1234, true),
    ])
    func garbageEventAreaBreaksBothSidesAlike(flags: UInt16, offWrap: UInt16, eventIndex: Bool) throws {
        let expected = Violation.packedEventSuppressionInvalid(flags: flags, offWrap: offWrap, queueSize: 8)
        let pair = try PackedRingPair(queueSize: 8, features: RingFeatures(eventIndex: eventIndex))
        // The device's area, as the driver reads it.
        SharedAccess.store16(pair.deviceArea() + PackedLayout.eventOffWrap, offWrap)
        SharedAccess.store16(pair.deviceArea() + PackedLayout.eventFlags, flags)
        let s = try #require(pair.pool.allocate(8))
        try pair.driver.add([pair.pool.segment(s, deviceWritable: true)], token: 1)
        #expect(pair.driver.publish() == false)
        #expect(pair.driver.violation == expected)

        // The driver's area, as the device reads it (the interrupt is still sent).
        SharedAccess.store16(pair.driverArea() + PackedLayout.eventOffWrap, offWrap)
        SharedAccess.store16(pair.driverArea() + PackedLayout.eventFlags, flags)
        var chain = DescriptorChain()
        #expect(try pair.device.nextChain(into: &chain, memory: pair.memory) == .ready)
        pair.device.complete(head: chain.head, length: 8)
        #expect(pair.device.publishUsed() == true)
        #expect(pair.device.violation == expected)
    }
}

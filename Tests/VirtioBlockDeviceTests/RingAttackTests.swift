import SharedMemory
import Testing
import VhostUser
import VirtioBlock
import Virtqueue

/// A malicious driver on the data plane. Each test asserts the exact outcome (request
/// failed with used length 0, IOERR, or queue failed) and that the server then serves a
/// well-behaved front-end.
@Suite(.serialized) struct RingAttackTests {
    typealias F = TestFrontend
    static let next = SplitLayout.flagNext
    static let write = SplitLayout.flagWrite
    static let indirect = SplitLayout.flagIndirect

    /// Writes a read-request header and returns the guest address of the status byte.
    static func prepareHeader(_ f: TestFrontend, type: BlockProtocol.RequestType = .read, sector: UInt64 = 0) {
        let header = BlockProtocol.encodeHeader(type: type, sector: sector)
        for (i, b) in header.enumerated() { f.pointer(F.headerOffset + i).storeBytes(of: b, as: UInt8.self) }
    }

    /// A rejected chain completes with used length 0 and the status byte untouched; the
    /// same queue then serves a good request, and a new front-end works too.
    static func expectRejectedThenRecovered(
        _ fixture: BackendFixture, _ f: TestFrontend, sourceLocation: SourceLocation = #_sourceLocation
    ) throws {
        let used = try f.submitRaw()
        #expect(used.id == 0, sourceLocation: sourceLocation)
        #expect(used.length == 0, sourceLocation: sourceLocation)
        #expect(f.statusByte == F.statusSentinel, sourceLocation: sourceLocation)
        #expect(fixture.waitForEvent(containing: "request rejected"), sourceLocation: sourceLocation)
        let good = try f.blockRequest(type: .read, sector: 1, readLength: 512)
        #expect(good.status == 0 && good.data[0] == 1, "same queue still serves", sourceLocation: sourceLocation)
        try fixture.expectServesWellBehavedFrontend(after: f, sourceLocation: sourceLocation)
    }

    @Test func descriptorLoopIsRejected() throws {
        let fixture = try BackendFixture()
        defer { fixture.shutdown() }
        let f = try TestFrontend(path: fixture.socketPath)
        try f.setUp()
        Self.prepareHeader(f)
        f.writeDescriptor(0, address: F.guest(F.headerOffset), length: 16, flags: Self.next, next: 1)
        f.writeDescriptor(1, address: F.guest(F.dataOffset), length: 512, flags: Self.next, next: 0)
        try Self.expectRejectedThenRecovered(fixture, f)
        #expect(fixture.eventLog().contains { $0.contains("loop") })
    }

    /// An indirect table longer than seg_max + 2 (the longest chain the config allows).
    @Test func chainLongerThanAdvertisedLimitIsRejected() throws {
        let fixture = try BackendFixture()
        defer { fixture.shutdown() }
        let f = try TestFrontend(path: fixture.socketPath)
        try f.setUp(queueSize: 8)
        Self.prepareHeader(f)
        let table = 0x18000
        let entries = 300  // > 256 = seg_max 254 + 2
        for i in 0..<entries {
            f.writeDescriptor(
                i, address: F.guest(F.dataOffset + 16 * i), length: 16,
                flags: i == entries - 1 ? Self.write : Self.next | Self.write, next: UInt16(i + 1), table: table)
        }
        f.writeDescriptor(0, address: F.guest(table), length: UInt32(16 * entries), flags: Self.indirect)
        try Self.expectRejectedThenRecovered(fixture, f)
        #expect(fixture.eventLog().contains { $0.contains("indirect table length 4800") })
    }

    /// Linux sizes indirect tables by seg_max, not by the ring: a 20-entry table on an
    /// 8-entry ring is legitimate (found with a real guest, 191-entry tables on a 128 ring).
    @Test func indirectTableLongerThanRingWithinSegMaxIsServed() throws {
        let fixture = try BackendFixture()
        defer { fixture.shutdown() }
        let f = try TestFrontend(path: fixture.socketPath)
        try f.setUp(queueSize: 8)
        Self.prepareHeader(f, sector: 10)
        let table = 0x18000
        f.writeDescriptor(0, address: F.guest(F.headerOffset), length: 16, flags: Self.next, next: 1, table: table)
        for i in 1...18 {
            f.writeDescriptor(
                i, address: F.guest(F.dataOffset + 512 * (i - 1)), length: 512, flags: Self.next | Self.write,
                next: UInt16(i + 1), table: table)
        }
        f.writeDescriptor(19, address: F.guest(F.statusOffset), length: 1, flags: Self.write, table: table)
        f.writeDescriptor(0, address: F.guest(table), length: 16 * 20, flags: Self.indirect)
        let used = try f.submitRaw()
        #expect(used.length == 18 * 512 + 1 && f.statusByte == 0)
        for i in 0..<18 { #expect(f.pointer(F.dataOffset + 512 * i).load(as: UInt8.self) == UInt8(10 + i)) }
    }

    @Test(arguments: [
        (UInt64(0x4000_0000), UInt32(512)),  // outside every region
        (UInt64(0xffff_ffff_ffff_f000), UInt32(0x2000)),  // address + len wraps 2^64
        (TestFrontend.guest(TestFrontend.dataOffset), UInt32.max),  // len 0xffffffff
        (TestFrontend.guestBase + UInt64(TestFrontend.regionSize) - 256, UInt32(512)),  // runs off the end
    ])
    func badDescriptorAddressIsRejected(address: UInt64, length: UInt32) throws {
        let fixture = try BackendFixture()
        defer { fixture.shutdown() }
        let f = try TestFrontend(path: fixture.socketPath)
        try f.setUp()
        Self.prepareHeader(f)
        f.writeDescriptor(0, address: F.guest(F.headerOffset), length: 16, flags: Self.next, next: 1)
        f.writeDescriptor(1, address: address, length: length, flags: Self.next | Self.write, next: 2)
        f.writeDescriptor(2, address: F.guest(F.statusOffset), length: 1, flags: Self.write)
        try Self.expectRejectedThenRecovered(fixture, f)
    }

    @Test func zeroLengthHeaderGetsIOERR() throws {
        let fixture = try BackendFixture()
        defer { fixture.shutdown() }
        let f = try TestFrontend(path: fixture.socketPath)
        try f.setUp()
        Self.prepareHeader(f)
        f.writeDescriptor(0, address: F.guest(F.headerOffset), length: 0, flags: Self.next, next: 1)
        f.writeDescriptor(1, address: F.guest(F.dataOffset), length: 512, flags: Self.next | Self.write, next: 2)
        f.writeDescriptor(2, address: F.guest(F.statusOffset), length: 1, flags: Self.write)
        let used = try f.submitRaw()
        #expect(used.length == 1)
        #expect(f.statusByte == BlockProtocol.Status.ioError.rawValue)
        try fixture.expectServesWellBehavedFrontend(after: f)
    }

    @Test func headerInWritableDescriptorGetsIOERR() throws {
        let fixture = try BackendFixture()
        defer { fixture.shutdown() }
        let f = try TestFrontend(path: fixture.socketPath)
        try f.setUp()
        Self.prepareHeader(f)
        f.writeDescriptor(0, address: F.guest(F.headerOffset), length: 16, flags: Self.next | Self.write, next: 2)
        f.writeDescriptor(2, address: F.guest(F.statusOffset), length: 1, flags: Self.write)
        let used = try f.submitRaw()
        #expect(used.length == 1)
        #expect(f.statusByte == BlockProtocol.Status.ioError.rawValue)
    }

    @Test func chainWithoutStatusByteCompletesEmpty() throws {
        let fixture = try BackendFixture()
        defer { fixture.shutdown() }
        let f = try TestFrontend(path: fixture.socketPath)
        try f.setUp()
        Self.prepareHeader(f)
        f.writeDescriptor(0, address: F.guest(F.headerOffset), length: 16, flags: 0)
        let used = try f.submitRaw()
        #expect(used.length == 0)
        #expect(f.statusByte == F.statusSentinel)
        try fixture.expectServesWellBehavedFrontend(after: f)
    }

    @Test(arguments: ["self", "nested", "oddLength"])
    func badIndirectTableIsRejected(kind: String) throws {
        let fixture = try BackendFixture()
        defer { fixture.shutdown() }
        let f = try TestFrontend(path: fixture.socketPath)
        try f.setUp()
        Self.prepareHeader(f)
        switch kind {
        case "self":
            // The table's only entry is an indirect descriptor pointing at the table itself.
            f.writeDescriptor(
                0, address: F.guest(F.indirectOffset), length: 16, flags: Self.indirect, table: F.indirectOffset)
            f.writeDescriptor(0, address: F.guest(F.indirectOffset), length: 16, flags: Self.indirect)
        case "nested":
            f.writeDescriptor(
                0, address: F.guest(F.headerOffset), length: 16, flags: Self.next, next: 1, table: F.indirectOffset)
            f.writeDescriptor(
                1, address: F.guest(F.indirectOffset + 0x400), length: 32, flags: Self.indirect, table: F.indirectOffset
            )
            f.writeDescriptor(0, address: F.guest(F.indirectOffset), length: 32, flags: Self.indirect)
        default:
            f.writeDescriptor(0, address: F.guest(F.indirectOffset), length: 24, flags: Self.indirect)
        }
        try Self.expectRejectedThenRecovered(fixture, f)
    }

    /// Rule R6: ring-level lies break the queue (err fd signalled, nothing completed);
    /// the connection still answers, and a new front-end is served.
    @Test(arguments: ["availIdxJump", "availEntryOutOfRange"])
    func ringIndexAttackFailsQueue(kind: String) throws {
        let fixture = try BackendFixture()
        defer { fixture.shutdown() }
        let f = try TestFrontend(path: fixture.socketPath)
        try f.setUp(queueSize: 8)
        Self.prepareHeader(f)
        f.writeDescriptor(0, address: F.guest(F.headerOffset), length: 16, flags: Self.next, next: 2)
        f.writeDescriptor(2, address: F.guest(F.statusOffset), length: 1, flags: Self.write)
        if kind == "availIdxJump" {
            f.publish(head: 0, advance: 9)
        } else {
            f.publish(head: 8)
        }
        #expect(f.err.wait(until: .after(seconds: 3)) > 0, "err fd signalled")
        #expect(fixture.waitForEvent(containing: "queue 0 failed"))
        #expect(f.waitUsed(seconds: 0.3) == nil)
        // GET_VRING_BASE still answers on the same connection.
        let base = try VringState.decode(try f.query(.getVringBase, VringState(index: 0, num: 0).encoded))
        #expect(base.index == 0)
        try fixture.expectServesWellBehavedFrontend(after: f)
    }

    @Test func readBeyondCapacityGetsIOERR() throws {
        let fixture = try BackendFixture()
        defer { fixture.shutdown() }
        let f = try TestFrontend(path: fixture.socketPath)
        try f.setUp()
        let sectors = UInt64(BackendFixture.imageSize / 512)
        for sector in [sectors - 1, sectors, UInt64.max, UInt64.max / 512] {
            let r = try f.blockRequest(type: .read, sector: sector, readLength: 1024)
            #expect(r.status == BlockProtocol.Status.ioError.rawValue, "sector \(sector)")
            #expect(r.usedLength == 1)
        }
        let partial = try f.blockRequest(type: .read, sector: 0, readLength: 100)
        #expect(partial.status == BlockProtocol.Status.ioError.rawValue, "not whole sectors")
    }

    @Test func writeToReadOnlyDeviceGetsIOERR() throws {
        let fixture = try BackendFixture(readOnly: true)
        defer { fixture.shutdown() }
        let f = try TestFrontend(path: fixture.socketPath)
        try f.setUp()
        let before = try fixture.imageBytes(at: 4096, count: 512)
        let w = try f.blockRequest(type: .write, sector: 8, data: [UInt8](repeating: 0xEE, count: 512))
        #expect(w.status == BlockProtocol.Status.ioError.rawValue)
        #expect(try fixture.imageBytes(at: 4096, count: 512) == before)
        let r = try f.blockRequest(type: .read, sector: 8, readLength: 512)
        #expect(r.status == 0 && r.data == before)
    }

    @Test func unknownRequestTypeIsUnsupported() throws {
        let fixture = try BackendFixture()
        defer { fixture.shutdown() }
        let f = try TestFrontend(path: fixture.socketPath)
        try f.setUp()
        Self.prepareHeader(f)
        f.pointer(F.headerOffset).storeBytes(of: UInt32(0xdead), as: UInt32.self)
        f.writeDescriptor(0, address: F.guest(F.headerOffset), length: 16, flags: Self.next, next: 2)
        f.writeDescriptor(2, address: F.guest(F.statusOffset), length: 1, flags: Self.write)
        let used = try f.submitRaw()
        #expect(used.length == 1)
        #expect(f.statusByte == BlockProtocol.Status.unsupported.rawValue)
    }

    @Test func discardAndWriteZeroesCheckEveryRange() throws {
        let fixture = try BackendFixture()
        defer { fixture.shutdown() }
        let f = try TestFrontend(path: fixture.socketPath)
        try f.setUp()
        let pattern = [UInt8](repeating: 0x5C, count: 8192)
        #expect(try f.blockRequest(type: .write, sector: 100, data: pattern).status == 0)
        let discard = BlockProtocol.encodeRange(sector: 100, sectors: 8, unmap: false)
        #expect(try f.blockRequest(type: .discard, sector: 0, data: discard).status == 0)
        #expect(try fixture.imageBytes(at: 100 * 512, count: 4096) == [UInt8](repeating: 0, count: 4096))
        let zero = BlockProtocol.encodeRange(sector: 108, sectors: 8, unmap: true)
        #expect(try f.blockRequest(type: .writeZeroes, sector: 0, data: zero).status == 0)
        #expect(try fixture.imageBytes(at: 108 * 512, count: 4096) == [UInt8](repeating: 0, count: 4096))
        // Out of range, flags on discard, and a ragged payload.
        let sectors = UInt32(BackendFixture.imageSize / 512)
        let outside = BlockProtocol.encodeRange(sector: UInt64(sectors) - 1, sectors: 2, unmap: false)
        #expect(try f.blockRequest(type: .discard, sector: 0, data: outside).status == 1)
        let flagged = BlockProtocol.encodeRange(sector: 0, sectors: 1, unmap: true)
        #expect(try f.blockRequest(type: .discard, sector: 0, data: flagged).status == 2)
        #expect(try f.blockRequest(type: .writeZeroes, sector: 0, data: [1, 2, 3]).status == 1)
        let tooMany = [UInt8]((0..<17).flatMap { _ in BlockProtocol.encodeRange(sector: 0, sectors: 1, unmap: false) })
        #expect(try f.blockRequest(type: .discard, sector: 0, data: tooMany).status == 1)
    }

    @Test func getIDAndFlushAnswer() throws {
        let fixture = try BackendFixture()
        defer { fixture.shutdown() }
        let f = try TestFrontend(path: fixture.socketPath)
        try f.setUp()
        let id = try f.blockRequest(type: .getID, sector: 0, readLength: 20)
        #expect(id.status == 0 && id.usedLength == 21)
        #expect(Array(id.data.prefix(9)) == Array("ringfence".utf8))
        let shortID = try f.blockRequest(type: .getID, sector: 0, readLength: 4)
        #expect(shortID.status == 0 && shortID.usedLength == 5)
        #expect(try f.blockRequest(type: .flush, sector: 0).status == 0)
    }

    /// QEMU splits guest RAM into regions; a buffer may straddle two adjacent ones.
    @Test func bufferStraddlingAdjacentRegionsIsServed() throws {
        let fixture = try BackendFixture()
        defer { fixture.shutdown() }
        let f = try TestFrontend(path: fixture.socketPath)
        let half = UInt64(TestFrontend.regionSize / 2)
        try f.setUp(regions: [
            (F.guestBase, half, F.userBase, 0),
            (F.guestBase + half, half, F.userBase + half, half),
        ])
        let at = Int(half) - 1024  // 4 KiB buffer, 1 KiB in the first region
        let pattern = (0..<4096).map { UInt8(truncatingIfNeeded: $0 * 13 + 1) }
        #expect(try f.blockRequest(type: .write, sector: 200, data: pattern, dataOffset: at).status == 0)
        #expect(try fixture.imageBytes(at: 200 * 512, count: 4096) == pattern)
        f.pointer(at).initializeMemory(as: UInt8.self, repeating: 0, count: 4096)
        let r = try f.blockRequest(type: .read, sector: 200, readLength: 4096, dataOffset: at)
        #expect(r.status == 0 && r.data == pattern)
    }
}

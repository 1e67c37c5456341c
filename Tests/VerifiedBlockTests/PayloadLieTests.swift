import Foundation
import Testing

@testable import VerifiedBlock

/// A fresh memory disk, key and anchor file for one test.
final class Bed {
    let transport: MemoryTransport
    let key: [UInt8]
    let anchor: String

    init(capacity: Int = 1 << 20) {
        transport = MemoryTransport(capacity: capacity)
        key = (0..<32).map { UInt8($0 &* 7 &+ 1) }
        anchor = NSTemporaryDirectory() + "vb-anchor-\(UUID().uuidString)"
    }

    deinit { try? FileManager.default.removeItem(atPath: anchor) }

    func format() throws -> VerifiedBlockDevice {
        try VerifiedBlockDevice.format(transport: transport, key: key, anchorPath: anchor)
    }

    func open() throws -> VerifiedBlockDevice {
        try VerifiedBlockDevice.open(transport: transport, key: key, anchorPath: anchor)
    }
}

func block(_ seed: UInt8, count: Int = 1) -> [UInt8] {
    (0..<(4096 * count)).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ Int(seed) &* 101) }
}

/// Runs `body` and returns the `VerifiedBlockError` it threw (nil if none).
func failure(_ body: () throws -> Void) -> VerifiedBlockError? {
    do {
        try body()
        return nil
    } catch let e as VerifiedBlockError {
        return e
    } catch {
        return .local("unexpected \(error)")
    }
}

extension VerifiedBlockDevice {
    func liveSlotOffset(_ b: UInt64) -> UInt64 { layout.slotOffset(block: b, slot: Int(slots[Int(b)])) }
    func otherSlotOffset(_ b: UInt64) -> UInt64 { layout.slotOffset(block: b, slot: 1 - Int(slots[Int(b)])) }
}

@Suite("VerifiedBlock: every payload lie is a typed violation")
struct PayloadLieTests {
    @Test func roundTripAndReopen() throws {
        let bed = Bed()
        let d = try bed.format()
        #expect(d.blocks == 113)
        try d.write(block: 3, bytes: block(1, count: 3))
        #expect(try d.read(block: 3, count: 3) == block(1, count: 3))
        #expect(try d.read(block: 0, count: 1) == [UInt8](repeating: 0, count: 4096))
        try d.write(block: 4, bytes: block(2))
        try d.flush()
        let again = try bed.open()
        #expect(try again.read(block: 3, count: 1) == Array(block(1, count: 3)[0..<4096]))
        #expect(try again.read(block: 4, count: 1) == block(2))
        #expect(again.rootHash == d.rootHash)
    }

    @Test func flippedBitIsTagMismatch() throws {
        let bed = Bed()
        let d = try bed.format()
        try d.write(block: 7, bytes: block(3))
        let target = d.liveSlotOffset(7)
        bed.transport.onRead = { offset, buffer in
            if offset == target { buffer[100] ^= 0x10 }
        }
        var out = [UInt8](repeating: 0xaa, count: 4096)
        let e = failure {
            try out.withUnsafeMutableBytes { b in try d.read(block: 7, into: b) }
        }
        #expect(e == .violation(.tagMismatch(block: 7)))
        #expect(out == [UInt8](repeating: 0, count: 4096), "no unverified byte reaches the caller")
        // Broken (R6): the first violation is thrown by every later call.
        #expect(failure { _ = try d.read(block: 0, count: 1) } == .violation(.tagMismatch(block: 7)))
        #expect(failure { try d.write(block: 1, bytes: block(1)) } == .violation(.tagMismatch(block: 7)))
    }

    @Test func anotherBlocksDataIsWrongBlock() throws {
        let bed = Bed()
        let d = try bed.format()
        try d.write(block: 3, bytes: block(3))
        try d.write(block: 5, bytes: block(5))
        let target = d.liveSlotOffset(3)
        let source = Int(d.liveSlotOffset(5))
        bed.transport.onRead = { [bytes = bed.transport.bytes] offset, buffer in
            if offset == target { buffer.copyBytes(from: bytes[source..<source + buffer.count]) }
        }
        #expect(failure { _ = try d.read(block: 3, count: 1) } == .violation(.wrongBlock(block: 3, got: 5)))
    }

    @Test func olderVersionIsStale() throws {
        let bed = Bed()
        let d = try bed.format()
        try d.write(block: 2, bytes: block(1))
        let old = d.versions[2]
        try d.flush()
        try d.write(block: 2, bytes: block(2))
        let current = d.versions[2]
        let target = d.liveSlotOffset(2)
        let source = Int(d.otherSlotOffset(2))
        bed.transport.onRead = { [bytes = bed.transport.bytes] offset, buffer in
            if offset == target { buffer.copyBytes(from: bytes[source..<source + buffer.count]) }
        }
        #expect(
            failure { _ = try d.read(block: 2, count: 1) }
                == .violation(.staleVersion(block: 2, expected: current, got: old)))
    }

    @Test func writeAcknowledgedButNotStored() throws {
        let bed = Bed()
        let d = try bed.format()
        let dropped = d.layout.slotOffset(block: 4, slot: 0)
        bed.transport.onWrite = { offset, _ in offset != dropped }
        try d.write(block: 4, bytes: block(4))
        #expect(
            failure { _ = try d.read(block: 4, count: 1) }
                == .violation(.writeNotStored(block: 4, version: d.versions[4])))
    }

    @Test func tornMultiBlockWrite() throws {
        let bed = Bed()
        let d = try bed.format()
        let dropped = d.layout.slotOffset(block: 10, slot: 0)
        bed.transport.onWrite = { offset, _ in offset != dropped }
        try d.write(block: 8, bytes: block(8, count: 4))
        #expect(
            failure { _ = try d.read(block: 8, count: 4) }
                == .violation(.tornWrite(firstBlock: 8, blocks: 4, missing: 10)))
    }

    @Test func wholeDeviceRolledBackToSnapshot() throws {
        let bed = Bed()
        let d = try bed.format()
        try d.write(block: 1, bytes: block(1))
        try d.flush()
        let snapshot = bed.transport.bytes
        try d.write(block: 1, bytes: block(2))
        try d.write(block: 9, bytes: block(9))
        try d.flush()
        let anchored = d.versions[9]
        bed.transport.bytes = snapshot
        let seen = d.versions[1] - 1  // the snapshot's version of block 1 (the first write)
        #expect(
            failure { _ = try bed.open() }
                == .violation(.rolledBackRoot(anchoredVersion: anchored, deviceVersion: seen)))
    }

    @Test func alteredRecordIsRootMismatch() throws {
        let bed = Bed()
        let d = try bed.format()
        try d.write(block: 6, bytes: block(6))
        try d.flush()
        let tagByte = Int(d.liveSlotOffset(6)) + 4096 + 40
        bed.transport.bytes[tagByte] ^= 1
        #expect(failure { _ = try bed.open() } == .violation(.rootMismatch))
    }

    @Test func anotherDevicesAnchorIsDeviceMismatch() throws {
        let a = Bed()
        _ = try a.format()
        let b = Bed()
        _ = try b.format()
        let e = failure { _ = try VerifiedBlockDevice.open(transport: a.transport, key: a.key, anchorPath: b.anchor) }
        guard case .violation(.deviceMismatch) = e else {
            Issue.record("expected deviceMismatch, got \(String(describing: e))")
            return
        }
    }

    @Test func wrongKeyIsTagMismatch() throws {
        let bed = Bed()
        let d = try bed.format()
        try d.write(block: 0, bytes: block(0))
        try d.flush()
        let other = try VerifiedBlockDevice.open(
            transport: bed.transport, key: [UInt8](repeating: 9, count: 32), anchorPath: bed.anchor)
        #expect(failure { _ = try other.read(block: 0, count: 1) } == .violation(.tagMismatch(block: 0)))
    }

    @Test func outOfRangeIsRefusedLocally() throws {
        let d = try Bed().format()
        guard case .invalidRequest = failure({ _ = try d.read(block: d.blocks, count: 1) }) else {
            Issue.record("expected a local refusal")
            return
        }
        #expect(!d.isBroken)
    }
}

@Suite("VerifiedBlock: random access and the bench")
struct RandomAccessTests {
    @Test func scatteredBlocksRoundTrip() throws {
        let bed = Bed()
        let d = try bed.format()
        let list: [UInt64] = [90, 3, 57, 4]
        let data = list.flatMap { block(UInt8(truncatingIfNeeded: $0)) }
        try data.withUnsafeBytes { try d.write(blocks: list, from: $0) }
        var back = [UInt8](repeating: 0, count: data.count)
        try back.withUnsafeMutableBytes { try d.read(blocks: list.reversed(), into: $0) }
        #expect(back == list.reversed().flatMap { block(UInt8(truncatingIfNeeded: $0)) })
        let twice = failure { try data.withUnsafeBytes { try d.write(blocks: [1, 2, 1, 3], from: $0) } }
        #expect(twice == .invalidRequest("a block appears twice in one write"))
        #expect(!d.isBroken)
    }

    /// A healthy read moves the data only (the tag is in memory); the record is fetched
    /// only after a failed check, to name the lie.
    @Test func healthyReadTransfersTheDataOnly() throws {
        let bed = Bed()
        let d = try bed.format()
        try d.write(block: 5, bytes: block(5))
        var sizes: [Int] = []
        bed.transport.onRead = { _, buffer in sizes.append(buffer.count) }
        _ = try d.read(block: 5, count: 1)
        #expect(sizes == [4096])
        let target = d.liveSlotOffset(5)
        bed.transport.onRead = { offset, buffer in
            sizes.append(buffer.count)
            if offset == target { buffer[9] ^= 1 }
        }
        sizes = []
        #expect(failure { _ = try d.read(block: 5, count: 1) } == .violation(.tagMismatch(block: 5)))
        #expect(sizes == [4096, 4608])
    }

    @Test func benchLeavesTheDeviceIntact() throws {
        let bed = Bed()
        let d = try bed.format()
        try d.write(block: 0, bytes: block(9, count: 8))
        try d.flush()
        for pattern in [VerifiedBench.Pattern.write, .read] {
            let r = VerifiedBench(pattern: pattern, depth: 4, seconds: 0.05).run(d)
            #expect(r.verified.errors == 0 && r.plain.errors == 0 && r.aeadFloor.errors == 0)
            #expect(r.verified.requests > 0 && r.plain.requests > 0 && r.aeadFloor.requests > 0)
        }
        try d.flush()
        let again = try bed.open()
        for b in 0..<again.blocks { _ = try again.read(block: b, count: 1) }
    }
}

/// A back-end that announces an absurd capacity (R4/R5: no unbounded allocation).
final class HugeTransport: BlockTransport {
    let inner = MemoryTransport(capacity: 1 << 20)
    var capacityBytes: UInt64 { 1 << 62 }
    func transfer(_ requests: [TransportRequest]) throws(TransportError) {
        for r in requests where r.offset >= 1 << 20 {
            throw TransportError(rule: nil, "beyond the test's memory")
        }
        try inner.transfer(requests)
    }
    func flushWrites() throws(TransportError) {}
}

@Suite("VerifiedBlock: sizes the back-end announces")
struct AnnouncedSizeTests {
    @Test func absurdCapacityIsCappedAtFormat() throws {
        var options = VerifiedBlockDevice.Options()
        options.maxBlocks = 64
        let anchor = NSTemporaryDirectory() + "vb-huge-\(UUID().uuidString)"
        defer { try? FileManager.default.removeItem(atPath: anchor) }
        let d = try VerifiedBlockDevice.format(
            transport: HugeTransport(), key: [UInt8](repeating: 1, count: 32), anchorPath: anchor, options: options)
        #expect(d.blocks == 64)
        try d.write(block: 63, bytes: block(63))
        #expect(try d.read(block: 63, count: 1) == block(63))
    }
}

import BlockBench
import BlockImage
import Foundation
import RingTestSupport
import SharedMemory
import Testing
@testable import XenRing

/// The blkif backend on the shared file-backed disk (`DeviceImage`, the one virtio-blk
/// serves): data round-trips, and a discard punches a hole that reads back as zeros.
@Suite struct FileImageBackendTests {
    @Test func backendServesDeviceImageAndDiscardReadsZeros() throws {
        let path = NSTemporaryDirectory() + "rf-xen-image-\(getpid()).img"
        defer { try? FileManager.default.removeItem(atPath: path) }
        try Data(repeating: 0x5a, count: 1 << 20).write(to: URL(fileURLWithPath: path))
        let image = try DeviceImage(path: path)
        #expect(image.sectorCount == 2048)
        let (a, b) = try UnixChannel.pair()
        let box = UnsafeSendable(b)
        let thread = TestThread {
            if let c = try? XenBlkBackendConnection.accept(channel: box.value, storage: image) {
                _ = c.run(idleTimeout: 5)
            }
        }
        let device = try XenBlkFrontendDevice.connect(channel: a)
        let data = (0..<8192).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        try data.withUnsafeBytes { try device.write(sector: 16, from: $0) }
        var back = [UInt8](repeating: 0, count: 8192)
        try back.withUnsafeMutableBytes { try device.read(sector: 16, into: $0) }
        #expect(back == data)
        try device.discard(sector: 16, sectors: 16)
        try back.withUnsafeMutableBytes { try device.read(sector: 16, into: $0) }
        #expect(back == [UInt8](repeating: 0, count: 8192))
        device.disconnect()
        thread.join()
    }
}

/// The library's benchmark loop (`BlockBench`, what `xen-blk bench` runs) on an
/// in-process backend: requests complete, none fail.
@Suite struct XenBlkBenchTests {
    @Test(arguments: [BlockBenchPattern.read, .write, .randrw])
    func benchmarkLoopCompletesWithoutErrors(pattern: BlockBenchPattern) throws {
        let (device, backend) = try connectedPair(sectors: 4096)
        let r = BlockBench(pattern: pattern, blockSize: 4096, depth: 16, seconds: 0.1, blocks: 512).run(device)
        #expect(r.requests > 0 && r.errors == 0 && r.firstError == nil)
        #expect(r.bytes == r.requests * 4096)
        device.disconnect()
        backend.join()
    }
}

/// A multi-segment write is served as one vectored write (`BlockStorage.write(sector:
/// vectors:)`; `DeviceImage`: one `pwritev`): VerifiedBlock's 4608-byte slot (a page and
/// a 512-byte piece) lands whole at an unaligned offset, and a request whose second grant
/// is bad writes nothing (every grant is mapped before any byte is written).
@Suite struct VectoredWriteTests {
    @Test func twoSegmentWriteLandsWholeAtAnUnalignedOffset() throws {
        let path = NSTemporaryDirectory() + "rf-xen-vector-\(getpid()).img"
        defer { try? FileManager.default.removeItem(atPath: path) }
        try Data(repeating: 0x5a, count: 1 << 20).write(to: URL(fileURLWithPath: path))
        let image = try DeviceImage(path: path)
        let (a, b) = try UnixChannel.pair()
        let box = UnsafeSendable(b)
        let thread = TestThread {
            if let c = try? XenBlkBackendConnection.accept(channel: box.value, storage: image) {
                _ = c.run(idleTimeout: 5)
            }
        }
        let device = try XenBlkFrontendDevice.connect(channel: a)
        for (sector, count) in [(9, 4608), (33, 11 * 4096 - 512)] {
            let data = (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ sector) }
            try data.withUnsafeBytes { try device.write(sector: UInt64(sector), from: $0) }
            var back = [UInt8](repeating: 0, count: count)
            try back.withUnsafeMutableBytes { try device.read(sector: UInt64(sector), into: $0) }
            let readBack = back == data
            #expect(readBack, "read back through the ring at sector \(sector)")
            let file = try Data(contentsOf: URL(fileURLWithPath: path))
            let inFile = [UInt8](file[(sector * 512)..<(sector * 512 + count)]) == data
            #expect(inFile, "in the image file at sector \(sector)")
            #expect(file[sector * 512 - 1] == 0x5a && file[sector * 512 + count] == 0x5a, "nothing around it")
        }
        device.disconnect()
        thread.join()
    }

    @Test func aBadSecondGrantWritesNothing() throws {
        let p = try XenPair()
        p.grantByHand(ref: 20, frame: 5, flags: GrantLayout.permitAccess | GrantLayout.readOnly)
        p.memory.page(5).initializeMemory(as: UInt8.self, repeating: 0xcd, count: 4096)
        let status = try BackendRequestAttackTests.serveOne(
            p, operation: BackendRequestAttackTests.write, sector: 8, segments: [(20, 0, 7), (21, 0, 0)])
        #expect(status == BlkStatus.error.rawValue)
        #expect(p.back.lastRejection == .xenGrantNotGranted(ref: 21, flags: 0))
        p.storage.withBytes { #expect($0[(8 * 512)..<(17 * 512)].allSatisfy { $0 == 0 }) }
        #expect(p.grantFlags(20) == GrantLayout.permitAccess | GrantLayout.readOnly, "unmapped again")
        // The same request with both grants valid lands whole.
        p.grantByHand(ref: 21, frame: 6, flags: GrantLayout.permitAccess | GrantLayout.readOnly)
        p.memory.page(6).initializeMemory(as: UInt8.self, repeating: 0xef, count: 4096)
        let ok = try BackendRequestAttackTests.serveOne(
            p, operation: BackendRequestAttackTests.write, id: 4, sector: 8, segments: [(20, 0, 7), (21, 0, 0)])
        #expect(ok == BlkStatus.okay.rawValue)
        p.storage.withBytes {
            #expect($0[(8 * 512)..<(16 * 512)].allSatisfy { $0 == 0xcd })
            #expect($0[(16 * 512)..<(17 * 512)].allSatisfy { $0 == 0xef })
            #expect($0[17 * 512] == 0)
        }
    }
}

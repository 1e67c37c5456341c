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

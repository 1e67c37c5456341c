import BlockImage
import Foundation
import Testing
@testable import VirtioBlock
@testable import Virtqueue

/// Data moves with preadv/pwritev in batches of IOV_MAX pieces: more pieces than one call
/// takes, odd piece sizes, and reads past the end of the file.
@Suite struct VectoredTransferTests {
    @Test func moreSegmentsThanIOVMaxRoundTrip() throws {
        let path = NSTemporaryDirectory() + "rf-vec-\(getpid()).img"
        defer { try? FileManager.default.removeItem(atPath: path) }
        try Data(count: 2 << 20).write(to: URL(fileURLWithPath: path))
        let device = VirtioBlockDevice(image: try DeviceImage(path: path), options: VirtioBlockDeviceOptions())
        let handler = try #require(device.makeQueueHandler(queue: 0, features: 0) as? BlockRequestHandler)
        let pieces = 1500
        let sizes = (0..<pieces).map { 1 + ($0 * 37) % 1000 }
        let total = sizes.reduce(0, +)
        let memory = UnsafeMutableRawBufferPointer.allocate(byteCount: total, alignment: 64)
        defer { memory.deallocate() }
        for i in 0..<total { memory[i] = UInt8(truncatingIfNeeded: i &* 31 &+ 7) }
        var segments: [ChainSegment] = []
        var o = 0
        for n in sizes {
            segments.append(
                ChainSegment(
                    buffer: UnsafeMutableRawBufferPointer(rebasing: memory[o..<o + n]), guestAddress: 0,
                    deviceWritable: true))
            o += n
        }
        #expect(handler.transfer(segments[...], from: 0, count: UInt64(total), fileOffset: 4096, write: true))
        let file = try Data(contentsOf: URL(fileURLWithPath: path))
        #expect(Array(file[4096..<4096 + total]) == Array(memory))
        memory.initializeMemory(as: UInt8.self, repeating: 0)
        #expect(handler.transfer(segments[...], from: 0, count: UInt64(total), fileOffset: 4096, write: false))
        #expect(Array(memory) == Array(file[4096..<4096 + total]))
        // Past the end of the file: the rest reads as zeros.
        memory.initializeMemory(as: UInt8.self, repeating: 0xFF)
        #expect(
            handler.transfer(
                segments[...], from: 0, count: UInt64(total), fileOffset: UInt64(2 << 20) - 1000, write: false))
        #expect(memory[1000..<total].allSatisfy { $0 == 0 })
        // An offset into the chain (as a write skips its 16-byte header).
        #expect(handler.transfer(segments[...], from: 16, count: 512, fileOffset: 0, write: true))
    }
}

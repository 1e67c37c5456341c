import BlockImage
import Foundation
import Testing

/// A flush skips fdatasync only when nothing was modified since the last one: every
/// write path marks the image dirty, and a fresh image starts dirty (writes a previous
/// server completed may still be only in the page cache).
@Suite struct ImageFlushTests {
    @Test func everyModificationMarksTheImageForTheNextFlush() throws {
        let path = NSTemporaryDirectory() + "rf-flush-\(getpid()).img"
        defer { try? FileManager.default.removeItem(atPath: path) }
        try Data(count: 1 << 20).write(to: URL(fileURLWithPath: path))
        let image = try DeviceImage(path: path)
        #expect(image.isDirty, "a fresh image's first flush syncs")
        #expect(image.flush())
        #expect(!image.isDirty)
        #expect(image.flush(), "a clean flush succeeds without syncing")

        let bytes = [UInt8](repeating: 0x5a, count: 4096)
        #expect(bytes.withUnsafeBytes { image.write(from: $0, at: 0) })
        #expect(image.isDirty, "pwrite")
        #expect(image.flush())

        var buffer = [UInt8](repeating: 0, count: 4096)
        buffer.withUnsafeMutableBytes { b in
            var v = iovec(iov_base: b.baseAddress, iov_len: b.count)
            withUnsafeMutablePointer(to: &v) { p in
                #expect(image.transfer(UnsafeMutableBufferPointer(start: p, count: 1), at: 0, write: false))
            }
        }
        #expect(!image.isDirty, "a read leaves the image clean")
        buffer.withUnsafeMutableBytes { b in
            var v = iovec(iov_base: b.baseAddress, iov_len: b.count)
            withUnsafeMutablePointer(to: &v) { p in
                #expect(image.transfer(UnsafeMutableBufferPointer(start: p, count: 1), at: 8192, write: true))
            }
        }
        #expect(image.isDirty, "pwritev")
        #expect(image.flush())

        #expect(image.punchHole(at: 0, length: 4096))
        #expect(image.isDirty, "fallocate")
        #expect(image.flush())
        #expect(image.writeZeroes(at: 4096, length: 4096, mayUnmap: false))
        #expect(image.isDirty, "write zeroes")
        #expect(image.flush())
        #expect(!image.isDirty)
    }
}

import BlockImage
import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// The one file-backed disk both device sides serve: a discard really gives the blocks
/// back (PUNCH_HOLE | KEEP_SIZE), the size stays, and the range reads as zeros.
@Suite struct DeviceImageTests {
    static func allocatedBlocks(_ path: String) -> Int {
        var st = stat()
        return stat(path, &st) == 0 ? Int(st.st_blocks) : -1
    }

    @Test func discardPunchesAHoleAndReadsZeros() throws {
        let path = NSTemporaryDirectory() + "rf-discard-\(getpid()).img"
        defer { try? FileManager.default.removeItem(atPath: path) }
        try Data(repeating: 0xa5, count: 1 << 20).write(to: URL(fileURLWithPath: path))
        let image = try DeviceImage(path: path)
        let before = Self.allocatedBlocks(path)
        #expect(image.discard(at: 0, length: 512 << 10))
        #expect(image.size == 1 << 20, "KEEP_SIZE")
        var back = [UInt8](repeating: 1, count: 4096)
        #expect(back.withUnsafeMutableBytes { image.read(into: $0, at: 64 << 10) })
        #expect(back == [UInt8](repeating: 0, count: 4096))
        #expect(back.withUnsafeMutableBytes { image.read(into: $0, at: 600 << 10) })
        #expect(back == [UInt8](repeating: 0xa5, count: 4096), "outside the range untouched")
        // Only where the file system can punch (tmpfs, ext4, xfs do); elsewhere zero-filled.
        if before > 0 { #expect(Self.allocatedBlocks(path) < before) }
    }

    @Test func readPastTheEndGivesZeros() throws {
        let path = NSTemporaryDirectory() + "rf-short-\(getpid()).img"
        defer { try? FileManager.default.removeItem(atPath: path) }
        try Data(repeating: 7, count: 1024).write(to: URL(fileURLWithPath: path))
        let image = try DeviceImage(path: path)
        var back = [UInt8](repeating: 1, count: 2048)
        #expect(back.withUnsafeMutableBytes { image.read(into: $0, at: 0) })
        #expect(back == [UInt8](repeating: 7, count: 1024) + [UInt8](repeating: 0, count: 1024))
    }
}

import Foundation
import Testing

@testable import VerifiedBlock

/// The read-only verity mode: sealed image, root hash from the command line, no key.
@Suite("VerifiedBlock: verity mode")
struct VerityTests {
    /// A sealed image of `dataBytes` pseudo-random bytes in memory, and its root hash.
    func sealed(dataBytes: Int) throws -> (MemoryTransport, [UInt8], String) {
        let path = NSTemporaryDirectory() + "verity-\(UUID().uuidString).img"
        let data = Data((0..<dataBytes).map { UInt8(truncatingIfNeeded: $0 &* 2_654_435_761 >> 7) })
        #expect(FileManager.default.createFile(atPath: path, contents: data))
        let (root, layout) = try VerityDevice.seal(path: path)
        let bytes = try #require(FileManager.default.contents(atPath: path))
        #expect(UInt64(bytes.count) == layout.totalBytes)
        let t = MemoryTransport(capacity: bytes.count)
        t.bytes = [UInt8](bytes)
        return (t, root, path)
    }

    @Test func sealedImageReadsBackVerified() throws {
        let (t, root, path) = try sealed(dataBytes: 600 * 4096 + 100)
        defer { try? FileManager.default.removeItem(atPath: path) }
        let d = try VerityDevice(transport: t, rootHash: root)
        #expect(d.blocks == 601)
        #expect(d.layout.levelBlocks == [5, 1])
        let back = try d.read(block: 0, count: 601)
        #expect(Array(back[0..<100]) == Array(t.bytes[0..<100]))
        #expect(back[600 * 4096 + 100] == 0)  // padding
        // The same through a file.
        let f = try VerityDevice(transport: try FileTransport(path: path), rootHash: root)
        #expect(try f.read(block: 599, count: 2) == Array(back[(599 * 4096)...]))
    }

    @Test func flippedDataByteIsHashMismatch() throws {
        let (t, root, path) = try sealed(dataBytes: 300 * 4096)
        defer { try? FileManager.default.removeItem(atPath: path) }
        let d = try VerityDevice(transport: t, rootHash: root)
        t.onRead = { offset, buffer in if offset == 131 * 4096 { buffer[7] ^= 1 } }
        var out = [UInt8](repeating: 0xee, count: 4 * 4096)
        let e = failure { try out.withUnsafeMutableBytes { try d.read(block: 130, into: $0) } }
        #expect(e == .violation(.hashMismatch(level: 0, block: 131)))
        #expect(out == [UInt8](repeating: 0, count: 4 * 4096))
        #expect(failure { _ = try d.read(block: 0, count: 1) } == e)
    }

    @Test func alteredHashBlockIsCaughtByItsParent() throws {
        let (t, root, path) = try sealed(dataBytes: 300 * 4096)
        defer { try? FileManager.default.removeItem(atPath: path) }
        let d = try VerityDevice(transport: t, rootHash: root)
        let leafBlock = d.layout.hashBlockOffset(level: 0, index: 2)
        t.onRead = { offset, buffer in if offset == leafBlock { buffer[0] ^= 0x80 } }
        #expect(failure { _ = try d.read(block: 257, count: 1) } == .violation(.hashMismatch(level: 1, block: 2)))
    }

    @Test func wrongRootHashOrSizeIsRootMismatch() throws {
        let (t, root, path) = try sealed(dataBytes: 10 * 4096)
        defer { try? FileManager.default.removeItem(atPath: path) }
        var other = root
        other[0] ^= 1
        #expect(failure { _ = try VerityDevice(transport: t, rootHash: other) } == .violation(.rootHashMismatch))
        // A back-end that claims a smaller image (the trailer) fails the root too.
        let trailer = Int(t.bytes.count - 4096)
        t.bytes[trailer + 8] = 9
        #expect(failure { _ = try VerityDevice(transport: t, rootHash: root) } == .violation(.rootHashMismatch))
    }

    @Test func hashBlocksAreVerifiedOncePerPath() throws {
        let (t, root, path) = try sealed(dataBytes: 300 * 4096)
        defer { try? FileManager.default.removeItem(atPath: path) }
        let d = try VerityDevice(transport: t, rootHash: root)
        _ = try d.read(block: 0, count: 1)
        let before = t.reads
        _ = try d.read(block: 1, count: 1)
        #expect(t.reads == before + 1, "the cached leaf hash block is not read again")
    }
}

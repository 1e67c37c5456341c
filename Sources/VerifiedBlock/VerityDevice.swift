#if canImport(Glibc)
import Glibc
#endif

/// Where a sealed image keeps its hash tree: the data (whole 4 KiB blocks), then the
/// hash levels from the leaves up (128 SHA-256 hashes per 4 KiB hash block), then a
/// trailer block naming the data size. The root hash binds the size and the top block,
/// so a back-end that lies about any of them fails the root check.
public struct VerityLayout: Equatable, Sendable {
    public static let blockSize = 4096
    public static let hashesPerBlock = 128
    static let magic: [UInt8] = Array("RFVERITY".utf8)

    public let dataBlocks: UInt64
    /// Hash blocks per level, leaves first; the last level has exactly one.
    public let levelBlocks: [UInt64]

    public init?(dataBlocks: UInt64) {
        guard dataBlocks >= 1, dataBlocks < (1 << 40) else { return nil }
        self.dataBlocks = dataBlocks
        var levels: [UInt64] = []
        var n = dataBlocks
        repeat {
            n = (n + UInt64(Self.hashesPerBlock) - 1) / UInt64(Self.hashesPerBlock)
            levels.append(n)
        } while n > 1
        levelBlocks = levels
    }

    public var topLevel: Int { levelBlocks.count - 1 }

    /// Byte offset of hash block `index` of `level`.
    public func hashBlockOffset(level: Int, index: UInt64) -> UInt64 {
        var block = dataBlocks
        for l in 0..<level { block += levelBlocks[l] }
        return (block + index) * UInt64(Self.blockSize)
    }

    public var trailerOffset: UInt64 { hashBlockOffset(level: levelBlocks.count, index: 0) }
    public var totalBytes: UInt64 { trailerOffset + UInt64(Self.blockSize) }

    func trailer() -> [UInt8] {
        var b = [UInt8](repeating: 0, count: Self.blockSize)
        b.put(Self.magic, at: 0)
        b.putLE(dataBlocks, at: 8)
        return b
    }

    static func decodeTrailer(_ b: [UInt8]) -> UInt64? {
        guard b.count == blockSize, b.slice(0, 8) == magic else { return nil }
        return b.le64(at: 8)
    }

    func root(top: [UInt8]) -> [UInt8] {
        var size = [UInt8](repeating: 0, count: 8)
        size.putLE(dataBlocks, at: 0)
        return Hash.sha256([2], Self.magic, size, top)
    }

    static func dataHash(_ b: UnsafeRawBufferPointer) -> [UInt8] {
        var prefixed = [UInt8](repeating: 0, count: 1 + b.count)
        prefixed.withUnsafeMutableBytes { p in
            UnsafeMutableRawBufferPointer(rebasing: p[1...]).copyMemory(from: b)
        }
        return Hash.sha256(prefixed)
    }

    static func nodeHash(_ b: [UInt8]) -> [UInt8] { Hash.sha256([1], b) }
}

/// The read-only verity mode: no key, no anchor; every block read is checked against a
/// root hash the caller got out of band (`ringfence seal IMAGE` prints it). Hash blocks
/// are verified once, on the first path through them, and cached.
public final class VerityDevice {
    public let transport: any BlockTransport
    public let layout: VerityLayout
    public let rootHash: [UInt8]
    /// Verified hash blocks by (level, index).
    var verified: [Int: [UInt64: [UInt8]]] = [:]
    public private(set) var failure: VerifiedBlockError?

    public var blocks: UInt64 { layout.dataBlocks }

    /// Reads the trailer and the top hash block and checks them against `rootHash`.
    public init(transport: any BlockTransport, rootHash: [UInt8]) throws(VerifiedBlockError) {
        guard rootHash.count == 32 else { throw .local("a root hash is 32 bytes (64 hex digits)") }
        let capacity = transport.capacityBytes
        guard capacity >= UInt64(VerityLayout.blockSize), capacity % UInt64(VerityLayout.blockSize) == 0 else {
            throw .violation(.rootHashMismatch)
        }
        let trailer = try VerifiedBlockDevice.readRaw(
            transport, offset: capacity - UInt64(VerityLayout.blockSize), count: VerityLayout.blockSize)
        guard let n = VerityLayout.decodeTrailer(trailer), let layout = VerityLayout(dataBlocks: n),
            layout.totalBytes == capacity
        else { throw .violation(.rootHashMismatch) }
        let top = try VerifiedBlockDevice.readRaw(
            transport, offset: layout.hashBlockOffset(level: layout.topLevel, index: 0), count: VerityLayout.blockSize)
        guard layout.root(top: VerityLayout.nodeHash(top)) == rootHash else { throw .violation(.rootHashMismatch) }
        self.transport = transport
        self.layout = layout
        self.rootHash = rootHash
        verified[layout.topLevel] = [0: top]
    }

    /// Reads whole blocks from `block` into `buffer`; on any failure `buffer` is zeroed
    /// and the device is broken (R6).
    public func read(block first: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(VerifiedBlockError) {
        do throws(VerifiedBlockError) {
            if let failure { throw failure }
            guard buffer.count > 0, buffer.count % VerityLayout.blockSize == 0 else {
                throw .invalidRequest("\(buffer.count) bytes is not a positive multiple of 4096")
            }
            let count = UInt64(buffer.count / VerityLayout.blockSize)
            guard first < blocks, count <= blocks - first else {
                throw .invalidRequest("blocks \(first)+\(count) are beyond the \(blocks) blocks of the image")
            }
            let requests = (0..<Int(count)).map { k in
                TransportRequest(
                    offset: (first + UInt64(k)) * UInt64(VerityLayout.blockSize),
                    buffer: UnsafeMutableRawBufferPointer(
                        rebasing: buffer[(k * VerityLayout.blockSize)..<((k + 1) * VerityLayout.blockSize)]),
                    write: false)
            }
            do { try transport.transfer(requests) } catch { throw fail(.transport(error)) }
            for k in 0..<count {
                let b = first + k
                let leaf = try hashBlock(level: 0, index: b / UInt64(VerityLayout.hashesPerBlock))
                let at = Int(b % UInt64(VerityLayout.hashesPerBlock)) * 32
                let data = UnsafeRawBufferPointer(
                    rebasing: buffer[(Int(k) * VerityLayout.blockSize)..<(Int(k + 1) * VerityLayout.blockSize)])
                guard VerityLayout.dataHash(data) == leaf.slice(at, 32) else {
                    throw fail(.violation(.hashMismatch(level: 0, block: b)))
                }
            }
        } catch {
            buffer.initializeMemory(as: UInt8.self, repeating: 0)
            throw error
        }
    }

    public func read(block: UInt64, count: Int) throws(VerifiedBlockError) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: max(0, count) * VerityLayout.blockSize)
        let r: Result<Void, VerifiedBlockError> = out.withUnsafeMutableBytes { b in
            do throws(VerifiedBlockError) {
                try read(block: block, into: b)
                return .success(())
            } catch { return .failure(error) }
        }
        if case .failure(let e) = r { throw e }
        return out
    }

    /// A hash block, verified against its (verified) parent on first use, then cached.
    func hashBlock(level: Int, index: UInt64) throws(VerifiedBlockError) -> [UInt8] {
        if let b = verified[level]?[index] { return b }
        let parent = try hashBlock(level: level + 1, index: index / UInt64(VerityLayout.hashesPerBlock))
        let b: [UInt8]
        do {
            b = try VerifiedBlockDevice.readRaw(
                transport, offset: layout.hashBlockOffset(level: level, index: index), count: VerityLayout.blockSize)
        } catch { throw fail(error) }
        let at = Int(index % UInt64(VerityLayout.hashesPerBlock)) * 32
        guard VerityLayout.nodeHash(b) == parent.slice(at, 32) else {
            throw fail(.violation(.hashMismatch(level: level + 1, block: index)))
        }
        verified[level, default: [:]][index] = b
        return b
    }

    func fail(_ e: VerifiedBlockError) -> VerifiedBlockError {
        if let failure { return failure }
        failure = e
        return e
    }

    /// Seals the image file at `path` in place: pads the data to whole blocks, appends the
    /// hash tree and the trailer, and returns the root hash. Sealing a sealed image seals
    /// it again (its old tree becomes data).
    public static func seal(path: String) throws(VerifiedBlockError) -> (root: [UInt8], layout: VerityLayout) {
        let data: UInt64
        do { data = try FileTransport(path: path).capacityBytes } catch { throw .transport(error) }
        let blocks = max(1, (data + UInt64(VerityLayout.blockSize) - 1) / UInt64(VerityLayout.blockSize))
        guard let layout = VerityLayout(dataBlocks: blocks) else { throw .invalidRequest("image too large") }
        guard truncate(path, off_t(layout.totalBytes)) == 0 else {
            throw .local("cannot resize \(path): errno \(errno)")
        }
        let file: FileTransport
        do { file = try FileTransport(path: path, writable: true) } catch { throw .transport(error) }
        var below: [UInt8] = []  // the level under construction's input hashes
        let chunk = 256
        var buffer = [UInt8](repeating: 0, count: chunk * VerityLayout.blockSize)
        var b: UInt64 = 0
        while b < blocks {
            let n = Int(min(UInt64(chunk), blocks - b))
            let r: Result<Void, TransportError> = buffer.withUnsafeMutableBytes { all in
                let part = UnsafeMutableRawBufferPointer(rebasing: all[0..<(n * VerityLayout.blockSize)])
                do throws(TransportError) {
                    try file.transfer([
                        TransportRequest(offset: b * UInt64(VerityLayout.blockSize), buffer: part, write: false)
                    ])
                } catch { return .failure(error) }
                for k in 0..<n {
                    below += VerityLayout.dataHash(
                        UnsafeRawBufferPointer(
                            rebasing: all[(k * VerityLayout.blockSize)..<((k + 1) * VerityLayout.blockSize)]))
                }
                return .success(())
            }
            if case .failure(let e) = r { throw .transport(e) }
            b += UInt64(n)
        }
        var top: [UInt8] = []
        for level in 0...layout.topLevel {
            var next: [UInt8] = []
            for i in 0..<layout.levelBlocks[level] {
                let start = Int(i) * VerityLayout.blockSize
                var block = [UInt8](repeating: 0, count: VerityLayout.blockSize)
                let end = min(below.count, start + VerityLayout.blockSize)
                if start < end { block.put(Array(below[start..<end]), at: 0) }
                try writeBlock(file, block, at: layout.hashBlockOffset(level: level, index: i))
                next += VerityLayout.nodeHash(block)
                top = block
            }
            below = next
        }
        try writeBlock(file, layout.trailer(), at: layout.trailerOffset)
        do { try file.flushWrites() } catch { throw .transport(error) }
        return (layout.root(top: VerityLayout.nodeHash(top)), layout)
    }

    static func writeBlock(_ file: FileTransport, _ bytes: [UInt8], at offset: UInt64) throws(VerifiedBlockError) {
        var copy = bytes
        let r: Result<Void, TransportError> = copy.withUnsafeMutableBytes { b in
            do throws(TransportError) {
                try file.transfer([TransportRequest(offset: offset, buffer: b, write: true)])
                return .success(())
            } catch { return .failure(error) }
        }
        if case .failure(let e) = r { throw .transport(e) }
    }
}

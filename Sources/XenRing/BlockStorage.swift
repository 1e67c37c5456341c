#if canImport(Glibc)
public import Glibc
#endif

/// What a blkif backend serves: 512-byte sectors. Implementations are private to the
/// backend process; the backend checks ranges before calling them (R3).
public protocol BlockStorage: AnyObject {
    var sectorCount: UInt64 { get }
    func read(sector: UInt64, into buffer: UnsafeMutableRawPointer, bytes: Int) -> Bool
    func write(sector: UInt64, from buffer: UnsafeRawPointer, bytes: Int) -> Bool
    /// Writes the pieces of `vectors` one after the other from `sector` (a request's
    /// segments): one system call where the storage can (`DeviceImage`: `pwritev`).
    /// Each piece is a whole number of sectors; `vectors` may be consumed.
    func write(sector: UInt64, vectors: UnsafeMutableBufferPointer<iovec>) -> Bool
    func flush() -> Bool
    func discard(sector: UInt64, sectors: UInt64) -> Bool
}

extension BlockStorage {
    /// One `write(sector:from:bytes:)` per piece.
    public func write(sector: UInt64, vectors: UnsafeMutableBufferPointer<iovec>) -> Bool {
        var position = sector
        for v in vectors {
            guard let base = v.iov_base else { continue }
            guard write(sector: position, from: base, bytes: v.iov_len) else { return false }
            position += UInt64(v.iov_len / 512)
        }
        return true
    }
}

/// An in-memory disk (tests, benchmarks). A file-backed disk is `DeviceImage`
/// (BlockImage), the one virtio-blk serves too (`DeviceImage+BlockStorage.swift`).
public final class MemoryStorage: BlockStorage {
    /// Size in 512-byte sectors.
    public let sectorCount: UInt64
    let bytes: UnsafeMutableRawPointer

    /// A zeroed disk of `sectors` 512-byte sectors.
    public init(sectors: Int) {
        sectorCount = UInt64(max(0, sectors))
        bytes = UnsafeMutableRawPointer.allocate(byteCount: max(1, sectors * 512), alignment: 4096)
        bytes.initializeMemory(as: UInt8.self, repeating: 0, count: max(1, sectors * 512))
    }

    deinit { bytes.deallocate() }

    /// Copies `n` bytes at `sector` into `buffer` (the backend checked the range, R3).
    public func read(sector: UInt64, into buffer: UnsafeMutableRawPointer, bytes n: Int) -> Bool {
        buffer.copyMemory(from: bytes + Int(sector) * 512, byteCount: n)
        return true
    }

    /// Copies `n` bytes from `buffer` to `sector` (the backend checked the range, R3).
    public func write(sector: UInt64, from buffer: UnsafeRawPointer, bytes n: Int) -> Bool {
        (bytes + Int(sector) * 512).copyMemory(from: buffer, byteCount: n)
        return true
    }

    /// Nothing to flush in memory.
    public func flush() -> Bool { true }

    /// Zeroes the range; false for more than 32768 sectors at once.
    public func discard(sector: UInt64, sectors: UInt64) -> Bool {
        guard sectors <= 32768 else { return false }
        (bytes + Int(sector) * 512).initializeMemory(as: UInt8.self, repeating: 0, count: Int(sectors) * 512)
        return true
    }

    /// Direct access for tests.
    public func withBytes<R>(_ body: (UnsafeMutableRawBufferPointer) -> R) -> R {
        body(UnsafeMutableRawBufferPointer(start: bytes, count: Int(sectorCount) * 512))
    }
}

public import BlockImage
#if canImport(Glibc)
public import Glibc
#endif

/// The file-backed disk a blkif backend serves: the same `DeviceImage` virtio-blk's
/// device uses, so both device sides share one implementation of positioned I/O, flush
/// and discard. The backend has checked every range against `sectorCount` (R3).
extension DeviceImage: BlockStorage {
    static let blkifSector = UInt64(BlkifLayout.sectorSize)

    /// The image size in 512-byte sectors (rounded down).
    public var sectorCount: UInt64 { size / Self.blkifSector }

    /// Reads `bytes` at `sector`; false on an I/O error (the backend checked the range).
    public func read(sector: UInt64, into buffer: UnsafeMutableRawPointer, bytes: Int) -> Bool {
        read(into: UnsafeMutableRawBufferPointer(start: buffer, count: bytes), at: sector * Self.blkifSector)
    }

    /// Writes `bytes` at `sector`; false on an I/O error (the backend checked the range).
    public func write(sector: UInt64, from buffer: UnsafeRawPointer, bytes: Int) -> Bool {
        write(from: UnsafeRawBufferPointer(start: buffer, count: bytes), at: sector * Self.blkifSector)
    }

    /// A request's segments in one `pwritev` (one page-cache walk and one system call
    /// instead of one per segment: a verified slot of 4608 bytes is two segments).
    public func write(sector: UInt64, vectors: UnsafeMutableBufferPointer<iovec>) -> Bool {
        transfer(vectors, at: sector * Self.blkifSector, write: true)
    }

    /// Punches a hole (zero-fill where the file system cannot). At most 16 MiB per
    /// request, like `MemoryStorage`: the zero-fill fallback must not stall the backend
    /// for long (R5); larger ones are refused (answered EOPNOTSUPP).
    public func discard(sector: UInt64, sectors: UInt64) -> Bool {
        guard sectors <= 32768 else { return false }
        return discard(at: sector * Self.blkifSector, length: sectors * Self.blkifSector)
    }
}

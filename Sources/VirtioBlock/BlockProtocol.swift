import VhostUser

/// virtio-blk wire format (virtio 1.x §5.2). Shared by the driver and the device.
public enum BlockProtocol {
    /// Sector addressing unit, independent of `blk_size`.
    public static let sectorSize = 512
    public static let requestHeaderSize = 16
    public static let statusSize = 1
    /// VIRTIO_BLK_ID_BYTES.
    public static let idSize = 20
    /// `struct virtio_blk_discard_write_zeroes`.
    public static let discardSegmentSize = 16

    public enum RequestType: UInt32, Sendable, CaseIterable {
        case read = 0  // VIRTIO_BLK_T_IN
        case write = 1  // VIRTIO_BLK_T_OUT
        case flush = 4
        case getID = 8
        case discard = 11
        case writeZeroes = 13
    }

    public enum Status: UInt8, Sendable {
        case ok = 0
        case ioError = 1
        case unsupported = 2
    }

    /// Device feature bits.
    public enum Feature {
        public static let sizeMax: UInt64 = 1 << 1
        public static let segMax: UInt64 = 1 << 2
        public static let geometry: UInt64 = 1 << 4
        public static let readOnly: UInt64 = 1 << 5
        public static let blockSize: UInt64 = 1 << 6
        public static let flush: UInt64 = 1 << 9
        public static let topology: UInt64 = 1 << 10
        public static let configWCE: UInt64 = 1 << 11
        public static let multiQueue: UInt64 = 1 << 12
        public static let discard: UInt64 = 1 << 13
        public static let writeZeroes: UInt64 = 1 << 14
    }

    /// Writes the 16-byte request header `{le32 type; le32 reserved; le64 sector}`.
    public static func encodeHeader(type: RequestType, sector: UInt64) -> [UInt8] {
        var b = [UInt8](repeating: 0, count: requestHeaderSize)
        put(UInt32(type.rawValue), into: &b, at: 0)
        put(sector, into: &b, at: 8)
        return b
    }

    /// Writes one `{le64 sector; le32 num_sectors; le32 flags}` discard/write-zeroes range.
    public static func encodeRange(sector: UInt64, sectors: UInt32, unmap: Bool) -> [UInt8] {
        var b = [UInt8](repeating: 0, count: discardSegmentSize)
        put(sector, into: &b, at: 0)
        put(sectors, into: &b, at: 8)
        put(UInt32(unmap ? 1 : 0), into: &b, at: 12)
        return b
    }

    static func put<T: FixedWidthInteger>(_ v: T, into b: inout [UInt8], at offset: Int) {
        for i in 0..<MemoryLayout<T>.size { b[offset + i] = UInt8(truncatingIfNeeded: v >> (8 * i)) }
    }
}

/// `struct virtio_blk_config` up to `write_zeroes_may_unmap` (60 bytes, what qsd serves).
///
/// Decoding never trusts the values: `BlockConfig.decode` only reads bytes; the driver
/// validates and clamps (`validated(...)`) before using any of them (R3).
public struct BlockConfig: Sendable, Equatable {
    public static let size = 60

    public var capacity: UInt64 = 0  // in 512-byte sectors
    public var sizeMax: UInt32 = 0
    public var segMax: UInt32 = 0
    public var cylinders: UInt16 = 0
    public var heads: UInt8 = 0
    public var sectors: UInt8 = 0
    public var blockSize: UInt32 = 512
    public var physicalBlockExponent: UInt8 = 0
    public var alignmentOffset: UInt8 = 0
    public var minIOSize: UInt16 = 0
    public var optIOSize: UInt32 = 0
    public var writeback: UInt8 = 0
    public var numQueues: UInt16 = 1
    public var maxDiscardSectors: UInt32 = 0
    public var maxDiscardSegments: UInt32 = 0
    public var discardSectorAlignment: UInt32 = 0
    public var maxWriteZeroesSectors: UInt32 = 0
    public var maxWriteZeroesSegments: UInt32 = 0
    public var writeZeroesMayUnmap: UInt8 = 0

    public init() {}

    public var encoded: [UInt8] {
        var b = [UInt8](repeating: 0, count: Self.size)
        BlockProtocol.put(capacity, into: &b, at: 0)
        BlockProtocol.put(sizeMax, into: &b, at: 8)
        BlockProtocol.put(segMax, into: &b, at: 12)
        BlockProtocol.put(cylinders, into: &b, at: 16)
        b[18] = heads
        b[19] = sectors
        BlockProtocol.put(blockSize, into: &b, at: 20)
        b[24] = physicalBlockExponent
        b[25] = alignmentOffset
        BlockProtocol.put(minIOSize, into: &b, at: 26)
        BlockProtocol.put(optIOSize, into: &b, at: 28)
        b[32] = writeback
        BlockProtocol.put(numQueues, into: &b, at: 34)
        BlockProtocol.put(maxDiscardSectors, into: &b, at: 36)
        BlockProtocol.put(maxDiscardSegments, into: &b, at: 40)
        BlockProtocol.put(discardSectorAlignment, into: &b, at: 44)
        BlockProtocol.put(maxWriteZeroesSectors, into: &b, at: 48)
        BlockProtocol.put(maxWriteZeroesSegments, into: &b, at: 52)
        b[56] = writeZeroesMayUnmap
        return b
    }

    /// GET_CONFIG of `size` bytes from `offset` (a device honours the offset): bytes past
    /// the structure read as zero; nil for a range outside the config space.
    public func read(offset: UInt32, size: Int) -> [UInt8]? {
        guard size >= 0, size <= ConfigSpace.maximumSize, offset <= UInt32(ConfigSpace.maximumSize) else { return nil }
        let bytes = encoded
        return (0..<size).map { i in
            let o = Int(offset) + i
            return o < bytes.count ? bytes[o] : 0
        }
    }

    /// Reads whatever prefix the device supplied; missing fields stay zero.
    public static func decode(_ bytes: [UInt8]) -> BlockConfig {
        var b = bytes
        if b.count < size { b += [UInt8](repeating: 0, count: size - b.count) }
        func get<T: FixedWidthInteger>(_: T.Type, _ o: Int) -> T {
            var v: T = 0
            for i in 0..<MemoryLayout<T>.size { v |= T(truncatingIfNeeded: b[o + i]) << (8 * i) }
            return v
        }
        var c = BlockConfig()
        c.capacity = get(UInt64.self, 0)
        c.sizeMax = get(UInt32.self, 8)
        c.segMax = get(UInt32.self, 12)
        c.cylinders = get(UInt16.self, 16)
        c.heads = b[18]
        c.sectors = b[19]
        c.blockSize = get(UInt32.self, 20)
        c.physicalBlockExponent = b[24]
        c.alignmentOffset = b[25]
        c.minIOSize = get(UInt16.self, 26)
        c.optIOSize = get(UInt32.self, 28)
        c.writeback = b[32]
        c.numQueues = get(UInt16.self, 34)
        c.maxDiscardSectors = get(UInt32.self, 36)
        c.maxDiscardSegments = get(UInt32.self, 40)
        c.discardSectorAlignment = get(UInt32.self, 44)
        c.maxWriteZeroesSectors = get(UInt32.self, 48)
        c.maxWriteZeroesSegments = get(UInt32.self, 52)
        c.writeZeroesMayUnmap = b[56]
        return c
    }
}

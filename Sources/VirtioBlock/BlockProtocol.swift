import VhostUser

/// virtio-blk wire format (virtio 1.x §5.2). Shared by the driver and the device.
public enum BlockProtocol {
    /// Sector addressing unit, independent of `blk_size`.
    public static let sectorSize = 512
    /// Bytes of the request header `{le32 type; le32 ioprio; le64 sector}`.
    public static let requestHeaderSize = 16
    /// Bytes of the status the device writes last.
    public static let statusSize = 1
    /// VIRTIO_BLK_ID_BYTES.
    public static let idSize = 20
    /// `struct virtio_blk_discard_write_zeroes`.
    public static let discardSegmentSize = 16

    /// VIRTIO_BLK_T_* request types.
    public enum RequestType: UInt32, Sendable, CaseIterable {
        case read = 0  // VIRTIO_BLK_T_IN
        case write = 1  // VIRTIO_BLK_T_OUT
        /// VIRTIO_BLK_T_FLUSH.
        case flush = 4
        /// VIRTIO_BLK_T_GET_ID.
        case getID = 8
        /// VIRTIO_BLK_T_DISCARD.
        case discard = 11
        /// VIRTIO_BLK_T_WRITE_ZEROES.
        case writeZeroes = 13
    }

    /// VIRTIO_BLK_S_* status values (anything else is a violation, R3).
    public enum Status: UInt8, Sendable {
        /// VIRTIO_BLK_S_OK.
        case ok = 0
        /// VIRTIO_BLK_S_IOERR.
        case ioError = 1
        /// VIRTIO_BLK_S_UNSUPP.
        case unsupported = 2
    }

    /// Device feature bits.
    public enum Feature {
        /// VIRTIO_BLK_F_SIZE_MAX: `size_max` bounds one segment.
        public static let sizeMax: UInt64 = 1 << 1
        /// VIRTIO_BLK_F_SEG_MAX: `seg_max` bounds the segments of a request.
        public static let segMax: UInt64 = 1 << 2
        /// VIRTIO_BLK_F_GEOMETRY (legacy; never acked).
        public static let geometry: UInt64 = 1 << 4
        /// VIRTIO_BLK_F_RO: the device is read-only.
        public static let readOnly: UInt64 = 1 << 5
        /// VIRTIO_BLK_F_BLK_SIZE: `blk_size` is the logical block size.
        public static let blockSize: UInt64 = 1 << 6
        /// VIRTIO_BLK_F_FLUSH: VIRTIO_BLK_T_FLUSH is supported.
        public static let flush: UInt64 = 1 << 9
        /// VIRTIO_BLK_F_TOPOLOGY (never acked).
        public static let topology: UInt64 = 1 << 10
        /// VIRTIO_BLK_F_CONFIG_WCE (never acked).
        public static let configWCE: UInt64 = 1 << 11
        /// VIRTIO_BLK_F_MQ: `num_queues` request queues.
        public static let multiQueue: UInt64 = 1 << 12
        /// VIRTIO_BLK_F_DISCARD: VIRTIO_BLK_T_DISCARD is supported.
        public static let discard: UInt64 = 1 << 13
        /// VIRTIO_BLK_F_WRITE_ZEROES: VIRTIO_BLK_T_WRITE_ZEROES is supported.
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
    /// Bytes of the config this type covers.
    public static let size = 60

    /// `capacity`: the disk size in 512-byte sectors.
    public var capacity: UInt64 = 0  // in 512-byte sectors
    /// `size_max`: largest segment in bytes (0: no limit).
    public var sizeMax: UInt32 = 0
    /// `seg_max`: most data segments per request.
    public var segMax: UInt32 = 0
    /// `geometry.cylinders` (legacy).
    public var cylinders: UInt16 = 0
    /// `geometry.heads` (legacy).
    public var heads: UInt8 = 0
    /// `geometry.sectors` (legacy).
    public var sectors: UInt8 = 0
    /// `blk_size`: the logical block size.
    public var blockSize: UInt32 = 512
    /// `topology.physical_block_exp`.
    public var physicalBlockExponent: UInt8 = 0
    /// `topology.alignment_offset`.
    public var alignmentOffset: UInt8 = 0
    /// `topology.min_io_size`.
    public var minIOSize: UInt16 = 0
    /// `topology.opt_io_size`.
    public var optIOSize: UInt32 = 0
    /// `writeback` (CONFIG_WCE).
    public var writeback: UInt8 = 0
    /// `num_queues`: request queues offered.
    public var numQueues: UInt16 = 1
    /// `max_discard_sectors`: sectors per discard range.
    public var maxDiscardSectors: UInt32 = 0
    /// `max_discard_seg`: ranges per DISCARD request.
    public var maxDiscardSegments: UInt32 = 0
    /// `discard_sector_alignment`.
    public var discardSectorAlignment: UInt32 = 0
    /// `max_write_zeroes_sectors`: sectors per write-zeroes range.
    public var maxWriteZeroesSectors: UInt32 = 0
    /// `max_write_zeroes_seg`: ranges per WRITE_ZEROES request.
    public var maxWriteZeroesSegments: UInt32 = 0
    /// `write_zeroes_may_unmap`.
    public var writeZeroesMayUnmap: UInt8 = 0

    /// An all-zero config with `blk_size` 512 and one queue.
    public init() {}

    /// The 60 little-endian bytes of config space.
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

import SharedMemory

/// The device's geometry after validation: every field is clamped into a sane range or
/// refused (R3). The driver uses only this, never the raw `BlockConfig`.
public struct BlockInfo: Sendable, Equatable {
    /// Disk size in bytes (config `capacity` * 512, checked to fit 63 bits).
    public let capacityBytes: UInt64
    /// Logical block size: a power of two in 512...65536 (512 without BLK_SIZE).
    public let blockSize: Int
    /// Data segments per request, 1...queueSize-2.
    public let segmentsPerRequest: Int
    /// Largest segment, 0 = no limit.
    public let segmentSizeMax: Int
    /// Largest data transfer per request we will post (segments x size, bounded).
    public let maxTransfer: Int
    /// Queues we use: min(config num_queues, GET_QUEUE_NUM, asked), at least 1.
    public let queueCount: Int
    /// VIRTIO_BLK_F_RO was offered: writes are refused locally.
    public let readOnly: Bool
    /// VIRTIO_BLK_F_FLUSH was negotiated.
    public let supportsFlush: Bool
    /// VIRTIO_BLK_F_DISCARD was negotiated.
    public let supportsDiscard: Bool
    /// VIRTIO_BLK_F_WRITE_ZEROES was negotiated.
    public let supportsWriteZeroes: Bool
    /// Largest discard / write-zeroes range per request, in bytes.
    public let maxDiscardBytes: UInt64
    /// Largest WRITE_ZEROES range one request may carry, in bytes.
    public let maxWriteZeroesBytes: UInt64
    /// Negotiated virtio feature bits.
    public let features: UInt64
    /// The raw config as the device served it (for display only, never for decisions).
    public let rawConfig: BlockConfig

    /// Largest transfer we post regardless of what the device allows (keeps the bounce
    /// pool shareable between in-flight requests).
    public static let transferCap = 1 << 20

    /// Validates `config` against the negotiated `features`. Capacity that does not fit
    /// 63 bits and a nonsense blk_size are violations; the rest is clamped.
    public static func validate(
        _ config: BlockConfig, features: UInt64, backendQueues: Int, requestedQueues: Int, queueSize: Int
    ) throws(BlockViolation) -> BlockInfo {
        let (bytes, overflow) = config.capacity.multipliedReportingOverflow(by: UInt64(BlockProtocol.sectorSize))
        guard !overflow, bytes <= UInt64(Int64.max) else {
            throw .blockConfigInvalid(field: "capacity", value: config.capacity)
        }
        var blockSize = BlockProtocol.sectorSize
        if features & BlockProtocol.Feature.blockSize != 0 {
            let b = config.blockSize
            guard b >= 512, b <= 65536, b & (b &- 1) == 0 else {
                throw .blockConfigInvalid(field: "blk_size", value: UInt64(b))
            }
            blockSize = Int(b)
        }
        var segments = 1
        if features & BlockProtocol.Feature.segMax != 0 {
            segments = Int(min(max(config.segMax, 1), UInt32(max(1, queueSize - 2))))
        }
        var sizeMax = 0
        if features & BlockProtocol.Feature.sizeMax != 0, config.sizeMax != 0 {
            sizeMax = max(Int(config.sizeMax), 512)
        }
        var transfer = sizeMax == 0 ? transferCap : min(transferCap, segments * sizeMax)
        transfer = max(blockSize, transfer / blockSize * blockSize)
        var queues = 1
        if features & BlockProtocol.Feature.multiQueue != 0 {
            queues = max(1, min(Int(config.numQueues), backendQueues))
        }
        queues = max(1, min(queues, requestedQueues))
        func limit(_ feature: UInt64, _ sectors: UInt32) -> UInt64 {
            guard features & feature != 0 else { return 0 }
            // 0 means "not set": one sector per request would be absurd, use 32 MiB.
            let s = sectors == 0 ? UInt64(65536) : UInt64(sectors)
            return min(s, UInt64(UInt32.max) / 2) * UInt64(BlockProtocol.sectorSize)
        }
        return BlockInfo(
            capacityBytes: bytes, blockSize: blockSize, segmentsPerRequest: segments,
            segmentSizeMax: sizeMax, maxTransfer: transfer, queueCount: queues,
            readOnly: features & BlockProtocol.Feature.readOnly != 0,
            supportsFlush: features & BlockProtocol.Feature.flush != 0,
            supportsDiscard: features & BlockProtocol.Feature.discard != 0,
            supportsWriteZeroes: features & BlockProtocol.Feature.writeZeroes != 0,
            maxDiscardBytes: limit(BlockProtocol.Feature.discard, config.maxDiscardSectors),
            maxWriteZeroesBytes: limit(BlockProtocol.Feature.writeZeroes, config.maxWriteZeroesSectors),
            features: features, rawConfig: config)
    }

    /// Refuses, before anything is shared (R3), a range past the capacity, misaligned, empty
    /// or (with `transferLimit`) larger than one request may carry. The only range check:
    /// `BlockQueue.submit...` call it per request, the convenience calls once for the whole
    /// range before cutting it into requests that satisfy it by construction.
    @inline(__always)
    func checkRange(offset: UInt64, length: Int, transferLimit: Bool = true) throws(VirtioError) {
        guard length > 0 else { throw .invalidRequest("length 0") }
        let (end, overflow) = offset.addingReportingOverflow(UInt64(length))
        guard !overflow, end <= capacityBytes else {
            throw .outOfRange(offset: offset, length: UInt64(length), capacity: capacityBytes)
        }
        let mask = UInt64(blockSize) - 1  // a power of two (validated)
        guard offset & mask == 0, UInt64(length) & mask == 0 else {
            throw .invalidRequest("offset \(offset) and length \(length) must be multiples of \(blockSize)")
        }
        if transferLimit && length > maxTransfer {
            throw .invalidRequest("\(length) bytes exceed the \(maxTransfer)-byte request limit")
        }
    }

    /// Refuses DISCARD (or WRITE_ZEROES) when it was not negotiated or the disk is read-only.
    func checkDiscard(zeroes: Bool) throws(VirtioError) {
        if zeroes {
            guard supportsWriteZeroes else { throw .unsupported("VIRTIO_BLK_F_WRITE_ZEROES") }
        } else {
            guard supportsDiscard else { throw .unsupported("VIRTIO_BLK_F_DISCARD") }
        }
        guard !readOnly else { throw .readOnly }
    }
}

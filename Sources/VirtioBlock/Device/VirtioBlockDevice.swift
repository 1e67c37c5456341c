public import BlockImage
public import VhostUser
import Virtqueue

/// Settings of a served virtio-blk device.
public struct VirtioBlockDeviceOptions: Sendable {
    /// Offer VIRTIO_BLK_F_RO: writes, discards and write-zeroes are answered IOERR.
    public var readOnly = false
    /// Request queues offered (1...64, `num_queues`).
    public var queueCount = 1
    /// Largest ring the driver may set up; `seg_max` is derived from it.
    public var queueSize = 256
    /// Logical block size announced in config space (power of two, 512...65536).
    public var blockSize: UInt32 = 512
    /// Returned by GET_ID (at most 20 bytes).
    public var serial = "ringfence"
    /// Open the image with O_DIRECT (falls back to buffered I/O for unaligned buffers).
    public var direct = false
    /// Ranges accepted in one DISCARD / WRITE_ZEROES request.
    public var maximumDiscardSegments: UInt32 = 16
    /// Sectors accepted per discard / write-zeroes range.
    public var maximumDiscardSectors: UInt32 = 1 << 22
    /// Offer VIRTIO_F_RING_PACKED (the driver picks the ring format).
    public var packedRing = true

    /// The defaults: one queue of up to 256, 512-byte blocks, writable.
    public init() {}

    /// Why a set of options cannot serve.
    public func validate() -> String? {
        if queueCount < 1 || queueCount > 64 { return "queue count \(queueCount) is not in 1...64" }
        if !SplitLayout.isValidQueueSize(queueSize) || queueSize < 4 {
            return "queue size \(queueSize) is not a power of two in 4...32768"
        }
        if blockSize < 512 || blockSize > 65536 || blockSize & (blockSize - 1) != 0 {
            return "block size \(blockSize) is not a power of two in 512...65536"
        }
        return nil
    }
}

/// A file-backed virtio-blk device model (virtio 1.x §5.2) for `VhostUser.Backend`.
///
/// Only semantics live here; the transport is the back-end's. Requests are parsed from
/// chains `DeviceQueue` already bounded and translated; every header and range is copied
/// once into private memory (R2) and checked (R3); a malformed request completes with
/// VIRTIO_BLK_S_IOERR (or used length 0 when it has no status byte) and never traps.
public final class VirtioBlockDevice: VhostUserDevice {
    /// The file served.
    public let image: DeviceImage
    /// The settings it serves with.
    public let options: VirtioBlockDeviceOptions
    let onEvent: @Sendable (BackendEvent) -> Void
    /// Requests, bytes, failures and violations served so far (for metrics and logs).
    public let counters: BlockDeviceCounters

    /// A device serving `image` with `options` (check them first with
    /// `VirtioBlockDeviceOptions.validate()`).
    public init(
        image: DeviceImage, options: VirtioBlockDeviceOptions, counters: BlockDeviceCounters = BlockDeviceCounters(),
        onEvent: @escaping @Sendable (BackendEvent) -> Void = { _ in }
    ) {
        self.image = image
        self.options = options
        self.counters = counters
        self.onEvent = onEvent
    }

    /// Read-only by option or because the image was opened read-only.
    public var readOnly: Bool { options.readOnly || image.readOnly }
    /// The image size in 512-byte sectors (rounded down).
    public var capacitySectors: UInt64 { image.size / UInt64(BlockProtocol.sectorSize) }

    /// Feature bits offered: VERSION_1, ring features and the blk features the options allow.
    public var features: UInt64 {
        typealias F = BlockProtocol.Feature
        var f =
            FeatureBits.version1 | FeatureBits.ringIndirectDescriptors | FeatureBits.ringEventIndex
            | F.segMax | F.blockSize | F.flush | F.multiQueue
        f |= readOnly ? F.readOnly : F.discard | F.writeZeroes
        if options.packedRing { f |= FeatureBits.ringPacked }
        return f
    }

    /// Protocol features offered: CONFIG (the driver reads the capacity from config space).
    public var protocolFeatures: ProtocolFeatures { .config }

    /// Request queues offered.
    public var queueCount: Int { options.queueCount }

    /// `seg_max` + 2 (header and status): what Linux sizes its indirect tables by.
    public var maximumChainLength: Int { options.queueSize }

    /// The config space (what GET_CONFIG serves).
    public var config: BlockConfig {
        var c = BlockConfig()
        c.capacity = capacitySectors
        c.segMax = UInt32(options.queueSize - 2)
        c.blockSize = options.blockSize
        c.numQueues = UInt16(options.queueCount)
        let alignment = options.blockSize / UInt32(BlockProtocol.sectorSize)
        if !readOnly {
            c.maxDiscardSectors = options.maximumDiscardSectors
            c.maxDiscardSegments = options.maximumDiscardSegments
            c.discardSectorAlignment = alignment
            c.maxWriteZeroesSectors = options.maximumDiscardSectors
            c.maxWriteZeroesSegments = options.maximumDiscardSegments
            c.writeZeroesMayUnmap = 1
        }
        return c
    }

    /// Honours `offset`; bytes past the 60-byte structure read as zero.
    public func readConfig(offset: UInt32, size: Int) -> [UInt8]? { config.read(offset: offset, size: size) }

    /// The config space is read-only here (no CONFIG_WCE offered).
    public func writeConfig(offset: UInt32, bytes: [UInt8]) -> Bool { false }

    /// A handler for one queue, on that queue's thread.
    public func makeQueueHandler(queue: Int, features: UInt64) -> any QueueHandler {
        BlockRequestHandler(device: self, queue: queue)
    }

    /// The front-end left: the image is flushed.
    public func frontendDisconnected() {
        _ = image.flush()
    }
}

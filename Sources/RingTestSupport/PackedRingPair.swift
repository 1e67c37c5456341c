public import SharedMemory
public import Virtqueue

/// A packed-ring driver and device on one sealed region in one process (the packed
/// counterpart of `RingPair`). The device reaches the ring only through `GuestMemory`;
/// tests write malicious values straight into the region.
public final class PackedRingPair {
    public let region: SharedRegion
    public let layout: DriverRegionLayout
    public let memory: GuestMemory
    public let guestBase: UInt64
    public let features: RingFeatures
    public let queueSize: Int
    public private(set) var drivers: [PackedDriverQueue] = []
    public private(set) var pools: [BouncePool] = []
    public private(set) var devices: [PackedDeviceQueue] = []

    public init(
        queueCount: Int = 1, queueSize: Int = 256, features: RingFeatures = RingFeatures(),
        indirectEntries: Int = 0, bounceBytesPerQueue: Int = 1 << 20,
        guestBase: UInt64 = RingPair.defaultGuestBase
    ) throws {
        (layout, region, memory) = try RingPair.sharedRegion(
            name: "ringfence-packed", queueCount: queueCount, queueSize: queueSize,
            indirectEntries: indirectEntries, bounceBytesPerQueue: bounceBytesPerQueue, guestBase: guestBase)
        self.guestBase = guestBase
        self.features = features
        self.queueSize = queueSize
        for q in 0..<queueCount {
            let (driver, pool) = layout.makePackedDriverQueue(
                queue: q, region: region, guestBase: guestBase, features: features)
            drivers.append(driver)
            pools.append(pool)
            let a = layout.ringAddresses(queue: q, guestBase: guestBase)
            devices.append(
                try PackedDeviceQueue(
                    queueSize: queueSize, ringAddress: a.descriptors, driverAreaAddress: a.avail,
                    deviceAreaAddress: a.used, features: features, memory: memory))
        }
    }

    public var driver: PackedDriverQueue { drivers[0] }
    public var pool: BouncePool { pools[0] }
    public var device: PackedDeviceQueue { devices[0] }

    /// Local pointer to descriptor `slot` of queue `q`'s ring.
    public func descriptor(_ slot: Int, queue q: Int = 0) -> UnsafeMutableRawPointer {
        region.base + layout.queues[q].ring.descriptorOffset + slot * PackedLayout.descriptorSize
    }

    /// Local pointers to queue `q`'s driver area and device area.
    public func driverArea(_ q: Int = 0) -> UnsafeMutableRawPointer { region.base + layout.queues[q].ring.availOffset }
    public func deviceArea(_ q: Int = 0) -> UnsafeMutableRawPointer { region.base + layout.queues[q].ring.usedOffset }

    /// Writes a descriptor as a (possibly malicious) peer would.
    public func writeDescriptor(
        _ slot: Int, address: UInt64 = 0, length: UInt32 = 0, id: UInt16, flags: UInt16, queue q: Int = 0
    ) {
        let d = descriptor(slot, queue: q)
        SharedAccess.store64(d + PackedLayout.descAddr, address)
        SharedAccess.store32(d + PackedLayout.descLen, length)
        SharedAccess.store16(d + PackedLayout.descID, id)
        SharedAccess.store16Release(d + PackedLayout.descFlags, flags)
    }

    /// Writes a used descriptor with the given wrap counter (what a device does).
    public func writeUsed(_ slot: Int, id: UInt16, length: UInt32, wrap: Bool = true, queue q: Int = 0) {
        writeDescriptor(slot, length: length, id: id, flags: PackedLayout.usedMarker(wrap: wrap), queue: q)
    }
}

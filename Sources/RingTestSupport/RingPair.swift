public import SharedMemory
public import Virtqueue

/// A driver and a device on one sealed region in one process: the fast test bed.
///
/// The device reaches the ring only through `GuestMemory` with synthetic addresses, as it
/// would from another process; tests write malicious values straight into `region`.
public final class RingPair {
    public static let defaultGuestBase: UInt64 = 0x4000_0000

    public let region: SharedRegion
    public let layout: DriverRegionLayout
    public let memory: GuestMemory
    public let guestBase: UInt64
    public let features: RingFeatures
    public private(set) var drivers: [DriverQueue] = []
    public private(set) var pools: [BouncePool] = []
    public private(set) var devices: [DeviceQueue] = []

    public init(
        queueCount: Int = 1, queueSize: Int = 256, features: RingFeatures = RingFeatures(),
        indirectEntries: Int = 0, bounceBytesPerQueue: Int = 1 << 20,
        guestBase: UInt64 = RingPair.defaultGuestBase
    ) throws {
        (layout, region, memory) = try Self.sharedRegion(
            name: "ringfence-pair", queueCount: queueCount, queueSize: queueSize,
            indirectEntries: indirectEntries, bounceBytesPerQueue: bounceBytesPerQueue, guestBase: guestBase)
        self.guestBase = guestBase
        self.features = features
        for q in 0..<queueCount {
            let (driver, pool) = layout.makeDriverQueue(
                queue: q, region: region, guestBase: guestBase, features: features)
            drivers.append(driver)
            pools.append(pool)
            let a = layout.ringAddresses(queue: q, guestBase: guestBase)
            devices.append(
                try DeviceQueue(
                    queueSize: queueSize, descriptorAddress: a.descriptors, availAddress: a.avail,
                    usedAddress: a.used, features: features, memory: memory))
        }
    }

    /// The one set-up both pairs share: a layout, its sealed region, and the table the
    /// device translates through (synthetic guest and user addresses, R7).
    static func sharedRegion(
        name: String, queueCount: Int, queueSize: Int, indirectEntries: Int, bounceBytesPerQueue: Int,
        guestBase: UInt64
    ) throws -> (DriverRegionLayout, SharedRegion, GuestMemory) {
        let layout = DriverRegionLayout(
            queueCount: queueCount, queueSize: queueSize, indirectEntries: indirectEntries,
            bounceBytesPerQueue: bounceBytesPerQueue)
        let region = try SharedRegion(name: name, size: layout.totalSize)
        let memory = try GuestMemory([
            GuestRegion(guestAddress: guestBase, userAddress: guestBase ^ 0x7f00_0000_0000, mapping: region)
        ])
        return (layout, region, memory)
    }

    public var driver: DriverQueue { drivers[0] }
    public var pool: BouncePool { pools[0] }
    public var device: DeviceQueue { devices[0] }

    /// Local pointer to a byte of the shared region (for tests that play the attacker).
    public func pointer(at offset: Int) -> UnsafeMutableRawPointer { region.base + offset }

    /// Offsets of queue `q`'s ring parts inside the region.
    public func ring(_ q: Int = 0) -> SplitRingPlacement { layout.queues[q].ring }
}

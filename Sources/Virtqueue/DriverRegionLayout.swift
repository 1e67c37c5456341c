public import SharedMemory

/// How a driver lays out one sealed shared region: for each queue its split ring, its
/// indirect tables and its bounce pool. Everything else the driver owns stays private.
public struct DriverRegionLayout: Sendable, Equatable {
    /// One queue's part of the region.
    public struct QueueArea: Sendable, Equatable {
        /// Where its split ring sits.
        public let ring: SplitRingPlacement
        /// Offset of its indirect tables.
        public let indirectOffset: Int
        /// Descriptors per indirect table.
        public let indirectEntries: Int
        /// Offset of its bounce pool.
        public let bounceOffset: Int
        /// Bytes of its bounce pool.
        public let bounceSize: Int
    }

    /// Descriptors per queue.
    public let queueSize: Int
    /// Each queue's part, in queue order.
    public let queues: [QueueArea]
    /// Region size, page-aligned.
    public let totalSize: Int

    /// A layout for `queueCount` queues of `queueSize`, each with `indirectEntries` per indirect table and `bounceBytesPerQueue` of bounce pool.
    public init(queueCount: Int, queueSize: Int, indirectEntries: Int, bounceBytesPerQueue: Int) {
        func align(_ x: Int, _ a: Int) -> Int { (x + a - 1) & ~(a - 1) }
        var offset = 0
        var areas: [QueueArea] = []
        for _ in 0..<max(1, queueCount) {
            let ring = SplitRingPlacement(queueSize: queueSize, at: offset)
            let indirectOffset = align(ring.endOffset, 64)
            let indirectBytes = indirectEntries > 0 ? queueSize * indirectEntries * SplitLayout.descriptorSize : 0
            let bounceOffset = align(indirectOffset + indirectBytes, 4096)
            areas.append(
                QueueArea(
                    ring: ring, indirectOffset: indirectOffset, indirectEntries: indirectEntries,
                    bounceOffset: bounceOffset, bounceSize: align(bounceBytesPerQueue, 4096)))
            offset = bounceOffset + align(bounceBytesPerQueue, 4096)
        }
        self.queueSize = queueSize
        self.queues = areas
        self.totalSize = align(max(offset, 4096), 4096)
    }

    /// Guest addresses of one queue's ring parts, given where the region sits.
    public func ringAddresses(queue: Int, guestBase: UInt64) -> (descriptors: UInt64, avail: UInt64, used: UInt64) {
        let r = queues[queue].ring
        return (
            guestBase + UInt64(r.descriptorOffset), guestBase + UInt64(r.availOffset),
            guestBase + UInt64(r.usedOffset)
        )
    }

    /// Builds the driver queue and bounce pool of `queue` on `region`.
    public func makeDriverQueue(
        queue: Int, region: SharedRegion, guestBase: UInt64, features: RingFeatures
    ) -> (DriverQueue, BouncePool) {
        let (memory, pool) = ringMemory(queue: queue, region: region, guestBase: guestBase)
        return (DriverQueue(memory: memory, features: features), pool)
    }

    /// Local pointers to `queue`'s ring parts and indirect tables, and its bounce pool:
    /// what a driver of either ring format is built on.
    func ringMemory(queue: Int, region: SharedRegion, guestBase: UInt64) -> (DriverRingMemory, BouncePool) {
        let area = queues[queue]
        let base = region.base
        let memory = DriverRingMemory(
            queueSize: UInt16(truncatingIfNeeded: queueSize),
            descriptors: base + area.ring.descriptorOffset,
            avail: base + area.ring.availOffset,
            used: base + area.ring.usedOffset,
            indirect: area.indirectEntries > 0 ? base + area.indirectOffset : nil,
            indirectGuestAddress: guestBase + UInt64(area.indirectOffset),
            indirectTableEntries: area.indirectEntries)
        let pool = BouncePool(
            base: base + area.bounceOffset, guestAddress: guestBase + UInt64(area.bounceOffset),
            size: area.bounceSize)
        return (memory, pool)
    }
}

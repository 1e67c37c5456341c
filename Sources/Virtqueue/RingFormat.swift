public import SharedMemory

/// Which virtqueue format a queue uses (VIRTIO_F_RING_PACKED negotiated or not).
public enum RingFormat: String, Sendable, Equatable, CaseIterable {
    /// The split virtqueue (descriptor table, available and used rings).
    case split
    /// The packed virtqueue (VIRTIO_F_RING_PACKED).
    case packed
}

/// The driver side of a virtqueue, whatever its format: what a device class (blk, and
/// later net and fs) needs, so it does not care which ring is in use. Both
/// implementations are hardened the same way (R1-R6) and fail with the same `Violation`.
public protocol DriverRing: AnyObject {
    var format: RingFormat { get }
    var queueSize: UInt16 { get }
    /// Free descriptors (split) or ring slots (packed).
    var freeCount: Int { get }
    var inFlightCount: Int { get }
    var violation: Violation? { get }
    var isBroken: Bool { get }
    var indirectThreshold: Int { get set }
    /// Completions report length 0 and the device's value is never loaded (all-readable chains).
    var usedLengthIgnored: Bool { get set }
    /// Posts one request (visible at the next `publish()`); returns its head / buffer id.
    @discardableResult
    func add(_ segments: UnsafeBufferPointer<Segment>, token: UInt64) throws(SubmitError) -> UInt16
    /// Makes added requests visible; true if the device wants a kick.
    func publish() -> Bool
    /// The next validated completion, or nil. Throws (and breaks the queue) on a violation.
    func nextCompletion() throws(Violation) -> Completion?
    /// `nextCompletion()` with the publishes batched (issue 19): what was added is published
    /// first (as `publish()`) when the next completion needs a new load of the device's
    /// index, i.e. once the batch seen at the last load is reaped (as a C poller publishes
    /// once per read of `used.idx`), or when `limit` added requests wait unpublished (so a
    /// long batch still feeds a device that went idle). `publication` says what happened.
    /// Split: one load of used.idx per batch; packed: completions are found one by one,
    /// so it publishes at every call.
    func nextCompletion(publishingAfter limit: Int, publication: inout Publication) throws(Violation)
        -> Completion?
    @discardableResult
    func breakQueue(_ v: Violation) -> Violation
    func failAll() -> [UInt64]
    var inFlightTokens: [UInt64] { get }
    func disableInterrupts()
    /// True if completions may already be pending (poll before sleeping).
    func enableInterrupts() -> Bool
    func reset()
}

extension DriverRing {
    /// Posts `segments` as one chain carrying `token`; returns the head id.
    @discardableResult
    public func add(_ segments: [Segment], token: UInt64) throws(SubmitError) -> UInt16 {
        try segments.withUnsafeBufferPointer { (p) throws(SubmitError) in try add(p, token: token) }
    }
}

extension DriverQueue: DriverRing {
    /// Split.
    public var format: RingFormat { .split }
}

/// What a batched `nextCompletion(publishingAfter:publication:)` did before it reaped.
public enum Publication: Sendable, Equatable {
    /// Nothing was published (nothing added, or the batch is still being reaped).
    case none
    /// Added requests were made visible; the device did not ask for a kick.
    case published
    /// Added requests were made visible and the device asked for a kick.
    case publishedKick
}

extension PackedDriverQueue: DriverRing {
    /// Publishes at every call (no batch index on the packed ring), then `nextCompletion()`.
    @inline(__always)
    public func nextCompletion(publishingAfter limit: Int, publication: inout Publication) throws(Violation)
        -> Completion?
    {
        if state.pointee.pending.isPending { publication = publish() ? .publishedKick : .published }
        return try nextCompletion()
    }

    /// Packed.
    public var format: RingFormat { .packed }
}

/// The device side of a virtqueue, whatever its format.
public protocol DeviceRing: AnyObject {
    var format: RingFormat { get }
    var queueSize: UInt16 { get }
    var features: RingFeatures { get }
    var violation: Violation? { get }
    var isBroken: Bool { get }
    /// Pops the next available chain into `chain` (`chain.head` is what `complete` takes).
    func nextChain(into chain: inout DescriptorChain, memory: GuestMemory) throws(Violation) -> ChainFetch
    func complete(head: UInt16, length: UInt32)
    /// `complete(head:length: 0)` for a buffer the device did not write and whose used
    /// length the driver ignores (a transmitted frame): with VIRTIO_F_IN_ORDER a packed
    /// queue writes one used descriptor for a run of them, as the spec allows.
    func completeUnwritten(head: UInt16)
    /// Publishes completions; true if the driver wants an interrupt.
    func publishUsed() -> Bool
    func disableNotifications()
    /// True if work may already be available (poll before sleeping).
    func enableNotifications() -> Bool
    func breakQueue(_ v: Violation)
    /// What GET_VRING_BASE reports: the next avail index (split), or QEMU's packed
    /// encoding with the wrap counters (packed).
    var vringBase: UInt32 { get }
}

extension DeviceRing {
    /// One used entry per buffer (what a split queue always does).
    public func completeUnwritten(head: UInt16) { complete(head: head, length: 0) }
}

extension DeviceQueue: DeviceRing {
    /// Split.
    public var format: RingFormat { .split }
    /// The next available index (GET_VRING_BASE).
    public var vringBase: UInt32 { UInt32(lastAvail) }
}

extension PackedDeviceQueue: DeviceRing {
    /// Packed.
    public var format: RingFormat { .packed }
}

extension DriverRegionLayout {
    /// Builds the driver ring of `queue` in `format`. A packed ring reuses the split
    /// placement: descriptor ring where the table is, driver area at the avail ring,
    /// device area at the used ring (both far larger than the 4 bytes needed).
    public func makeDriverRing(
        queue: Int, region: SharedRegion, guestBase: UInt64, features: RingFeatures, format: RingFormat
    ) -> (any DriverRing, BouncePool) {
        switch format {
        case .split:
            return makeDriverQueue(queue: queue, region: region, guestBase: guestBase, features: features)
        case .packed:
            return makePackedDriverQueue(queue: queue, region: region, guestBase: guestBase, features: features)
        }
    }

    /// Builds the packed driver queue and bounce pool of `queue` on `region`.
    public func makePackedDriverQueue(
        queue: Int, region: SharedRegion, guestBase: UInt64, features: RingFeatures
    ) -> (PackedDriverQueue, BouncePool) {
        let (memory, pool) = ringMemory(queue: queue, region: region, guestBase: guestBase)
        return (PackedDriverQueue(memory: memory, features: features), pool)
    }
}

/// Translates one part of a ring the driver announced (its whole length, once) and checks
/// the alignment virtio requires of both the address and the local pointer (atomics on
/// the indices need it). Shared by the split and packed device queues.
func translateRingPart(
    _ name: String, address: UInt64, size: Int, alignment: UInt64,
    translate: (UInt64, UInt64) throws(TranslationError) -> UnsafeMutableRawBufferPointer
) throws(RingSetupError) -> UnsafeMutableRawPointer {
    guard address % alignment == 0 else { throw .misaligned(part: name) }
    let buffer: UnsafeMutableRawBufferPointer
    do { buffer = try translate(address, UInt64(size)) } catch { throw .unmapped(part: name, error) }
    guard let base = buffer.baseAddress, UInt(bitPattern: base) % UInt(alignment) == 0 else {
        throw .misaligned(part: name)
    }
    return base
}

/// Byte layout of a virtio 1.x split virtqueue (virtio spec §2.7). Little-endian.
///
/// ```
/// descriptor table  16 * N bytes, align 16: { le64 addr; le32 len; le16 flags; le16 next }
/// avail ring        6 + 2 * N,     align 2: { le16 flags; le16 idx; le16 ring[N]; le16 used_event }
/// used ring         6 + 8 * N,     align 4: { le16 flags; le16 idx; {le32 id; le32 len}[N]; le16 avail_event }
/// ```
public enum SplitLayout {
    /// Bytes of one descriptor.
    public static let descriptorSize = 16
    /// Largest queue size.
    public static let maximumQueueSize = 32768

    // Descriptor flags.
    /// VRING_DESC_F_NEXT.
    public static let flagNext: UInt16 = 1
    /// VRING_DESC_F_WRITE.
    public static let flagWrite: UInt16 = 2
    /// VRING_DESC_F_INDIRECT.
    public static let flagIndirect: UInt16 = 4
    /// avail.flags: the driver does not want interrupts.
    public static let availNoInterrupt: UInt16 = 1
    /// used.flags: the device does not want kicks.
    public static let usedNoNotify: UInt16 = 1

    // Field offsets inside a descriptor.
    /// Offset of `addr` in a descriptor.
    public static let descAddr = 0
    /// Offset of `len`.
    public static let descLen = 8
    /// Offset of `flags`.
    public static let descFlags = 12
    /// Offset of `next`.
    public static let descNext = 14

    /// Bytes of a descriptor table of `n` entries.
    public static func descriptorTableSize(_ n: Int) -> Int { 16 * n }
    /// Bytes of an available ring of `n` entries (with `used_event`).
    public static func availRingSize(_ n: Int) -> Int { 6 + 2 * n }
    /// Bytes of a used ring of `n` entries (with `avail_event`).
    public static func usedRingSize(_ n: Int) -> Int { 6 + 8 * n }

    /// Offset of the available ring's `flags`.
    public static let availFlagsOffset = 0
    /// Offset of the available ring's `idx`.
    public static let availIdxOffset = 2
    /// Offset of available entry `i`.
    public static func availEntryOffset(_ i: Int) -> Int { 4 + 2 * i }
    /// Offset of `used_event` in an available ring of `n` entries.
    public static func usedEventOffset(_ n: Int) -> Int { 4 + 2 * n }

    /// Offset of the used ring's `flags`.
    public static let usedFlagsOffset = 0
    /// Offset of the used ring's `idx`.
    public static let usedIdxOffset = 2
    /// Offset of used element `i`.
    public static func usedEntryOffset(_ i: Int) -> Int { 4 + 8 * i }
    /// Offset of `avail_event` in a used ring of `n` entries.
    public static func availEventOffset(_ n: Int) -> Int { 4 + 8 * n }

    /// A power of two in 1...32768.
    public static func isValidQueueSize(_ n: Int) -> Bool {
        n >= 1 && n <= maximumQueueSize && n & (n - 1) == 0
    }

    /// virtio's `vring_need_event`: should the side that moved its index from `old` to
    /// `new` notify a peer that asked to be woken at `event`? Wrap-safe for any inputs.
    @inline(__always)
    public static func needEvent(event: UInt16, new: UInt16, old: UInt16) -> Bool {
        (new &- event &- 1) < (new &- old)
    }
}

/// Where the three parts of one split ring sit, as local pointers plus the addresses
/// announced to the device.
public struct SplitRingPlacement: Sendable, Equatable {
    /// Descriptors in the ring.
    public let queueSize: Int
    /// Offsets from the start of the shared region.
    public let descriptorOffset: Int
    /// Offset of the available ring.
    public let availOffset: Int
    /// Offset of the used ring.
    public let usedOffset: Int
    /// Bytes used, from `descriptorOffset`, rounded up to 64.
    public let totalSize: Int

    /// Lays a ring out starting at `offset` (rounded up to 64 bytes).
    public init(queueSize: Int, at offset: Int) {
        func align(_ x: Int, _ a: Int) -> Int { (x + a - 1) & ~(a - 1) }
        self.queueSize = queueSize
        descriptorOffset = align(offset, 64)
        availOffset = descriptorOffset + SplitLayout.descriptorTableSize(queueSize)
        usedOffset = align(availOffset + SplitLayout.availRingSize(queueSize), 64)
        totalSize = align(usedOffset + SplitLayout.usedRingSize(queueSize), 64) - descriptorOffset
    }

    /// Offset just past the ring.
    public var endOffset: Int { descriptorOffset + totalSize }
}

/// Which optional ring features were negotiated.
public struct RingFeatures: Sendable, Equatable {
    /// VIRTIO_RING_F_EVENT_IDX.
    public var eventIndex: Bool
    /// VIRTIO_RING_F_INDIRECT_DESC.
    public var indirectDescriptors: Bool
    /// VIRTIO_F_IN_ORDER: buffers are used in the order they were made available, so a
    /// packed device queue may write one used descriptor for a run of unwritten buffers
    /// (`completeUnwritten`).
    public var inOrder: Bool

    /// The features negotiated.
    public init(eventIndex: Bool = false, indirectDescriptors: Bool = false, inOrder: Bool = false) {
        self.eventIndex = eventIndex
        self.indirectDescriptors = indirectDescriptors
        self.inOrder = inOrder
    }
}

/// One buffer of a request, as the driver posts it.
public struct Segment: Sendable, Equatable {
    /// Guest address (inside the shared region, e.g. from the `BouncePool`).
    public var address: UInt64
    /// Bytes.
    public var length: UInt32
    /// The device may write it.
    public var deviceWritable: Bool

    /// A segment.
    public init(address: UInt64, length: UInt32, deviceWritable: Bool) {
        self.address = address
        self.length = length
        self.deviceWritable = deviceWritable
    }
}

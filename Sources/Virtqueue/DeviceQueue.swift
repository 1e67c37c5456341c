public import SharedMemory

/// One translated buffer of a descriptor chain: local memory the device may access.
public struct ChainSegment: @unchecked Sendable {
    /// The local bytes (bounds-checked translation of the descriptor).
    public let buffer: UnsafeMutableRawBufferPointer
    /// The address the driver gave.
    public let guestAddress: UInt64
    /// The device may write this segment (VRING_DESC_F_WRITE).
    public let deviceWritable: Bool
}

/// A descriptor chain the device popped. Reuse one instance across pops (no allocation
/// on the hot path once its array has grown).
public struct DescriptorChain: @unchecked Sendable {
    /// The chain's head descriptor id (what `complete` takes).
    public internal(set) var head: UInt16 = 0
    /// The translated segments, readable first.
    public internal(set) var segments: [ChainSegment] = []
    /// Index of the first device-writable segment (== segments.count if none).
    public internal(set) var firstWritable = 0
    /// Bytes the device may read.
    public internal(set) var readableLength: UInt64 = 0
    /// Bytes the device may write.
    public internal(set) var writableLength: UInt64 = 0

    /// An empty chain to pop into.
    public init() { segments.reserveCapacity(16) }

    /// The chain is one buffer of `length` bytes: `segment`. Replaces the one segment in
    /// place when there was one (a net queue's every chain), cheaper than reset + append.
    @inline(__always)
    mutating func setSingle(head: UInt16, _ segment: ChainSegment, length: UInt64) {
        self.head = head
        if segments.count == 1 {
            segments[0] = segment
        } else {
            while !segments.isEmpty { segments.removeLast() }
            segments.append(segment)
        }
        if segment.deviceWritable {
            firstWritable = 0
            readableLength = 0
            writableLength = length
        } else {
            firstWritable = 1
            readableLength = length
            writableLength = 0
        }
    }

    @inline(__always)
    mutating func reset(head: UInt16) {
        self.head = head
        // One or a few segments: removeLast keeps the storage and is far cheaper per chain
        // than removeAll(keepingCapacity:) (a generic replaceSubrange).
        while !segments.isEmpty { segments.removeLast() }
        firstWritable = 0
        readableLength = 0
        writableLength = 0
    }

    /// The device-readable segments.
    public var readable: ArraySlice<ChainSegment> { segments[..<firstWritable] }
    /// The device-writable segments.
    public var writable: ArraySlice<ChainSegment> { segments[firstWritable...] }
}

/// Outcome of asking for the next chain.
public enum ChainFetch: Equatable, Sendable {
    /// The driver has made nothing new available.
    case empty
    /// `chain` holds a validated chain.
    case ready
    /// The chain at `head` is malformed. The queue still works; the device should
    /// complete `head` with length 0 (or fail the request) and go on.
    case rejected(head: UInt16, Violation)
}

/// Why a ring the driver announced cannot be used at all.
public enum RingSetupError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The queue size is not a power of two in range.
    case invalidQueueSize(Int)
    /// A part of the ring is not aligned as the spec requires.
    case misaligned(part: String)
    /// A part of the ring is outside the mapped memory.
    case unmapped(part: String, TranslationError)

    /// One line naming the part that is unusable.
    public var description: String {
        switch self {
        case .invalidQueueSize(let n): return "queue size \(n) is not a power of two in 1...32768"
        case .misaligned(let p): return "\(p) is not aligned as virtio requires"
        case .unmapped(let p, let e): return "\(p): \(e)"
        }
    }
}

/// The hardened device side of a split virtqueue (the vhost discipline).
///
/// Pure ring logic: guest memory is passed into each call (as rust-vmm's `Queue`).
/// Every driver-written value is loaded once (R2) and checked (R3); every address goes
/// through `GuestMemory.translate` (R7); every walk is bounded by the table size (R5).
/// A malformed chain is an error for that chain; a malformed ring index breaks the queue.
public final class DeviceQueue {
    /// Descriptors in the ring.
    public let queueSize: UInt16
    /// Negotiated ring features.
    public let features: RingFeatures
    let mask: UInt16
    let descriptors: UnsafeMutableRawPointer
    let avail: UnsafeMutableRawPointer
    let used: UnsafeMutableRawPointer

    /// The private indices, behind an owned pointer (the queues' one private-state idiom).
    struct State {
        /// Next avail entry to consume.
        var lastAvail: UInt16
        /// avail.idx as loaded at the start of the current batch.
        var availSnapshot: UInt16
        /// Private used.idx; published by `publishUsed()`.
        var usedIndex: UInt16
        var publishedUsed: UInt16
        /// Private copy of used.flags (never read back from the ring).
        var usedFlags: UInt16 = 0
        var health = QueueHealth()
    }

    let state: UnsafeMutablePointer<State>

    /// Next avail entry to consume (private).
    public var lastAvail: UInt16 { state.pointee.lastAvail }
    /// Private used.idx; published by `publishUsed()`.
    public var usedIndex: UInt16 { state.pointee.usedIndex }
    /// The driver's first violation; the queue is broken from then on (R6).
    public var violation: Violation? { state.pointee.health.violation }
    /// True once a violation broke the queue.
    public var isBroken: Bool { state.pointee.health.broken }

    /// Largest indirect table accepted, in descriptors: the queue size unless the device
    /// advertised more (virtio-blk's `seg_max` + 2 may exceed a small ring, and Linux then
    /// builds indirect tables that long). Bounded by 32768 either way (R5).
    public let indirectLimit: Int

    /// Sets up a queue on ring memory the driver announced by guest address. Each part
    /// is translated once, with its full length, and checked for alignment.
    public convenience init(
        queueSize: Int, descriptorAddress: UInt64, availAddress: UInt64, usedAddress: UInt64,
        features: RingFeatures, memory: GuestMemory, startIndex: UInt16 = 0, indirectLimit: Int? = nil
    ) throws(RingSetupError) {
        try self.init(
            queueSize: queueSize, features: features, startIndex: startIndex,
            translate: { (a, l) throws(TranslationError) in try memory.translate(a, length: l) },
            addresses: (descriptorAddress, availAddress, usedAddress), indirectLimit: indirectLimit)
    }

    /// The same, for rings announced by vhost-user "user" addresses.
    public convenience init(
        queueSize: Int, userDescriptorAddress: UInt64, userAvailAddress: UInt64,
        userUsedAddress: UInt64, features: RingFeatures, memory: GuestMemory, startIndex: UInt16 = 0,
        indirectLimit: Int? = nil
    ) throws(RingSetupError) {
        try self.init(
            queueSize: queueSize, features: features, startIndex: startIndex,
            translate: { (a, l) throws(TranslationError) in try memory.translateUser(a, length: l) },
            addresses: (userDescriptorAddress, userAvailAddress, userUsedAddress), indirectLimit: indirectLimit)
    }

    init(
        queueSize: Int, features: RingFeatures, startIndex: UInt16,
        translate: (UInt64, UInt64) throws(TranslationError) -> UnsafeMutableRawBufferPointer,
        addresses: (UInt64, UInt64, UInt64), indirectLimit: Int? = nil
    ) throws(RingSetupError) {
        guard SplitLayout.isValidQueueSize(queueSize) else { throw .invalidQueueSize(queueSize) }
        func part(_ name: String, _ address: UInt64, _ size: Int, _ align: UInt64) throws(RingSetupError)
            -> UnsafeMutableRawPointer
        {
            try translateRingPart(name, address: address, size: size, alignment: align, translate: translate)
        }
        descriptors = try part("descriptor table", addresses.0, SplitLayout.descriptorTableSize(queueSize), 16)
        avail = try part("avail ring", addresses.1, SplitLayout.availRingSize(queueSize), 2)
        used = try part("used ring", addresses.2, SplitLayout.usedRingSize(queueSize), 4)
        self.queueSize = UInt16(truncatingIfNeeded: queueSize)
        self.mask = UInt16(truncatingIfNeeded: queueSize - 1)
        self.features = features
        self.indirectLimit = max(queueSize, min(indirectLimit ?? 0, SplitLayout.maximumQueueSize))
        state = .owned(
            State(lastAvail: startIndex, availSnapshot: startIndex, usedIndex: startIndex, publishedUsed: startIndex))
    }

    deinit { state.release() }

    /// Ring size in descriptors, as Int (queue size 32768 does not fit `UInt16` + 1).
    var tableSize: Int { Int(mask) + 1 }

    private func fail(_ v: Violation) -> Violation { state.pointee.health.fail(v) }

    /// Pops the next available chain into `chain`, validating it completely.
    public func nextChain(into chain: inout DescriptorChain, memory: GuestMemory) throws(Violation)
        -> ChainFetch
    {
        if state.pointee.health.broken { throw state.pointee.health.sticky }
        let lastAvail = state.pointee.lastAvail
        if lastAvail == state.pointee.availSnapshot {
            let published = SharedAccess.load16Acquire(avail + SplitLayout.availIdxOffset)
            if published == lastAvail { return .empty }
            guard Int(published &- lastAvail) <= tableSize else {
                throw fail(.availIndexBeyondQueueSize(lastSeen: lastAvail, published: published, queueSize: queueSize))
            }
            state.pointee.availSnapshot = published
        }
        let untrustedHead = SharedAccess.load16(avail + SplitLayout.availEntryOffset(Int(lastAvail & mask)))
        guard Int(untrustedHead) < tableSize else {
            // Without a valid head there is nothing to complete: the queue cannot continue.
            throw fail(.availHeadOutOfRange(head: untrustedHead, queueSize: queueSize))
        }
        state.pointee.lastAvail = lastAvail &+ 1
        let head = untrustedHead
        // The head descriptor, loaded once: alone (the common case) it needs no walk.
        let first = LoadedDescriptor(SplitTableFormat.self, at: descriptors + Int(head) * SplitLayout.descriptorSize)
        let rejection: Violation?
        if first.flags & (SplitLayout.flagNext | SplitLayout.flagIndirect) == 0 {
            rejection = ChainWalker.single(
                head: head, name: head, address: first.address, length: first.length,
                writable: first.flags & SplitLayout.flagWrite != 0, features: features, indirectLimit: indirectLimit,
                into: &chain, memory: memory)
        } else {
            chain.reset(head: head)
            var walker = ChainWalker(head: head, features: features, indirectLimit: indirectLimit)
            rejection = walker.walk(
                SplitTableFormat.self, table: descriptors, entries: tableSize, from: Int(head), inIndirect: false,
                first: first, into: &chain, memory: memory)
        }
        if let rejection { return .rejected(head: head, rejection) }
        return .ready
    }

    /// Records that the chain at `head` is done, with `length` bytes written.
    /// Not visible to the driver until `publishUsed()`.
    public func complete(head: UInt16, length: UInt32) {
        let usedIndex = state.pointee.usedIndex
        let element = used + SplitLayout.usedEntryOffset(Int(usedIndex & mask))
        SharedAccess.store32(element, UInt32(head))
        SharedAccess.store32(element + 4, length)
        state.pointee.usedIndex = usedIndex &+ 1
    }

    /// Publishes completions (release store of used.idx) and says whether the driver
    /// wants an interrupt, after a full fence.
    public func publishUsed() -> Bool {
        let old = state.pointee.publishedUsed
        let new = state.pointee.usedIndex
        guard old != new else { return false }
        state.pointee.publishedUsed = new
        return SplitEvents.publish(
            index: used + SplitLayout.usedIdxOffset, new: new, old: old, eventIndex: features.eventIndex,
            peerEvent: avail + SplitLayout.usedEventOffset(tableSize), peerFlags: avail + SplitLayout.availFlagsOffset)
    }

    /// Asks the driver not to kick (a hint).
    public func disableNotifications() {
        SplitEvents.disable(
            eventIndex: features.eventIndex, flags: &state.pointee.usedFlags, at: used + SplitLayout.usedFlagsOffset)
    }

    /// Asks for a kick at the next avail entry. Returns true if work may already be
    /// available (poll again before sleeping).
    public func enableNotifications() -> Bool {
        SplitEvents.enable(
            eventIndex: features.eventIndex, position: state.pointee.lastAvail,
            ourEvent: used + SplitLayout.availEventOffset(tableSize), flags: &state.pointee.usedFlags,
            at: used + SplitLayout.usedFlagsOffset, peerIndex: avail + SplitLayout.availIdxOffset)
    }

    /// Breaks the queue on behalf of a caller (a device-level protocol violation).
    public func breakQueue(_ v: Violation) {
        _ = fail(v)
    }
}

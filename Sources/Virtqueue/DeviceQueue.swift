public import SharedMemory

/// One translated buffer of a descriptor chain: local memory the device may access.
public struct ChainSegment: @unchecked Sendable {
    public let buffer: UnsafeMutableRawBufferPointer
    public let guestAddress: UInt64
    public let deviceWritable: Bool
}

/// A descriptor chain the device popped. Reuse one instance across pops (no allocation
/// on the hot path once its array has grown).
public struct DescriptorChain: @unchecked Sendable {
    public internal(set) var head: UInt16 = 0
    public internal(set) var segments: [ChainSegment] = []
    /// Index of the first device-writable segment (== segments.count if none).
    public internal(set) var firstWritable = 0
    public internal(set) var readableLength: UInt64 = 0
    public internal(set) var writableLength: UInt64 = 0

    public init() { segments.reserveCapacity(16) }

    mutating func reset(head: UInt16) {
        self.head = head
        segments.removeAll(keepingCapacity: true)
        firstWritable = 0
        readableLength = 0
        writableLength = 0
    }

    public var readable: ArraySlice<ChainSegment> { segments[..<firstWritable] }
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
    case invalidQueueSize(Int)
    case misaligned(part: String)
    case unmapped(part: String, TranslationError)

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
    public let queueSize: UInt16
    public let features: RingFeatures
    let mask: UInt16
    let descriptors: UnsafeMutableRawPointer
    let avail: UnsafeMutableRawPointer
    let used: UnsafeMutableRawPointer

    /// Next avail entry to consume (private).
    public private(set) var lastAvail: UInt16
    /// avail.idx as loaded at the start of the current batch.
    var availSnapshot: UInt16
    /// Private used.idx; published by `publishUsed()`.
    public private(set) var usedIndex: UInt16
    var publishedUsed: UInt16
    var usedFlags: UInt16 = 0

    public private(set) var violation: Violation?
    public var isBroken: Bool { violation != nil }

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
        lastAvail = startIndex
        availSnapshot = startIndex
        usedIndex = startIndex
        publishedUsed = startIndex
    }

    /// Ring size in descriptors, as Int (queue size 32768 does not fit `UInt16` + 1).
    var tableSize: Int { Int(mask) + 1 }

    /// Pops the next available chain into `chain`, validating it completely.
    public func nextChain(into chain: inout DescriptorChain, memory: GuestMemory) throws(Violation)
        -> ChainFetch
    {
        if let violation { throw violation }
        if lastAvail == availSnapshot {
            let published = SharedAccess.load16Acquire(avail + SplitLayout.availIdxOffset)
            if published == lastAvail { return .empty }
            guard Int(published &- lastAvail) <= tableSize else {
                let v = Violation.availIndexBeyondQueueSize(
                    lastSeen: lastAvail, published: published, queueSize: queueSize)
                violation = v
                throw v
            }
            availSnapshot = published
        }
        let untrustedHead = SharedAccess.load16(avail + SplitLayout.availEntryOffset(Int(lastAvail & mask)))
        guard Int(untrustedHead) < tableSize else {
            // Without a valid head there is nothing to complete: the queue cannot continue.
            let v = Violation.availHeadOutOfRange(head: untrustedHead, queueSize: queueSize)
            violation = v
            throw v
        }
        lastAvail &+= 1
        let head = untrustedHead
        chain.reset(head: head)
        if let rejection = walk(head: head, into: &chain, memory: memory) {
            return .rejected(head: head, rejection)
        }
        return .ready
    }

    /// Walks and translates one chain. Returns the reason it is malformed, if it is.
    func walk(head: UInt16, into chain: inout DescriptorChain, memory: GuestMemory) -> Violation? {
        var table = descriptors
        var tableEntries = tableSize
        var index = Int(head)
        var visited = 0
        var inIndirect = false
        var sawWritable = false
        var total: UInt64 = 0
        while true {
            visited += 1
            guard visited <= tableEntries else { return .chainTooLong(head: head, limit: tableEntries) }
            let d = table + index * SplitLayout.descriptorSize
            // One load per field, into locals; never looked at again (R2).
            let untrustedAddress = SharedAccess.load64Unaligned(d + SplitLayout.descAddr)
            let untrustedLength = SharedAccess.load32Unaligned(d + SplitLayout.descLen)
            let untrustedFlags = SharedAccess.load16Unaligned(d + SplitLayout.descFlags)
            let untrustedNext = SharedAccess.load16Unaligned(d + SplitLayout.descNext)

            if untrustedFlags & SplitLayout.flagIndirect != 0 {
                guard !inIndirect else { return .nestedIndirect(head: head) }
                guard features.indirectDescriptors else { return .indirectNotNegotiated(head: head) }
                guard untrustedFlags & SplitLayout.flagNext == 0 else { return .indirectWithNext(head: head) }
                let entries = Int(untrustedLength) / SplitLayout.descriptorSize
                guard untrustedLength != 0, untrustedLength % 16 == 0, entries <= indirectLimit else {
                    return .indirectTableLength(head: head, length: untrustedLength)
                }
                let buffer: UnsafeMutableRawBufferPointer
                do {
                    buffer = try memory.translate(untrustedAddress, length: UInt64(untrustedLength))
                } catch {
                    return .descriptorAddressInvalid(head: head, error)
                }
                guard let base = buffer.baseAddress else {
                    return .indirectTableLength(head: head, length: untrustedLength)
                }
                table = base
                tableEntries = entries
                index = 0
                visited = 0
                inIndirect = true
                continue
            }

            let writable = untrustedFlags & SplitLayout.flagWrite != 0
            if writable {
                sawWritable = true
            } else if sawWritable {
                return .readableAfterWritable(head: head)
            }
            total += UInt64(untrustedLength)  // <= 2^16 descriptors * 2^32: cannot overflow
            guard total <= UInt64(UInt32.max) else { return .chainLengthOverflow(head: head) }
            // A buffer may straddle adjacent regions (QEMU splits guest RAM): translate it
            // piece by piece. Each piece ends a region, so there are at most
            // `GuestMemory.maximumRegions` pieces (R5); a gap anywhere rejects the chain.
            let length = UInt64(untrustedLength)
            guard !untrustedAddress.addingReportingOverflow(length).overflow else {
                return .descriptorAddressInvalid(
                    head: head, .overflow(address: untrustedAddress, length: length))
            }
            var pieceAddress = untrustedAddress
            var remaining = length
            repeat {
                let piece: UnsafeMutableRawBufferPointer
                do {
                    piece = try memory.translatePrefix(pieceAddress, length: remaining)
                } catch {
                    return .descriptorAddressInvalid(
                        head: head, .unmapped(address: untrustedAddress, length: length))
                }
                chain.segments.append(
                    ChainSegment(buffer: piece, guestAddress: pieceAddress, deviceWritable: writable))
                pieceAddress &+= UInt64(piece.count)
                remaining -= UInt64(piece.count)
            } while remaining > 0
            if writable {
                chain.writableLength += length
            } else {
                chain.readableLength += length
                chain.firstWritable = chain.segments.count
            }

            guard untrustedFlags & SplitLayout.flagNext != 0 else { return nil }
            guard Int(untrustedNext) < tableEntries else {
                return .descriptorNextOutOfRange(head: head, next: untrustedNext, tableSize: tableEntries)
            }
            index = Int(untrustedNext)
        }
    }

    /// Records that the chain at `head` is done, with `length` bytes written.
    /// Not visible to the driver until `publishUsed()`.
    public func complete(head: UInt16, length: UInt32) {
        let element = used + SplitLayout.usedEntryOffset(Int(usedIndex & mask))
        SharedAccess.store32(element, UInt32(head))
        SharedAccess.store32(element + 4, length)
        usedIndex &+= 1
    }

    /// Publishes completions (release store of used.idx) and says whether the driver
    /// wants an interrupt, after a full fence.
    public func publishUsed() -> Bool {
        let old = publishedUsed
        let new = usedIndex
        guard old != new else { return false }
        SharedAccess.store16Release(used + SplitLayout.usedIdxOffset, new)
        publishedUsed = new
        SharedAccess.fullFence()
        if features.eventIndex {
            let event = SharedAccess.load16(avail + SplitLayout.usedEventOffset(tableSize))
            return SplitLayout.needEvent(event: event, new: new, old: old)
        }
        let flags = SharedAccess.load16(avail + SplitLayout.availFlagsOffset)
        return flags & SplitLayout.availNoInterrupt == 0
    }

    /// Asks the driver not to kick (a hint).
    public func disableNotifications() {
        if !features.eventIndex {
            usedFlags |= SplitLayout.usedNoNotify
            SharedAccess.store16(used + SplitLayout.usedFlagsOffset, usedFlags)
        }
    }

    /// Asks for a kick at the next avail entry. Returns true if work may already be
    /// available (poll again before sleeping).
    public func enableNotifications() -> Bool {
        if features.eventIndex {
            SharedAccess.store16(used + SplitLayout.availEventOffset(tableSize), lastAvail)
        } else if usedFlags & SplitLayout.usedNoNotify != 0 {
            usedFlags &= ~SplitLayout.usedNoNotify
            SharedAccess.store16(used + SplitLayout.usedFlagsOffset, usedFlags)
        }
        SharedAccess.fullFence()
        return SharedAccess.load16Acquire(avail + SplitLayout.availIdxOffset) != lastAvail
    }

    /// Breaks the queue on behalf of a caller (a device-level protocol violation).
    public func breakQueue(_ v: Violation) {
        if violation == nil { violation = v }
    }
}

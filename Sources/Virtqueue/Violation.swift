public import SharedMemory

/// Something the other side of a ring did that the rules forbid. One case per check;
/// the first one breaks the queue (rule R6) and every in-flight request fails with it.
public enum Violation: RuleViolation, Equatable {
    // MARK: the device broke a rule (seen by the driver)

    /// used.idx advanced by more than the number of chains in flight.
    case usedIndexBeyondInFlight(lastSeen: UInt16, published: UInt16, inFlight: Int)
    /// used.idx moved backwards.
    case usedIndexWentBackwards(lastSeen: UInt16, published: UInt16)
    /// A used element names a descriptor index outside the ring.
    case usedIdOutOfRange(id: UInt32, queueSize: UInt16)
    /// A used element names a descriptor that is not the head of an in-flight chain
    /// (never posted, already completed, or a non-head descriptor).
    case usedIdNotInFlight(id: UInt32)
    /// A used element claims more bytes than the chain's device-writable length.
    case usedLengthTooLarge(id: UInt32, length: UInt32, writable: UInt64)
    /// The device did not complete within the deadline.
    case deadlineExceeded(milliseconds: UInt64)
    /// The device raised far more notifications than it completed requests.
    case notificationStorm(count: UInt64)
    /// Either side: the peer made a notification of ours block on a shared eventfd
    /// (cleared O_NONBLOCK and saturated the counter); the watchdog had to free it.
    case notifierBlocked(role: String)

    // MARK: the driver broke a rule (seen by the device)

    /// avail.idx advanced by more than the queue size (or moved backwards).
    case availIndexBeyondQueueSize(lastSeen: UInt16, published: UInt16, queueSize: UInt16)
    /// An avail ring entry names a descriptor outside the table.
    case availHeadOutOfRange(head: UInt16, queueSize: UInt16)
    /// The chain visits more descriptors than the table holds (a loop, or too long).
    case chainTooLong(head: UInt16, limit: Int)
    /// A `next` field points outside the (direct or indirect) table.
    case descriptorNextOutOfRange(head: UInt16, next: UInt16, tableSize: Int)
    /// A descriptor's buffer is not inside the shared memory.
    case descriptorAddressInvalid(head: UInt16, TranslationError)
    /// A device-readable descriptor follows a device-writable one.
    case readableAfterWritable(head: UInt16)
    /// An indirect descriptor inside an indirect table.
    case nestedIndirect(head: UInt16)
    /// An indirect descriptor although VIRTIO_F_INDIRECT_DESC was not negotiated.
    case indirectNotNegotiated(head: UInt16)
    /// An indirect descriptor that also has NEXT set.
    case indirectWithNext(head: UInt16)
    /// An indirect table whose length is 0, not a multiple of 16, or larger than allowed.
    case indirectTableLength(head: UInt16, length: UInt32)
    /// The chain's total length does not fit the 32-bit used length.
    case chainLengthOverflow(head: UInt16)

    // MARK: packed ring (virtio 1.x §2.8), either side

    /// Driver: the descriptor at the next used slot carries AVAIL/USED bits that are
    /// neither what the driver wrote there nor a used mark of the current lap (a used mark
    /// with the wrong wrap counter, or half of one).
    case packedUsedWrapCounter(slot: UInt16, flags: UInt16, wrap: Bool)
    /// Driver: a used mark in a slot the driver has not made available (nothing in flight
    /// there): the device completes something that was never posted.
    case packedUsedSlotNotAvailable(slot: UInt16)
    /// Either side: the peer's event suppression structure has unknown flags (3), DESC
    /// without VIRTIO_F_RING_EVENT_IDX, or an offset outside the ring.
    case packedEventSuppressionInvalid(flags: UInt16, offWrap: UInt16, queueSize: UInt16)
    /// Device: the next slot carries a used mark of the current lap, which only the
    /// device may write (the driver forged it, or overran the ring).
    case packedAvailFlagsInvalid(slot: UInt16, flags: UInt16)
    /// Device: a chain continues (NEXT) into a slot the driver has not made available;
    /// its extent is unknown, so the queue cannot go on.
    case packedChainIncomplete(slot: UInt16)
    /// Device: the buffer id of a chain is not below the queue size.
    case packedBufferIdOutOfRange(id: UInt16, queueSize: UInt16)
    /// Device: the buffer id is already in flight (completing it would be ambiguous).
    case packedBufferIdInFlight(id: UInt16)

    // MARK: the layer above

    /// The queue was stopped by the layer above it (a device-class rule, a timeout): the
    /// reason is that layer's own error; the ring only records that it is broken (R6).
    case brokenAbove(rule: Rule, reason: String)

    /// The rule this check enforces.
    public var rule: Rule {
        switch self {
        case .usedIndexBeyondInFlight, .usedIndexWentBackwards, .usedIdOutOfRange,
            .usedIdNotInFlight, .usedLengthTooLarge, .availIndexBeyondQueueSize,
            .availHeadOutOfRange, .readableAfterWritable, .nestedIndirect,
            .indirectNotNegotiated, .indirectWithNext, .indirectTableLength,
            .descriptorNextOutOfRange:
            return .r3
        case .packedUsedWrapCounter, .packedUsedSlotNotAvailable, .packedEventSuppressionInvalid,
            .packedAvailFlagsInvalid, .packedChainIncomplete, .packedBufferIdOutOfRange,
            .packedBufferIdInFlight:
            return .r3
        case .descriptorAddressInvalid: return .r7
        case .chainLengthOverflow: return .r4
        case .brokenAbove(let rule, _): return rule
        case .deadlineExceeded, .notificationStorm, .chainTooLong, .notifierBlocked: return .r5
        }
    }

    /// The check that failed, without the rule prefix.
    public var detail: String {
        switch self {
        case .usedIndexBeyondInFlight(let last, let new, let n):
            return "used.idx jumped from \(last) to \(new) with only \(n) requests in flight"
        case .usedIndexWentBackwards(let last, let new):
            return "used.idx went backwards from \(last) to \(new)"
        case .usedIdOutOfRange(let id, let size):
            return "used id \(id) is outside the queue of \(size) descriptors"
        case .usedIdNotInFlight(let id):
            return "used id \(id) is not the head of an in-flight request"
        case .usedLengthTooLarge(let id, let len, let writable):
            return "used len \(len) for id \(id) exceeds the \(writable) writable bytes posted"
        case .deadlineExceeded(let ms):
            return "device did not complete within \(ms) ms"
        case .notificationStorm(let n):
            return "device sent \(n) notifications without completing work"
        case .notifierBlocked(let role):
            return "the peer made a write to the shared \(role) eventfd block (O_NONBLOCK cleared, counter saturated)"
        case .availIndexBeyondQueueSize(let last, let new, let size):
            return "avail.idx jumped from \(last) to \(new), more than the queue size \(size)"
        case .availHeadOutOfRange(let head, let size):
            return "avail ring names descriptor \(head), outside the queue of \(size)"
        case .chainTooLong(let head, let limit):
            return "descriptor chain at \(head) is longer than \(limit) (loop?)"
        case .descriptorNextOutOfRange(let head, let next, let size):
            return "chain at \(head): next \(next) is outside the table of \(size)"
        case .descriptorAddressInvalid(let head, let error):
            return "chain at \(head): \(error)"
        case .readableAfterWritable(let head):
            return "chain at \(head): device-readable descriptor after a writable one"
        case .nestedIndirect(let head):
            return "chain at \(head): nested indirect descriptor"
        case .indirectNotNegotiated(let head):
            return "chain at \(head): indirect descriptor without VIRTIO_F_INDIRECT_DESC"
        case .indirectWithNext(let head):
            return "chain at \(head): indirect descriptor with NEXT set"
        case .indirectTableLength(let head, let len):
            return "chain at \(head): indirect table length \(len) is invalid"
        case .chainLengthOverflow(let head):
            return "chain at \(head): total length exceeds 2^32-1"
        case .packedUsedWrapCounter(let slot, let flags, let wrap):
            return
                "packed slot \(slot): flags 0x\(String(flags, radix: 16)) are no used mark for wrap counter \(wrap ? 1 : 0)"
        case .packedUsedSlotNotAvailable(let slot):
            return "packed slot \(slot) marked used but the driver never made it available"
        case .packedEventSuppressionInvalid(let flags, let offWrap, let size):
            return
                "packed event suppression flags \(flags) off_wrap 0x\(String(offWrap, radix: 16)) invalid for a ring of \(size)"
        case .packedAvailFlagsInvalid(let slot, let flags):
            return "packed slot \(slot): flags 0x\(String(flags, radix: 16)) carry a used mark the driver may not write"
        case .packedChainIncomplete(let slot):
            return "packed chain continues into slot \(slot), which is not available"
        case .packedBufferIdOutOfRange(let id, let size):
            return "packed buffer id \(id) is outside the queue of \(size)"
        case .packedBufferIdInFlight(let id):
            return "packed buffer id \(id) is already in flight"
        case .brokenAbove(_, let reason):
            return reason

        }
    }
}

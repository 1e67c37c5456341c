import SharedMemory

/// Notification suppression of a split ring, for both sides: the driver publishes avail.idx
/// and reads the device's used.flags / avail_event, the device the mirror image. The full
/// fence between publishing and reading is what `Models/notify.pml` shows is needed.
enum SplitEvents {
    /// VRING_AVAIL_F_NO_INTERRUPT and VRING_USED_F_NO_NOTIFY: the same bit of each side's flags.
    static let suppressBit: UInt16 = 1

    /// Publishes our index (release store) after moving it from `old` to `new`, and says
    /// whether the peer wants a notification: by its event index with EVENT_IDX, else by
    /// the suppress bit of its flags.
    @inline(__always)
    static func publish(
        index: UnsafeMutableRawPointer, new: UInt16, old: UInt16, eventIndex: Bool,
        peerEvent: UnsafeMutableRawPointer, peerFlags: UnsafeMutableRawPointer
    ) -> Bool {
        SharedAccess.store16Release(index, new)
        SharedAccess.fullFence()
        if eventIndex {
            return SplitLayout.needEvent(event: SharedAccess.load16(peerEvent), new: new, old: old)
        }
        return SharedAccess.load16(peerFlags) & suppressBit == 0
    }

    /// Asks the peer to stop notifying (a hint): without EVENT_IDX, sets our "no notify"
    /// bit (with it, not moving our event index has the same effect).
    @inline(__always)
    static func disable(eventIndex: Bool, flags: inout UInt16, at ourFlags: UnsafeMutableRawPointer) {
        guard !eventIndex else { return }
        flags |= suppressBit
        SharedAccess.store16(ourFlags, flags)
    }

    /// Asks for a notification once the peer's index passes `position`, then (after a full
    /// fence) says whether it already has: poll again before sleeping, or the wake-up is lost.
    @inline(__always)
    static func enable(
        eventIndex: Bool, position: UInt16, ourEvent: UnsafeMutableRawPointer, flags: inout UInt16,
        at ourFlags: UnsafeMutableRawPointer, peerIndex: UnsafeMutableRawPointer
    ) -> Bool {
        if eventIndex {
            SharedAccess.store16(ourEvent, position)
        } else if flags & suppressBit != 0 {
            flags &= ~suppressBit
            SharedAccess.store16(ourFlags, flags)
        }
        SharedAccess.fullFence()
        return SharedAccess.load16Acquire(peerIndex) != position
    }
}

/// Notification suppression of a packed ring, for both sides: each side writes its own
/// event suppression area and reads the peer's once, as one 32-bit snapshot (R2).
enum PackedEvents {
    enum Decision {
        case notify(Bool)
        /// The peer's area holds flags 3, DESC without EVENT_IDX, or an offset outside the ring.
        case invalid(Violation)
    }

    /// After publishing a move of our ring position from `old` to `new` (`wrap` its current
    /// wrap counter): a full fence, then the peer's area, read once and checked (R3).
    @inline(__always)
    static func peerWants(
        area: UnsafeMutableRawPointer, eventIndex: Bool, new: UInt16, old: UInt16, wrap: Bool, size: UInt16
    ) -> Decision {
        SharedAccess.fullFence()
        let snapshot = SharedAccess.load32(area)
        let flags = UInt16(truncatingIfNeeded: snapshot >> 16)
        let offWrap = UInt16(truncatingIfNeeded: snapshot)
        switch flags {
        case PackedLayout.eventFlagEnable: return .notify(true)
        case PackedLayout.eventFlagDisable: return .notify(false)
        case PackedLayout.eventFlagDescriptor where eventIndex && offWrap & 0x7fff < size:
            return .notify(PackedLayout.needEvent(offWrap: offWrap, wrap: wrap, new: new, old: old, size: size))
        default:
            return .invalid(.packedEventSuppressionInvalid(flags: flags, offWrap: offWrap, queueSize: size))
        }
    }

    /// Asks the peer not to notify (a hint).
    @inline(__always)
    static func disable(area: UnsafeMutableRawPointer) {
        SharedAccess.store16(area + PackedLayout.eventFlags, PackedLayout.eventFlagDisable)
    }

    /// Asks for a notification when the peer reaches `position` (EVENT_IDX) or at once; then,
    /// after a full fence, says whether the slot there already carries `mark` (poll again).
    @inline(__always)
    static func enable(
        area: UnsafeMutableRawPointer, eventIndex: Bool, position: RingPosition, ring: UnsafeMutableRawPointer,
        mark: UInt16
    ) -> Bool {
        if eventIndex {
            SharedAccess.store16(area + PackedLayout.eventOffWrap, position.offWrap)
            SharedAccess.store16(area + PackedLayout.eventFlags, PackedLayout.eventFlagDescriptor)
        } else {
            SharedAccess.store16(area + PackedLayout.eventFlags, PackedLayout.eventFlagEnable)
        }
        SharedAccess.fullFence()
        let flags = SharedAccess.load16Acquire(
            ring + Int(position.slot) * PackedLayout.descriptorSize + PackedLayout.descFlags)
        return flags & (PackedLayout.flagAvail | PackedLayout.flagUsed) == mark
    }
}

/// Batched publishing on a packed ring, for both sides: the flags of the first descriptor
/// written since the last publish are held back and written last (release), so the peer
/// sees the whole batch at once; later ones are written at once (release).
struct DeferredFlags {
    var slot: UInt16 = 0
    var flags: UInt16 = 0
    var isPending = false
    /// Slots our position moved since the last publish (Linux's num_added).
    var moved: UInt16 = 0

    /// Writes (or holds back) `flags` of `slot` in `ring`, and counts `slots` moved.
    @inline(__always)
    mutating func write(_ flags: UInt16, slot: UInt16, ring: UnsafeMutableRawPointer, slots: Int) {
        if isPending {
            SharedAccess.store16Release(ring + Int(slot) * PackedLayout.descriptorSize + PackedLayout.descFlags, flags)
        } else {
            self.slot = slot
            self.flags = flags
            isPending = true
        }
        moved &+= UInt16(truncatingIfNeeded: slots)
    }

    /// Writes the held-back flags; returns the slots moved since the last publish, or nil
    /// when there is nothing to publish.
    @inline(__always)
    mutating func publish(ring: UnsafeMutableRawPointer) -> UInt16? {
        guard isPending else { return nil }
        SharedAccess.store16Release(ring + Int(slot) * PackedLayout.descriptorSize + PackedLayout.descFlags, flags)
        isPending = false
        defer { moved = 0 }
        return moved
    }
}

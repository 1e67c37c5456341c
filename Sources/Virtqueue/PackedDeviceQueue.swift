public import SharedMemory

/// The hardened device side of a packed virtqueue (virtio 1.x §2.8), the mirror of
/// `PackedDriverQueue`.
///
/// Each driver-written descriptor is read once: flags first (acquire), then addr, len, id
/// (R2). A chain is bounded by the slots the driver may still fill (R5); every slot of it
/// must carry the available mark of its lap; its buffer id must be in range and not in
/// flight (R3); every buffer is translated through `GuestMemory` (R7). A chain whose
/// extent is known but whose content is bad is `.rejected` (complete it, go on); a chain
/// whose extent or id is unusable breaks the queue.
/// A chain of one direct descriptor `PackedDeviceQueue.nextBuffers` popped: its buffer
/// id (what completion takes), its bytes (translated, inside one region) and whether the
/// device may write them.
public struct PoppedBuffer: @unchecked Sendable {
    public let id: UInt16
    public let bytes: UnsafeMutableRawBufferPointer
    public let deviceWritable: Bool
}

public final class PackedDeviceQueue {
    /// Descriptors in the ring.
    public let queueSize: UInt16
    /// Negotiated ring features.
    public let features: RingFeatures
    let size: Int
    let ring: UnsafeMutableRawPointer
    let driverArea: UnsafeMutableRawPointer
    let deviceArea: UnsafeMutableRawPointer
    /// Most descriptors an indirect table may hold.
    public let indirectLimit: Int

    /// The private indices and counters, behind an owned pointer (the queues' one
    /// private-state idiom).
    struct State {
        /// Next slot to look at for an available chain, and its lap.
        var avail: RingPosition
        /// Next slot to write a used descriptor into, and its lap.
        var used: RingPosition
        /// Slots popped and not yet completed.
        var outstanding = 0
        /// The first used descriptor's flags since the last publish, held back.
        var pending = DeferredFlags()
        /// With VIRTIO_F_IN_ORDER: buffers completed unwritten since the last used
        /// descriptor, not yet written (`completeUnwritten`): the run's first slot, its
        /// last buffer id, and the slots it spans (0: no run).
        var runStart = RingPosition(slot: 0, wrap: true)
        var runID: UInt16 = 0
        var runSlots = 0
        var health = QueueHealth()
    }

    let state: UnsafeMutablePointer<State>
    /// Per buffer id: ring slots of the chain in flight (0: not in flight). `size` entries;
    /// indexed only by ids already checked `< size`.
    let chainSlots: UnsafeMutablePointer<UInt16>

    /// Next slot the device looks at for an available descriptor.
    public var nextAvail: UInt16 { state.pointee.avail.slot }
    /// Wrap counter of `nextAvail`.
    public var availWrap: Bool { state.pointee.avail.wrap }
    /// Next slot the device writes a used descriptor into.
    public var usedIndex: UInt16 { state.pointee.used.slot }
    /// Wrap counter of `usedIndex`.
    public var usedWrap: Bool { state.pointee.used.wrap }

    /// The driver's first violation; the queue is broken from then on (R6).
    public var violation: Violation? { state.pointee.health.violation }
    /// True once a violation broke the queue.
    public var isBroken: Bool { state.pointee.health.broken }

    /// Sets up a queue on a ring announced by guest addresses (descriptor ring, driver
    /// area, device area). `base` is the vring base (`PackedLayout.decodeBase`).
    public convenience init(
        queueSize: Int, ringAddress: UInt64, driverAreaAddress: UInt64, deviceAreaAddress: UInt64,
        features: RingFeatures, memory: GuestMemory, base: UInt32 = 0x8000_8000, indirectLimit: Int? = nil
    ) throws(RingSetupError) {
        try self.init(
            queueSize: queueSize, features: features, base: base,
            translate: { (a, l) throws(TranslationError) in try memory.translate(a, length: l) },
            addresses: (ringAddress, driverAreaAddress, deviceAreaAddress), indirectLimit: indirectLimit)
    }

    /// The same, for rings announced by vhost-user "user" addresses.
    public convenience init(
        queueSize: Int, userRingAddress: UInt64, userDriverAreaAddress: UInt64, userDeviceAreaAddress: UInt64,
        features: RingFeatures, memory: GuestMemory, base: UInt32 = 0x8000_8000, indirectLimit: Int? = nil
    ) throws(RingSetupError) {
        try self.init(
            queueSize: queueSize, features: features, base: base,
            translate: { (a, l) throws(TranslationError) in try memory.translateUser(a, length: l) },
            addresses: (userRingAddress, userDriverAreaAddress, userDeviceAreaAddress), indirectLimit: indirectLimit)
    }

    init(
        queueSize: Int, features: RingFeatures, base: UInt32,
        translate: (UInt64, UInt64) throws(TranslationError) -> UnsafeMutableRawBufferPointer,
        addresses: (UInt64, UInt64, UInt64), indirectLimit: Int?
    ) throws(RingSetupError) {
        guard PackedLayout.isValidQueueSize(queueSize) else { throw .invalidQueueSize(queueSize) }
        func part(_ name: String, _ address: UInt64, _ size: Int, _ align: UInt64) throws(RingSetupError)
            -> UnsafeMutableRawPointer
        {
            try translateRingPart(name, address: address, size: size, alignment: align, translate: translate)
        }
        ring = try part("descriptor ring", addresses.0, PackedLayout.ringSize(queueSize), 16)
        driverArea = try part("driver area", addresses.1, PackedLayout.eventAreaSize, 4)
        deviceArea = try part("device area", addresses.2, PackedLayout.eventAreaSize, 4)
        self.queueSize = UInt16(truncatingIfNeeded: queueSize)
        self.size = queueSize
        self.features = features
        self.indirectLimit = max(queueSize, min(indirectLimit ?? 0, PackedLayout.maximumQueueSize))
        let b = PackedLayout.decodeBase(base)
        // A base outside the ring is clamped to its start (it only positions our reads).
        state = .owned(
            State(
                avail: RingPosition(slot: Int(b.avail) < queueSize ? b.avail : 0, wrap: b.availWrap),
                used: RingPosition(slot: Int(b.used) < queueSize ? b.used : 0, wrap: b.usedWrap)))
        chainSlots = .allocate(capacity: queueSize)
        chainSlots.initialize(repeating: 0, count: queueSize)
    }

    deinit {
        state.release()
        chainSlots.deallocate()
    }

    /// What GET_VRING_BASE reports (QEMU's encoding, wrap counters in bits 15 and 31).
    public var vringBase: UInt32 {
        PackedLayout.encodeBase(avail: nextAvail, availWrap: availWrap, used: usedIndex, usedWrap: usedWrap)
    }

    @inline(__always)
    func descriptor(_ slot: Int) -> UnsafeMutableRawPointer { ring + slot * PackedLayout.descriptorSize }

    private func fail(_ v: Violation) -> Violation { state.pointee.health.fail(v) }

    /// Pops the next available chain into `chain`, validating it completely. `chain.head`
    /// is the buffer id (what `complete(head:length:)` takes).
    public func nextChain(into chain: inout DescriptorChain, memory: GuestMemory) throws(Violation) -> ChainFetch {
        if state.pointee.health.broken { throw state.pointee.health.sticky }
        var position = state.pointee.avail
        let start = position.slot
        var untrustedFlags = SharedAccess.load16Acquire(descriptor(Int(start)) + PackedLayout.descFlags)
        let mark = untrustedFlags & (PackedLayout.flagAvail | PackedLayout.flagUsed)
        if mark != PackedLayout.availableMarker(wrap: position.wrap) {
            if mark == PackedLayout.usedMarker(wrap: position.wrap) {
                throw fail(.packedAvailFlagsInvalid(slot: start, flags: untrustedFlags))
            }
            return .empty
        }
        // The driver may fill only the slots it got back: more is an overrun.
        let limit = size - state.pointee.outstanding
        guard limit > 0 else { throw fail(.packedAvailFlagsInvalid(slot: start, flags: untrustedFlags)) }
        if untrustedFlags & (PackedLayout.flagNext | PackedLayout.flagIndirect) == 0 {
            return try nextSingle(at: position, flags: untrustedFlags, into: &chain, memory: memory)
        }
        chain.reset(head: 0)
        var count = 0
        var rejection: Violation?
        var walker = ChainWalker(head: start, features: features, indirectLimit: indirectLimit)
        var untrustedID: UInt16 = 0
        while true {
            count += 1
            guard count <= limit else { throw fail(.chainTooLong(head: start, limit: limit)) }
            let d = descriptor(Int(position.slot))
            if count > 1 {
                untrustedFlags = SharedAccess.load16Acquire(d + PackedLayout.descFlags)
                guard
                    untrustedFlags & (PackedLayout.flagAvail | PackedLayout.flagUsed)
                        == PackedLayout.availableMarker(wrap: position.wrap)
                else { throw fail(.packedChainIncomplete(slot: position.slot)) }
            }
            // One load per field, into locals; never looked at again (R2).
            let untrustedAddress = SharedAccess.load64(d + PackedLayout.descAddr)
            let untrustedLength = SharedAccess.load32(d + PackedLayout.descLen)
            untrustedID = SharedAccess.load16(d + PackedLayout.descID)
            if rejection == nil {
                rejection = walker.ringDescriptor(
                    address: untrustedAddress, length: untrustedLength, flags: untrustedFlags, into: &chain,
                    memory: memory)
            }
            position.advance(by: 1, size: size)
            if untrustedFlags & PackedLayout.flagNext == 0 { break }
        }
        // The buffer id sits in the last descriptor.
        guard Int(untrustedID) < size else {
            throw fail(.packedBufferIdOutOfRange(id: untrustedID, queueSize: queueSize))
        }
        let id = untrustedID
        guard chainSlots[Int(id)] == 0 else { throw fail(.packedBufferIdInFlight(id: id)) }
        chainSlots[Int(id)] = UInt16(truncatingIfNeeded: count)
        state.pointee.outstanding += count
        state.pointee.avail = position
        chain.head = id
        if let rejection { return .rejected(head: id, rejection) }
        return .ready
    }

    /// A chain of one direct descriptor at `position` (its flags already loaded and
    /// checked): what `nextChain` does for it, without a walk. Each field loaded once (R2).
    @inline(__always)
    func nextSingle(
        at position: RingPosition, flags untrustedFlags: UInt16, into chain: inout DescriptorChain,
        memory: GuestMemory
    ) throws(Violation) -> ChainFetch {
        let d = descriptor(Int(position.slot))
        let untrustedAddress = SharedAccess.load64(d + PackedLayout.descAddr)
        let untrustedLength = SharedAccess.load32(d + PackedLayout.descLen)
        let untrustedID = SharedAccess.load16(d + PackedLayout.descID)
        guard Int(untrustedID) < size else {
            throw fail(.packedBufferIdOutOfRange(id: untrustedID, queueSize: queueSize))
        }
        let id = untrustedID
        guard chainSlots[Int(id)] == 0 else { throw fail(.packedBufferIdInFlight(id: id)) }
        let rejection = ChainWalker.single(
            head: id, name: position.slot, address: untrustedAddress, length: untrustedLength,
            writable: untrustedFlags & PackedLayout.flagWrite != 0, features: features, indirectLimit: indirectLimit,
            into: &chain, memory: memory)
        chainSlots[Int(id)] = 1
        state.pointee.outstanding += 1
        var next = position
        next.advance(by: 1, size: size)
        state.pointee.avail = next
        if let rejection { return .rejected(head: id, rejection) }
        return .ready
    }

    /// Pops up to `capacity` chains of one direct descriptor each (what a net driver posts
    /// per frame) into `out`, checked as `nextChain` checks them, and returns how many. It
    /// stops before the first slot that is not available, or starts a chain of more than
    /// one descriptor or an indirect one, or whose buffer does not lie in one region
    /// (unmapped, straddling): `nextChain` then takes that slot, with the same outcome it
    /// always has. Breaks the queue on what `nextChain` breaks it for: a buffer id out of
    /// range or in flight (thrown at once if nothing was popped before it, else the
    /// buffers before it are returned and the next call throws), a used mark written by
    /// the driver or a slot available beyond what the driver may fill (both left to the
    /// `nextChain` call that follows the stop).
    ///
    /// The fast path of DPDK's vhost (`virtio_dev_tx_batch_packed`): when four slots lie in
    /// this lap, their four flags are loaded and tested together, then one acquire fence
    /// orders them before the other fields. Each field of each descriptor is still loaded
    /// once, into a local, and each checked (id in range, not in flight, marked in flight
    /// before the next id is looked at); buffers are translated against the region the
    /// previous one lay in, with the bounds test `GuestMemory.translate` makes, and through
    /// `GuestMemory` on a miss. A descriptor whose buffer does not translate is left in
    /// the ring unpopped: its fields were loaded but decided nothing, and `nextChain` loads
    /// and checks them afresh.
    public func nextBuffers(
        into out: UnsafeMutablePointer<PoppedBuffer>, capacity: Int, memory: GuestMemory
    ) throws(Violation) -> Int {
        let s = state
        if s.pointee.health.broken { throw s.pointee.health.sticky }
        let slots = chainSlots
        let size = self.size
        var position = s.pointee.avail
        // The driver may fill only the slots it got back (nextChain reports the overrun).
        let room = min(capacity, size - s.pointee.outstanding)
        let shape = PackedLayout.flagAvail | PackedLayout.flagUsed | PackedLayout.flagNext | PackedLayout.flagIndirect
        var window = RegionWindow()
        var violation: Violation?
        var n = 0
        batches: while n < room {
            let marker = PackedLayout.availableMarker(wrap: position.wrap)
            let first = Int(position.slot)
            let d = descriptor(first)
            // Each slot's flags loaded once; `group`: how many leading slots are available
            // chains of one direct descriptor; bit k of `writeBits`: slot k's WRITE.
            let group: Int
            let writeBits: UInt16
            if room - n >= 4 && first + 4 <= size {
                let f0 = SharedAccess.load16(d + PackedLayout.descFlags)
                let f1 = SharedAccess.load16(d + PackedLayout.descriptorSize + PackedLayout.descFlags)
                let f2 = SharedAccess.load16(d + 2 * PackedLayout.descriptorSize + PackedLayout.descFlags)
                let f3 = SharedAccess.load16(d + 3 * PackedLayout.descriptorSize + PackedLayout.descFlags)
                SharedAccess.acquireFence()
                // Parenthesised: `^` and `|` share a precedence level in Swift.
                if ((f0 & shape) ^ marker) | ((f1 & shape) ^ marker) | ((f2 & shape) ^ marker)
                    | ((f3 & shape) ^ marker) == 0
                {
                    group = 4
                } else if f0 & shape != marker {
                    break batches
                } else if f1 & shape != marker {
                    group = 1
                } else {
                    group = f2 & shape != marker ? 2 : 3
                }
                let w = PackedLayout.flagWrite
                writeBits = (f0 & w) >> 1 | (f1 & w) | (f2 & w) << 1 | (f3 & w) << 2
            } else {
                let f = SharedAccess.load16Acquire(d + PackedLayout.descFlags)
                guard f & shape == marker else { break batches }
                group = 1
                writeBits = (f & PackedLayout.flagWrite) >> 1
            }
            for k in 0..<group {
                let e = d + k * PackedLayout.descriptorSize
                // One load per field, into locals; never looked at again (R2).
                let untrustedAddress = SharedAccess.load64(e + PackedLayout.descAddr)
                let untrustedLength = SharedAccess.load32(e + PackedLayout.descLen)
                let untrustedID = SharedAccess.load16(e + PackedLayout.descID)
                let length = UInt64(untrustedLength)
                var translated = window.translate(untrustedAddress, length: length)
                if translated == nil {
                    window = memory.window(containing: untrustedAddress)
                    translated = window.translate(untrustedAddress, length: length)
                }
                guard let bytes = translated else { break batches }
                guard Int(untrustedID) < size else {
                    violation = fail(.packedBufferIdOutOfRange(id: untrustedID, queueSize: queueSize))
                    break batches
                }
                let id = untrustedID
                guard slots[Int(id)] == 0 else {
                    violation = fail(.packedBufferIdInFlight(id: id))
                    break batches
                }
                slots[Int(id)] = 1
                (out + n).initialize(
                    to: PoppedBuffer(
                        id: id, bytes: bytes,
                        deviceWritable: writeBits >> k & 1 != 0))
                n += 1
                position.advance(by: 1, size: size)
            }
        }
        s.pointee.outstanding += n
        s.pointee.avail = position
        // Buffers popped before a violation are returned, to be completed; the broken
        // queue throws at the next call.
        if let violation, n == 0 { throw violation }
        return n
    }

    /// `completeUnwritten(head:)` for each of `count` buffers `nextBuffers` popped, in
    /// order: with VIRTIO_F_IN_ORDER they join the pending run (one used descriptor).
    public func completeUnwritten(_ buffers: UnsafePointer<PoppedBuffer>, count: Int) {
        guard count > 0 else { return }
        guard features.inOrder else {
            for i in 0..<count { complete(head: buffers[i].id, length: 0) }
            return
        }
        var released = 0
        for i in 0..<count { released += release(buffers[i].id) }
        extendRun(last: buffers[count - 1].id, slots: released)
    }

    /// Forgets buffer `id`'s chain; the slots it took (1 for an id not in flight).
    @inline(__always)
    func release(_ id: UInt16) -> Int {
        guard Int(id) < size, chainSlots[Int(id)] != 0 else { return 1 }
        let slots = Int(chainSlots[Int(id)])
        chainSlots[Int(id)] = 0
        state.pointee.outstanding -= slots
        return slots
    }

    /// Records that buffer `id` is done with `length` bytes written: one used descriptor,
    /// then the used position skips the chain's slots. Visible at `publishUsed()`.
    public func complete(head id: UInt16, length: UInt32) {
        if state.pointee.runSlots > 0 { writeRun() }
        writeUsed(id, length: length, slots: release(id))
    }

    /// `complete(head: id, length: 0)`, but with VIRTIO_F_IN_ORDER a run of such buffers
    /// gets one used descriptor, at the run's first slot with its last buffer id (virtio
    /// 1.2 §2.8.20: the driver frees every buffer up to that id), written when another
    /// completion or `publishUsed()` ends the run. Only for buffers whose used length the
    /// driver ignores: a driver's receive path may read every used descriptor.
    public func completeUnwritten(head id: UInt16) {
        guard features.inOrder else { return complete(head: id, length: 0) }
        extendRun(last: id, slots: release(id))
    }

    /// Adds `slots` ring slots, ending with buffer `id`, to the pending in-order run (one
    /// used descriptor, written by `writeRun`).
    @inline(__always)
    func extendRun(last id: UInt16, slots: Int) {
        if state.pointee.runSlots == 0 { state.pointee.runStart = state.pointee.used }
        state.pointee.runID = id
        state.pointee.runSlots += slots
        state.pointee.used.advance(by: slots, size: size)
    }

    /// Writes the pending run's one used descriptor.
    func writeRun() {
        let slots = state.pointee.runSlots
        state.pointee.runSlots = 0
        let start = state.pointee.runStart
        let d = descriptor(Int(start.slot))
        SharedAccess.store32(d + PackedLayout.descLen, 0)
        SharedAccess.store16(d + PackedLayout.descID, state.pointee.runID)
        state.pointee.pending.write(
            PackedLayout.usedMarker(wrap: start.wrap), slot: start.slot, ring: ring, slots: slots)
    }

    /// One used descriptor for buffer `id` at the used position, which moves on by `slots`.
    @inline(__always)
    func writeUsed(_ id: UInt16, length: UInt32, slots: Int) {
        let used = state.pointee.used
        let d = descriptor(Int(used.slot))
        SharedAccess.store32(d + PackedLayout.descLen, length)
        SharedAccess.store16(d + PackedLayout.descID, id)
        let flags = PackedLayout.usedMarker(wrap: used.wrap) | (length > 0 ? PackedLayout.flagWrite : 0)
        state.pointee.pending.write(flags, slot: used.slot, ring: ring, slots: slots)
        state.pointee.used.advance(by: slots, size: size)
    }

    /// Publishes completions and says whether the driver wants an interrupt. The driver
    /// area is read once, as one 32-bit snapshot, after a full fence; garbage there
    /// breaks the queue (R3) but the interrupt is still sent.
    public func publishUsed() -> Bool {
        if state.pointee.runSlots > 0 { writeRun() }
        guard let moved = state.pointee.pending.publish(ring: ring) else { return false }
        let used = state.pointee.used
        switch PackedEvents.peerWants(
            area: driverArea, eventIndex: features.eventIndex, new: used.slot, old: used.slot &- moved,
            wrap: used.wrap, size: queueSize)
        {
        case .notify(let wanted): return wanted
        case .invalid(let v):
            _ = fail(v)
            return true
        }
    }

    /// Asks the driver not to kick (a hint).
    public func disableNotifications() { PackedEvents.disable(area: deviceArea) }

    /// Asks for a kick at the next available slot. Returns true if work may already be
    /// available (poll again before sleeping).
    public func enableNotifications() -> Bool {
        let avail = state.pointee.avail
        return PackedEvents.enable(
            area: deviceArea, eventIndex: features.eventIndex, position: avail, ring: ring,
            mark: PackedLayout.availableMarker(wrap: avail.wrap))
    }

    /// Breaks the queue on behalf of a caller (a device-level protocol violation).
    public func breakQueue(_ v: Violation) {
        _ = fail(v)
    }
}

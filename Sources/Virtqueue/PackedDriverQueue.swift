import SharedMemory

/// The hardened driver side of a packed virtqueue (virtio 1.x §2.8).
///
/// The device writes used descriptors back into the ring the driver writes, so:
/// - R1: the driver never reads a descriptor it wrote; per buffer id it keeps the token,
///   the device-writable length and the number of ring slots, in private memory.
/// - R2: each used descriptor is read once: flags first (acquire), then id and len into
///   locals; the device's event suppression area as one 32-bit snapshot.
/// - R3: the AVAIL/USED bits must be a used mark of the driver's used wrap counter (or
///   still the driver's own available mark), the id in range and in flight, the length
///   at most what was posted. The driver advances by the private slot count of the id,
///   never by anything the device wrote.
/// - R6: the first violation makes the queue `broken` until `reset()`.
///
/// Publishing is batched as in the split ring: the flags of the first chain added since
/// the last `publish()` are written last, so the device sees nothing before it.
/// Not thread-safe: one owner at a time.
public final class PackedDriverQueue {
    struct Buffer {
        var token: UInt64 = 0
        var writable: UInt64 = 0
        /// Ring slots the chain occupies (1 when indirect).
        var slots: UInt16 = 0
        /// Next free id while free.
        var nextFree: UInt16 = 0
        var active = false
    }

    struct State {
        /// Next ring slot to fill, and the wrap counter of that lap.
        var nextAvail: UInt16 = 0
        var availWrap = true
        /// Next ring slot to look at for a used descriptor, and its lap.
        var lastUsed: UInt16 = 0
        var usedWrap = true
        var freeSlots = 0
        var freeIDHead: UInt16 = 0
        var freeIDs = 0
        var inFlightCount = 0
        /// Head flags of the first chain added since the last publish (written there).
        var pendingSlot: UInt16 = 0
        var pendingFlags: UInt16 = 0
        var hasPending = false
        /// Slots added since the last publish (Linux's num_added).
        var added: UInt16 = 0
        var broken = false
        var indirectThreshold = 1
    }

    public let memory: DriverRingMemory
    public let features: RingFeatures
    public let queueSize: UInt16
    let size: Int
    let buffers: UnsafeMutablePointer<Buffer>
    let state: UnsafeMutablePointer<State>

    public private(set) var violation: Violation?
    public var isBroken: Bool { state.pointee.broken }
    /// Free ring slots.
    public var freeCount: Int { state.pointee.freeSlots }
    public var inFlightCount: Int { state.pointee.inFlightCount }
    /// Next slot the driver looks at for a used descriptor, and its wrap counter.
    public var lastUsed: (slot: UInt16, wrap: Bool) { (state.pointee.lastUsed, state.pointee.usedWrap) }
    /// Next slot the driver fills, and its wrap counter.
    public var nextAvail: (slot: UInt16, wrap: Bool) { (state.pointee.nextAvail, state.pointee.availWrap) }

    public var indirectThreshold: Int {
        get { state.pointee.indirectThreshold }
        set { state.pointee.indirectThreshold = newValue }
    }

    /// Takes over a ring whose memory was zeroed. `memory.descriptors` is the descriptor
    /// ring, `memory.avail` the driver area, `memory.used` the device area.
    public init(memory: DriverRingMemory, features: RingFeatures) {
        self.memory = memory
        self.features = features
        self.queueSize = memory.queueSize
        size = Int(memory.queueSize)
        buffers = .allocate(capacity: max(size, 1))
        state = .allocate(capacity: 1)
        buffers.initialize(repeating: Buffer(), count: max(size, 1))
        state.initialize(to: State())
        resetPrivate(threshold: 1)
    }

    deinit {
        buffers.deallocate()
        state.deallocate()
    }

    private func resetPrivate(threshold: Int) {
        for i in 0..<max(size, 1) {
            buffers[i] = Buffer(nextFree: UInt16(truncatingIfNeeded: i + 1))
        }
        state.pointee = State(freeSlots: size, freeIDs: size, indirectThreshold: threshold)
    }

    /// Forgets everything and zeroes the shared ring, as after a device reset.
    public func reset() {
        memory.descriptors.initializeMemory(as: UInt8.self, repeating: 0, count: PackedLayout.ringSize(size))
        memory.avail.initializeMemory(as: UInt8.self, repeating: 0, count: PackedLayout.eventAreaSize)
        memory.used.initializeMemory(as: UInt8.self, repeating: 0, count: PackedLayout.eventAreaSize)
        resetPrivate(threshold: state.pointee.indirectThreshold)
        violation = nil
    }

    /// Slots and ids used as indices are private, or a device value already checked
    /// `< size` (the packed ring need not be a power of two, so there is no mask).
    @inline(__always)
    func descriptor(_ slot: UInt16) -> UnsafeMutableRawPointer {
        memory.descriptors + (Int(slot)) * PackedLayout.descriptorSize
    }

    // MARK: posting

    /// Posts one request (visible to the device at the next `publish()`). Device-readable
    /// segments must precede device-writable ones. Returns the buffer id.
    @discardableResult
    public func add(_ segments: UnsafeBufferPointer<Segment>, token: UInt64) throws(SubmitError) -> UInt16 {
        if state.pointee.broken, let violation { throw .broken(violation) }
        let count = segments.count
        guard count > 0 else { throw .emptyChain }
        let useIndirect =
            features.indirectDescriptors && memory.indirect != nil && count > state.pointee.indirectThreshold
            && count <= memory.indirectTableEntries
        let needed = useIndirect ? 1 : count
        guard needed <= size else { throw .tooManySegments(count) }
        guard needed <= state.pointee.freeSlots, state.pointee.freeIDs > 0 else { throw .full }

        let id = state.pointee.freeIDHead
        state.pointee.freeIDHead = buffers[Int(id)].nextFree
        state.pointee.freeIDs -= 1
        let headSlot = state.pointee.nextAvail
        var slot = headSlot
        var wrap = state.pointee.availWrap
        var headFlags: UInt16 = 0
        var writable: UInt64 = 0
        if useIndirect, let table = memory.indirect {
            let tableOffset = Int(id) * memory.indirectTableEntries * PackedLayout.descriptorSize
            let base = table + tableOffset
            for i in 0..<count {
                let s = segments[i]
                if s.deviceWritable { writable &+= UInt64(s.length) }
                let e = base + i * PackedLayout.descriptorSize
                SharedAccess.store64(e + PackedLayout.descAddr, s.address)
                SharedAccess.store32(e + PackedLayout.descLen, s.length)
                SharedAccess.store16(e + PackedLayout.descID, 0)
                SharedAccess.store16(e + PackedLayout.descFlags, s.deviceWritable ? PackedLayout.flagWrite : 0)
            }
            let d = descriptor(slot)
            SharedAccess.store64(d + PackedLayout.descAddr, memory.indirectGuestAddress &+ UInt64(tableOffset))
            SharedAccess.store32(
                d + PackedLayout.descLen, UInt32(truncatingIfNeeded: count * PackedLayout.descriptorSize))
            SharedAccess.store16(d + PackedLayout.descID, id)
            headFlags = PackedLayout.flagIndirect | PackedLayout.availableMarker(wrap: wrap)
            slot &+= 1
            if Int(slot) == size {
                slot = 0
                wrap.toggle()
            }
        } else {
            for i in 0..<count {
                let s = segments[i]
                var flags = PackedLayout.availableMarker(wrap: wrap)
                if i + 1 < count { flags |= PackedLayout.flagNext }
                if s.deviceWritable {
                    flags |= PackedLayout.flagWrite
                    writable &+= UInt64(s.length)
                }
                let d = descriptor(slot)
                SharedAccess.store64(d + PackedLayout.descAddr, s.address)
                SharedAccess.store32(d + PackedLayout.descLen, s.length)
                SharedAccess.store16(d + PackedLayout.descID, id)
                // The head's flags go last: they make the whole chain available.
                if i == 0 { headFlags = flags } else { SharedAccess.store16(d + PackedLayout.descFlags, flags) }
                slot &+= 1
                if Int(slot) == size {
                    slot = 0
                    wrap.toggle()
                }
            }
        }
        if state.pointee.hasPending {
            SharedAccess.store16Release(descriptor(headSlot) + PackedLayout.descFlags, headFlags)
        } else {
            state.pointee.pendingSlot = headSlot
            state.pointee.pendingFlags = headFlags
            state.pointee.hasPending = true
        }
        state.pointee.nextAvail = slot
        state.pointee.availWrap = wrap
        state.pointee.freeSlots -= needed
        state.pointee.added &+= UInt16(truncatingIfNeeded: needed)
        buffers[Int(id)] = Buffer(
            token: token, writable: writable, slots: UInt16(truncatingIfNeeded: needed), nextFree: 0, active: true)
        state.pointee.inFlightCount += 1
        return id
    }

    @discardableResult
    public func add(_ segments: [Segment], token: UInt64) throws(SubmitError) -> UInt16 {
        try segments.withUnsafeBufferPointer { (p) throws(SubmitError) in try add(p, token: token) }
    }

    /// Makes every added request visible (release store of the first head's flags) and
    /// says whether the device wants a kick. The device area is read once, as one 32-bit
    /// snapshot, after a full fence; garbage there breaks the queue (R3).
    public func publish() -> Bool {
        guard state.pointee.hasPending, !state.pointee.broken else { return false }
        SharedAccess.store16Release(
            descriptor(state.pointee.pendingSlot) + PackedLayout.descFlags, state.pointee.pendingFlags)
        state.pointee.hasPending = false
        let new = state.pointee.nextAvail
        let old = new &- state.pointee.added
        state.pointee.added = 0
        SharedAccess.fullFence()
        let snapshot = SharedAccess.load32(memory.used)
        let flags = UInt16(truncatingIfNeeded: snapshot >> 16)
        let offWrap = UInt16(truncatingIfNeeded: snapshot)
        switch flags {
        case PackedLayout.eventFlagEnable: return true
        case PackedLayout.eventFlagDisable: return false
        case PackedLayout.eventFlagDescriptor where features.eventIndex && Int(offWrap & 0x7fff) < size:
            return PackedLayout.needEvent(
                offWrap: offWrap, wrap: state.pointee.availWrap, new: new, old: old, size: queueSize)
        default:
            breakQueue(.packedEventSuppressionInvalid(flags: flags, offWrap: offWrap, queueSize: queueSize))
            return false
        }
    }

    // MARK: completions

    /// The next validated completion, or nil when the device has none for us now.
    @inline(__always)
    public func nextCompletion() throws(Violation) -> Completion? {
        if state.pointee.broken, let violation { throw violation }
        let slot = state.pointee.lastUsed
        let wrap = state.pointee.usedWrap
        // The first chain of an unpublished batch: its flags are not ours yet to judge.
        if state.pointee.hasPending && state.pointee.pendingSlot == slot { return nil }
        let d = descriptor(slot)
        let untrustedFlags = SharedAccess.load16Acquire(d + PackedLayout.descFlags)
        let mark = untrustedFlags & (PackedLayout.flagAvail | PackedLayout.flagUsed)
        let usedMark = PackedLayout.usedMarker(wrap: wrap)
        if state.pointee.inFlightCount == 0 {
            // Nothing was made available here in this lap: a used mark is a forgery.
            if mark == usedMark { throw breakQueue(.packedUsedSlotNotAvailable(slot: slot)) }
            return nil
        }
        guard mark == usedMark else {
            // In flight, so this slot holds our own available mark of this lap, or a used one.
            if mark == PackedLayout.availableMarker(wrap: wrap) { return nil }
            throw breakQueue(.packedUsedWrapCounter(slot: slot, flags: untrustedFlags, wrap: wrap))
        }
        let untrustedID = SharedAccess.load16(d + PackedLayout.descID)
        let untrustedLength = SharedAccess.load32(d + PackedLayout.descLen)
        guard Int(untrustedID) < size else {
            throw breakQueue(.usedIdOutOfRange(id: UInt32(untrustedID), queueSize: queueSize))
        }
        let id = untrustedID
        let record = buffers[Int(id)]
        guard record.active else { throw breakQueue(.usedIdNotInFlight(id: UInt32(id))) }
        guard UInt64(untrustedLength) <= record.writable else {
            throw breakQueue(
                .usedLengthTooLarge(id: UInt32(id), length: untrustedLength, writable: record.writable))
        }
        // Advance by our own count of the chain's slots (never by a device value).
        var next = Int(slot) + Int(record.slots)
        var nextWrap = wrap
        if next >= size {
            next -= size
            nextWrap.toggle()
        }
        state.pointee.lastUsed = UInt16(truncatingIfNeeded: next)
        state.pointee.usedWrap = nextWrap
        buffers[Int(id)].active = false
        buffers[Int(id)].nextFree = state.pointee.freeIDHead
        state.pointee.freeIDHead = id
        state.pointee.freeIDs += 1
        state.pointee.freeSlots += Int(record.slots)
        state.pointee.inFlightCount -= 1
        return Completion(token: record.token, head: id, length: untrustedLength)
    }

    /// Marks the queue broken. Idempotent: the first violation stays.
    @discardableResult
    public func breakQueue(_ v: Violation) -> Violation {
        if let violation { return violation }
        violation = v
        state.pointee.broken = true
        return v
    }

    /// After the queue broke: the tokens of every request still in flight. Their ids and
    /// slots stay quarantined until `reset()`.
    public func failAll() -> [UInt64] {
        var tokens: [UInt64] = []
        for i in 0..<size where buffers[i].active {
            tokens.append(buffers[i].token)
            buffers[i].active = false
        }
        state.pointee.inFlightCount = 0
        return tokens
    }

    public var inFlightTokens: [UInt64] {
        (0..<size).compactMap { buffers[$0].active ? buffers[$0].token : nil }
    }

    // MARK: interrupt suppression

    /// Asks the device not to interrupt (a hint).
    public func disableInterrupts() {
        SharedAccess.store16(memory.avail + PackedLayout.eventFlags, PackedLayout.eventFlagDisable)
    }

    /// Asks for an interrupt at the next used descriptor. Returns true if one may already
    /// be there (poll again before sleeping).
    public func enableInterrupts() -> Bool {
        let slot = state.pointee.lastUsed
        let wrap = state.pointee.usedWrap
        if features.eventIndex {
            SharedAccess.store16(
                memory.avail + PackedLayout.eventOffWrap, slot | (wrap ? PackedLayout.eventWrapBit : 0))
            SharedAccess.store16(memory.avail + PackedLayout.eventFlags, PackedLayout.eventFlagDescriptor)
        } else {
            SharedAccess.store16(memory.avail + PackedLayout.eventFlags, PackedLayout.eventFlagEnable)
        }
        SharedAccess.fullFence()
        let flags = SharedAccess.load16Acquire(descriptor(slot) + PackedLayout.descFlags)
        return flags & (PackedLayout.flagAvail | PackedLayout.flagUsed) == PackedLayout.usedMarker(wrap: wrap)
    }
}

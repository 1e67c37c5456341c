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
    /// The private indices and counters, behind an owned pointer (the queues' one
    /// private-state idiom).
    struct State {
        /// Next ring slot to fill, and the wrap counter of that lap.
        var avail = RingPosition(slot: 0, wrap: true)
        /// Next ring slot to look at for a used descriptor, and its lap.
        var used = RingPosition(slot: 0, wrap: true)
        var freeSlots = 0
        var freeIDHead: UInt16 = 0
        var freeIDs = 0
        var inFlightCount = 0
        /// Head flags of the first chain added since the last publish, held back.
        var pending = DeferredFlags()
        var indirectThreshold = 1
        /// Completions report length 0 whatever the device wrote (see `usedLengthIgnored`).
        var usedLengthIgnored = false
        var health = QueueHealth()
    }

    /// The ring's memory.
    public let memory: DriverRingMemory
    /// Negotiated ring features.
    public let features: RingFeatures
    /// Descriptors in the ring.
    public let queueSize: UInt16
    let size: Int
    /// Per buffer id: what was posted (token, writable bytes, ring slots), and the free ids.
    let buffers: InFlightTable
    let state: UnsafeMutablePointer<State>

    /// The device's first violation; the queue is broken from then on (R6).
    public var violation: Violation? { state.pointee.health.violation }
    /// True once a violation broke the queue.
    public var isBroken: Bool { state.pointee.health.broken }
    /// Free ring slots.
    public var freeCount: Int { state.pointee.freeSlots }
    /// Requests posted and not completed.
    public var inFlightCount: Int { state.pointee.inFlightCount }
    /// Next slot the driver looks at for a used descriptor, and its wrap counter.
    public var lastUsed: (slot: UInt16, wrap: Bool) { (state.pointee.used.slot, state.pointee.used.wrap) }
    /// Next slot the driver fills, and its wrap counter.
    public var nextAvail: (slot: UInt16, wrap: Bool) { (state.pointee.avail.slot, state.pointee.avail.wrap) }

    /// Segments above which a request goes through an indirect table (if negotiated).
    public var indirectThreshold: Int {
        get { state.pointee.indirectThreshold }
        set { state.pointee.indirectThreshold = newValue }
    }

    /// As `DriverQueue.usedLengthIgnored`: every completion reports 0, the length is never
    /// loaded. Kept across `reset()`.
    public var usedLengthIgnored: Bool {
        get { state.pointee.usedLengthIgnored }
        set { state.pointee.usedLengthIgnored = newValue }
    }

    /// Takes over a ring whose memory was zeroed. `memory.descriptors` is the descriptor
    /// ring, `memory.avail` the driver area, `memory.used` the device area.
    public init(memory: DriverRingMemory, features: RingFeatures) {
        self.memory = memory
        self.features = features
        self.queueSize = memory.queueSize
        size = Int(memory.queueSize)
        buffers = InFlightTable(size: size)
        state = .owned(State(freeSlots: size, freeIDs: size))
    }

    deinit {
        buffers.deallocate()
        state.release()
    }

    /// Forgets everything and zeroes the shared ring, as after a device reset.
    public func reset() {
        memory.descriptors.initializeMemory(as: UInt8.self, repeating: 0, count: PackedLayout.ringSize(size))
        memory.avail.initializeMemory(as: UInt8.self, repeating: 0, count: PackedLayout.eventAreaSize)
        memory.used.initializeMemory(as: UInt8.self, repeating: 0, count: PackedLayout.eventAreaSize)
        buffers.reset()
        state.pointee = State(
            freeSlots: size, freeIDs: size, indirectThreshold: state.pointee.indirectThreshold,
            usedLengthIgnored: state.pointee.usedLengthIgnored)
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
        if state.pointee.health.broken { throw .broken(state.pointee.health.sticky) }
        let count = segments.count
        guard count > 0 else { throw .emptyChain }
        let useIndirect = memory.usesIndirect(count, threshold: state.pointee.indirectThreshold, features: features)
        let needed = useIndirect ? 1 : count
        guard needed <= size else { throw .tooManySegments(count) }
        guard needed <= state.pointee.freeSlots, state.pointee.freeIDs > 0 else { throw .full }

        let id = state.pointee.freeIDHead
        state.pointee.freeIDHead = buffers.entries[Int(id)].nextFree
        state.pointee.freeIDs -= 1
        let head = state.pointee.avail
        var position = head
        var headFlags: UInt16 = 0
        var writable: UInt64 = 0
        if useIndirect, let tables = memory.indirect {
            let table = memory.writeIndirectTable(PackedTableFormat.self, in: tables, index: id, segments: segments)
            writable = table.writable
            let d = descriptor(position.slot)
            SharedAccess.store64(d + PackedLayout.descAddr, table.address)
            SharedAccess.store32(d + PackedLayout.descLen, table.length)
            SharedAccess.store16(d + PackedLayout.descID, id)
            headFlags = PackedLayout.flagIndirect | PackedLayout.availableMarker(wrap: position.wrap)
            position.advance(by: 1, size: size)
        } else {
            for i in 0..<count {
                let s = segments[i]
                var flags = PackedLayout.availableMarker(wrap: position.wrap)
                if i + 1 < count { flags |= PackedLayout.flagNext }
                if s.deviceWritable {
                    flags |= PackedLayout.flagWrite
                    writable &+= UInt64(s.length)
                }
                let d = descriptor(position.slot)
                SharedAccess.store64(d + PackedLayout.descAddr, s.address)
                SharedAccess.store32(d + PackedLayout.descLen, s.length)
                SharedAccess.store16(d + PackedLayout.descID, id)
                // The head's flags go last: they make the whole chain available.
                if i == 0 { headFlags = flags } else { SharedAccess.store16(d + PackedLayout.descFlags, flags) }
                position.advance(by: 1, size: size)
            }
        }
        state.pointee.pending.write(headFlags, slot: head.slot, ring: memory.descriptors, slots: needed)
        state.pointee.avail = position
        state.pointee.freeSlots -= needed
        buffers.post(id, token: token, writable: writable, count: needed)
        state.pointee.inFlightCount += 1
        return id
    }

    /// Posts `segments` as one chain carrying `token`; returns the buffer id.
    @discardableResult
    public func add(_ segments: [Segment], token: UInt64) throws(SubmitError) -> UInt16 {
        try segments.withUnsafeBufferPointer { (p) throws(SubmitError) in try add(p, token: token) }
    }

    /// Makes every added request visible (release store of the first head's flags) and
    /// says whether the device wants a kick. The device area is read once, as one 32-bit
    /// snapshot, after a full fence; garbage there breaks the queue (R3).
    public func publish() -> Bool {
        guard !state.pointee.health.broken, let moved = state.pointee.pending.publish(ring: memory.descriptors)
        else { return false }
        let avail = state.pointee.avail
        switch PackedEvents.peerWants(
            area: memory.used, eventIndex: features.eventIndex, new: avail.slot, old: avail.slot &- moved,
            wrap: avail.wrap, size: queueSize)
        {
        case .notify(let wanted): return wanted
        case .invalid(let v):
            breakQueue(v)
            return false
        }
    }

    // MARK: completions

    /// The next validated completion, or nil when the device has none for us now.
    @inline(__always)
    public func nextCompletion() throws(Violation) -> Completion? {
        if state.pointee.health.broken { throw state.pointee.health.sticky }
        let position = state.pointee.used
        let slot = position.slot
        // The first chain of an unpublished batch: its flags are not ours yet to judge.
        if state.pointee.pending.isPending && state.pointee.pending.slot == slot { return nil }
        let d = descriptor(slot)
        let untrustedFlags = SharedAccess.load16Acquire(d + PackedLayout.descFlags)
        let mark = untrustedFlags & (PackedLayout.flagAvail | PackedLayout.flagUsed)
        let usedMark = PackedLayout.usedMarker(wrap: position.wrap)
        if state.pointee.inFlightCount == 0 {
            // Nothing was made available here in this lap: a used mark is a forgery.
            if mark == usedMark { throw breakQueue(.packedUsedSlotNotAvailable(slot: slot)) }
            return nil
        }
        guard mark == usedMark else {
            // In flight, so this slot holds our own available mark of this lap, or a used one.
            if mark == PackedLayout.availableMarker(wrap: position.wrap) { return nil }
            throw breakQueue(.packedUsedWrapCounter(slot: slot, flags: untrustedFlags, wrap: position.wrap))
        }
        let untrustedID = SharedAccess.load16(d + PackedLayout.descID)
        let untrustedLength = state.pointee.usedLengthIgnored ? 0 : SharedAccess.load32(d + PackedLayout.descLen)
        let record: InFlightTable.Entry
        do {
            record = try buffers.check(id: UInt32(untrustedID), length: untrustedLength, queueSize: queueSize)
        } catch {
            throw breakQueue(error)
        }
        let id = untrustedID
        // Advance by our own count of the chain's slots (never by a device value).
        state.pointee.used.advance(by: Int(record.count), size: size)
        buffers.complete(id)
        buffers.free(id, freeHead: &state.pointee.freeIDHead)
        state.pointee.freeIDs += 1
        state.pointee.freeSlots += Int(record.count)
        state.pointee.inFlightCount -= 1
        return Completion(token: record.token, head: id, length: untrustedLength)
    }

    /// Marks the queue broken. Idempotent: the first violation stays.
    @discardableResult
    public func breakQueue(_ v: Violation) -> Violation { state.pointee.health.fail(v) }

    /// After the queue broke: the tokens of every request still in flight. Their ids and
    /// slots stay quarantined until `reset()`.
    public func failAll() -> [UInt64] {
        state.pointee.inFlightCount = 0
        return buffers.failAll()
    }

    /// Tokens of the requests in flight.
    public var inFlightTokens: [UInt64] { buffers.tokens }

    // MARK: interrupt suppression

    /// Asks the device not to interrupt (a hint).
    public func disableInterrupts() { PackedEvents.disable(area: memory.avail) }

    /// Asks for an interrupt at the next used descriptor. Returns true if one may already
    /// be there (poll again before sleeping).
    public func enableInterrupts() -> Bool {
        let used = state.pointee.used
        return PackedEvents.enable(
            area: memory.avail, eventIndex: features.eventIndex, position: used, ring: memory.descriptors,
            mark: PackedLayout.usedMarker(wrap: used.wrap))
    }
}

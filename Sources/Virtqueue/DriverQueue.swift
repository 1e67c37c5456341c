import SharedMemory

/// A validated completion: the device finished the request posted with `token`, and
/// claims to have written `length` bytes, which is at most what the request offered.
public struct Completion: Sendable, Equatable {
    /// The token given to `add`.
    public let token: UInt64
    /// The chain's head id.
    public let head: UInt16
    /// Bytes the device wrote (checked against what was posted as writable, R3).
    public let length: UInt32
}

/// Why a request could not be posted. Not a device fault, except `.broken`.
public enum SubmitError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The queue was broken by a device violation (R6); reset or reconnect to recover.
    case broken(Violation)
    /// Not enough free descriptors now; poll completions and retry.
    case full
    /// A request without segments.
    case emptyChain
    /// More segments than the queue (or the indirect table) can carry.
    case tooManySegments(Int)

    /// One line naming why the request was not posted.
    public var description: String {
        switch self {
        case .broken(let v): return "queue broken: \(v)"
        case .full: return "queue full"
        case .emptyChain: return "a request needs at least one segment"
        case .tooManySegments(let n): return "\(n) segments do not fit the queue"
        }
    }
}

/// Local view of a ring the driver placed in its own shared region.
public struct DriverRingMemory: @unchecked Sendable {
    /// Descriptors in the ring.
    public let queueSize: UInt16
    /// Local address of the descriptor table.
    public let descriptors: UnsafeMutableRawPointer
    /// Local address of the available ring.
    public let avail: UnsafeMutableRawPointer
    /// Local address of the used ring (written by the device).
    public let used: UnsafeMutableRawPointer
    /// Indirect tables: `queueSize` tables of `indirectTableEntries` descriptors each,
    /// one per possible head (so a table is free exactly when its head is).
    public let indirect: UnsafeMutableRawPointer?
    /// The address the device knows the indirect tables by.
    public let indirectGuestAddress: UInt64
    /// Descriptors per indirect table.
    public let indirectTableEntries: Int

    /// A view of a ring placed at these local addresses.
    public init(
        queueSize: UInt16, descriptors: UnsafeMutableRawPointer, avail: UnsafeMutableRawPointer,
        used: UnsafeMutableRawPointer, indirect: UnsafeMutableRawPointer? = nil,
        indirectGuestAddress: UInt64 = 0, indirectTableEntries: Int = 0
    ) {
        self.queueSize = queueSize
        self.descriptors = descriptors
        self.avail = avail
        self.used = used
        self.indirect = indirect
        self.indirectGuestAddress = indirectGuestAddress
        self.indirectTableEntries = indirectTableEntries
    }
}

/// The hardened driver side of a split virtqueue ("do not read from descriptor ring").
///
/// - R1: every descriptor, free-list link and avail entry lives in private shadow state;
///   no value loaded from shared memory reaches them. Chains are freed by walking the
///   shadow. A post compares each shared descriptor with what it must hold and stores the
///   halves that differ (`setDescriptor`): the load decides only whether to store.
/// - R2: used.idx is loaded once per batch, each used element once.
/// - R3: the index delta is bounded by the in-flight count, the id must be an in-flight
///   head, the length at most the chain's device-writable bytes.
/// - R6: the first violation makes the queue `broken` until `reset()`.
///
/// Private state sits in memory this object allocates once and owns (raw pointers, not
/// Arrays or stored `var`s): the hot path then pays no Array uniqueness checks and no
/// dynamic exclusivity checks, which cost more than all the validation (docs/design.md §5).
/// Every table index is private, or a device value already checked `< queueSize`; shadow
/// indices are masked with `queueSize - 1` besides, so no index can leave the tables.
///
/// Not thread-safe: one owner at a time (one queue per thread, as in Linux).
public final class DriverQueue {
    struct ShadowDescriptor {
        var address: UInt64 = 0
        var length: UInt32 = 0
        var flags: UInt16 = 0
        /// Next descriptor of the chain while in flight, next free one while free.
        var next: UInt16 = 0
    }

    /// The private indices and counters.
    struct State {
        var freeHead: UInt16 = 0
        /// Private copy of avail.idx (never read back from the ring).
        var availIndex: UInt16 = 0
        /// avail.idx as last published to the device.
        var publishedIndex: UInt16 = 0
        /// Private copy of avail.flags.
        var availFlags: UInt16 = 0
        /// Next used element to consume.
        var lastUsed: UInt16 = 0
        /// used.idx as loaded at the start of the current batch.
        var usedSnapshot: UInt16 = 0
        var freeCount = 0
        var inFlightCount = 0
        var indirectThreshold = 1
        /// Completions report length 0 whatever the device wrote (see `usedLengthIgnored`).
        var usedLengthIgnored = false
        var health = QueueHealth()
        /// Halves of shared descriptors stored because they differed (`setDescriptor`).
        var descriptorStores: UInt64 = 0
        /// Avail entries stored because they differed (`add`).
        var availEntryStores: UInt64 = 0
    }

    /// The ring's memory.
    public let memory: DriverRingMemory
    /// Negotiated ring features.
    public let features: RingFeatures
    /// Descriptors in the ring.
    public let queueSize: UInt16
    let mask: UInt16
    /// Masks an index into the private tables (0 for the degenerate empty queue).
    let tableMask: Int

    /// `queueSize` entries each (at least one), allocated in `init`, freed in `deinit`.
    let shadow: UnsafeMutablePointer<ShadowDescriptor>
    /// Per head: what was posted (token, writable bytes, descriptor count).
    let inFlight: InFlightTable
    /// Private scalars (indices, counts). Every `.pointee` in this file is on this or the
    /// tables above: memory this queue allocated, never a structure the device wrote.
    let state: UnsafeMutablePointer<State>

    /// Descriptors free to post.
    public var freeCount: Int { state.pointee.freeCount }
    /// Requests posted and not completed.
    public var inFlightCount: Int { state.pointee.inFlightCount }
    /// Next used element to consume.
    public var lastUsed: UInt16 { state.pointee.lastUsed }

    /// Halves (8 bytes) of shared descriptors stored so far: a post stores only the halves
    /// that differ from what the descriptor must hold (a chain reposted unchanged stores
    /// none; one the device scribbled on is rewritten).
    public var descriptorStores: UInt64 { state.pointee.descriptorStores }

    /// Avail ring entries stored so far: like the descriptors, an entry is stored only
    /// when it differs from the head being posted (what is loaded decides nothing else).
    public var availEntryStores: UInt64 { state.pointee.availEntryStores }

    /// The device's first violation; the queue is broken from then on (R6).
    public var violation: Violation? { state.pointee.health.violation }
    /// True once a violation broke the queue.
    public var isBroken: Bool { state.pointee.health.broken }

    /// Segments above which a request goes through an indirect table (if negotiated).
    public var indirectThreshold: Int {
        get { state.pointee.indirectThreshold }
        set { state.pointee.indirectThreshold = newValue }
    }

    /// For a queue whose chains are all device-readable (virtio-net transmit): the used
    /// length means nothing there, so it is never loaded and every completion reports 0
    /// (real back-ends such as DPDK's write stale values into it). Kept across `reset()`.
    public var usedLengthIgnored: Bool {
        get { state.pointee.usedLengthIgnored }
        set { state.pointee.usedLengthIgnored = newValue }
    }

    /// Takes over a ring whose memory was zeroed (a fresh region or `reset()`).
    public init(memory: DriverRingMemory, features: RingFeatures) {
        self.memory = memory
        self.features = features
        self.queueSize = memory.queueSize
        self.mask = memory.queueSize &- 1
        let n = Int(memory.queueSize)
        tableMask = max(n, 1) - 1
        shadow = .allocate(capacity: max(n, 1))
        inFlight = InFlightTable(size: n)
        for i in 0..<max(n, 1) {
            (shadow + i).initialize(to: ShadowDescriptor(next: UInt16(truncatingIfNeeded: i + 1)))
        }
        state = .owned(State(freeCount: n))
    }

    deinit {
        shadow.deallocate()
        inFlight.deallocate()
        state.release()
    }

    /// Table slot of a private or already validated index.
    @inline(__always)
    func slot(_ index: UInt16) -> Int { Int(index) & tableMask }

    /// Forgets everything and zeroes the shared ring, as after a device reset.
    public func reset() {
        let n = Int(queueSize)
        memory.descriptors.initializeMemory(as: UInt8.self, repeating: 0, count: SplitLayout.descriptorTableSize(n))
        memory.avail.initializeMemory(as: UInt8.self, repeating: 0, count: SplitLayout.availRingSize(n))
        memory.used.initializeMemory(as: UInt8.self, repeating: 0, count: SplitLayout.usedRingSize(n))
        for i in 0..<max(n, 1) {
            shadow[i] = ShadowDescriptor(address: 0, length: 0, flags: 0, next: UInt16(truncatingIfNeeded: i + 1))
        }
        inFlight.reset()
        let threshold = state.pointee.indirectThreshold
        let ignored = state.pointee.usedLengthIgnored
        state.pointee = State(freeCount: n, indirectThreshold: threshold, usedLengthIgnored: ignored)
    }

    // MARK: posting

    /// Posts one request (not yet visible to the device: call `publish()` once per batch).
    /// Device-readable segments must precede device-writable ones. Returns the head.
    @discardableResult
    public func add(_ segments: UnsafeBufferPointer<Segment>, token: UInt64) throws(SubmitError) -> UInt16 {
        if state.pointee.health.broken { throw .broken(state.pointee.health.sticky) }
        let count = segments.count
        guard count > 0 else { throw .emptyChain }
        let useIndirect = memory.usesIndirect(count, threshold: state.pointee.indirectThreshold, features: features)
        let needed = useIndirect ? 1 : count
        guard needed <= Int(queueSize) else { throw .tooManySegments(count) }
        guard needed <= state.pointee.freeCount else { throw .full }

        let head = state.pointee.freeHead
        var writable: UInt64 = 0
        if useIndirect, let tables = memory.indirect {
            let table = memory.writeIndirectTable(SplitTableFormat.self, in: tables, index: head, segments: segments)
            writable = table.writable
            let nextFree = shadow[slot(head)].next
            setDescriptor(
                head, address: table.address, length: table.length, flags: SplitLayout.flagIndirect, next: nextFree)
            state.pointee.freeHead = nextFree
        } else {
            var index = head
            var nextFree = head
            for i in 0..<count {
                let s = segments[i]
                nextFree = shadow[slot(index)].next
                var flags: UInt16 = i + 1 < count ? SplitLayout.flagNext : 0
                if s.deviceWritable {
                    flags |= SplitLayout.flagWrite
                    writable &+= UInt64(s.length)
                }
                // The chain link is the next free descriptor, which is also where the
                // free list continues: one private array serves both (Linux's desc_extra).
                setDescriptor(index, address: s.address, length: s.length, flags: flags, next: nextFree)
                if i + 1 < count { index = nextFree }
            }
            state.pointee.freeHead = nextFree
        }
        state.pointee.freeCount -= needed
        inFlight.post(head, token: token, writable: writable, count: needed)
        state.pointee.inFlightCount += 1

        // The avail entry as the descriptors: stored only when it differs. A closed loop
        // reposts the same heads, so after the first lap the entries' lines stay clean and
        // the device reads them from its own cache; only the index's line moves.
        let availIndex = state.pointee.availIndex
        let entry = memory.avail + SplitLayout.availEntryOffset(Int(availIndex & mask))
        if SharedAccess.load16(entry) != head {
            SharedAccess.store16(entry, head)
            state.pointee.availEntryStores &+= 1
        }
        state.pointee.availIndex = availIndex &+ 1
        return head
    }

    /// Convenience for small requests.
    @discardableResult
    public func add(_ segments: [Segment], token: UInt64) throws(SubmitError) -> UInt16 {
        try segments.withUnsafeBufferPointer { (p) throws(SubmitError) in try add(p, token: token) }
    }

    /// Records a descriptor in the shadow and makes the shared one hold it.
    ///
    /// The shared descriptor is compared with what it must hold, as two 64-bit halves, and
    /// each half that differs is stored: a chain reposted on the same descriptors (a
    /// slot's request again, as every closed loop does) leaves their cache lines clean,
    /// so the device does not miss on them and the driver takes no ownership of them
    /// (R1 still holds: what is loaded only decides whether to store; it never reaches
    /// the shadow or anything else. A device that scribbled on the table gets its bytes
    /// overwritten at the next post, as before.) The shared `next` of a chain's last
    /// descriptor is 0 (the device ignores it without NEXT); the shadow keeps the free
    /// list's link there, which would otherwise change the descriptor at every post.
    @inline(__always)
    func setDescriptor(_ index: UInt16, address: UInt64, length: UInt32, flags: UInt16, next: UInt16) {
        shadow[slot(index)] = ShadowDescriptor(address: address, length: length, flags: flags, next: next)
        let p = memory.descriptors + slot(index) * SplitLayout.descriptorSize
        let sharedNext = flags & SplitLayout.flagNext != 0 ? next : 0
        let tail = UInt64(length) | UInt64(flags) << 32 | UInt64(sharedNext) << 48
        if SharedAccess.load64(p + SplitLayout.descAddr) != address {
            SharedAccess.store64(p + SplitLayout.descAddr, address)
            state.pointee.descriptorStores &+= 1
        }
        if SharedAccess.load64(p + SplitLayout.descLen) != tail {
            SharedAccess.store64(p + SplitLayout.descLen, tail)
            state.pointee.descriptorStores &+= 1
        }
    }

    /// Makes every added request visible (release store of avail.idx) and says whether the
    /// device wants a kick. The full fence orders our index store before reading the
    /// device's event index / flags (a lost wake-up otherwise).
    public func publish() -> Bool {
        let old = state.pointee.publishedIndex
        let new = state.pointee.availIndex
        guard old != new, !state.pointee.health.broken else { return false }
        state.pointee.publishedIndex = new
        return SplitEvents.publish(
            index: memory.avail + SplitLayout.availIdxOffset, new: new, old: old, eventIndex: features.eventIndex,
            peerEvent: memory.used + SplitLayout.availEventOffset(Int(queueSize)),
            peerFlags: memory.used + SplitLayout.usedFlagsOffset)
    }

    // MARK: completions

    /// `nextCompletion()`, publishing first when used.idx is about to be loaded again (the
    /// batch seen at the last load is reaped) or `limit` added requests wait unpublished:
    /// one publish (a release store, a full fence, a load of avail_event) per batch of
    /// completions instead of one per request (`DriverRing`).
    @inline(__always)
    public func nextCompletion(publishingAfter limit: Int, publication: inout Publication) throws(Violation)
        -> Completion?
    {
        let pending = state.pointee.availIndex &- state.pointee.publishedIndex
        if pending != 0 && (state.pointee.lastUsed == state.pointee.usedSnapshot || Int(pending) >= limit) {
            publication = publish() ? .publishedKick : .published
        }
        return try nextCompletion()
    }

    /// The next validated completion, or nil when the device has none for us now.
    /// used.idx is loaded once per batch (when everything of the previous load has been
    /// consumed); each used element is loaded once. Throws (and breaks the queue) on the
    /// first violation; after that, `failAll` hands back the in-flight tokens.
    @inline(__always)
    public func nextCompletion() throws(Violation) -> Completion? {
        if state.pointee.health.broken { throw state.pointee.health.sticky }
        let lastUsed = state.pointee.lastUsed
        if lastUsed == state.pointee.usedSnapshot {
            let published = SharedAccess.load16Acquire(memory.used + SplitLayout.usedIdxOffset)
            if published == lastUsed { return nil }
            let delta = published &- lastUsed
            let inFlightCount = state.pointee.inFlightCount
            guard Int(delta) <= inFlightCount else {
                throw breakQueue(
                    delta >= 0x8000
                        ? .usedIndexWentBackwards(lastSeen: lastUsed, published: published)
                        : .usedIndexBeyondInFlight(
                            lastSeen: lastUsed, published: published, inFlight: inFlightCount))
            }
            state.pointee.usedSnapshot = published
        }
        let element = memory.used + SplitLayout.usedEntryOffset(Int(lastUsed & mask))
        let untrustedID = SharedAccess.load32(element)
        let untrustedLength = state.pointee.usedLengthIgnored ? 0 : SharedAccess.load32(element + 4)
        let record: InFlightTable.Entry
        do {
            record = try inFlight.check(id: untrustedID, length: untrustedLength, queueSize: queueSize)
        } catch {
            throw breakQueue(error)
        }
        let head = UInt16(truncatingIfNeeded: untrustedID)
        state.pointee.lastUsed = lastUsed &+ 1
        release(head: head, descriptors: record.count)
        return Completion(token: record.token, head: head, length: untrustedLength)
    }

    /// Returns a chain's descriptors to the free list by walking the private shadow.
    @inline(__always)
    func release(head: UInt16, descriptors: UInt16) {
        inFlight.complete(head)
        state.pointee.inFlightCount -= 1
        var last = head
        var remaining = descriptors
        while remaining > 1 {
            last = shadow[slot(last)].next
            remaining -= 1
        }
        shadow[slot(last)].next = state.pointee.freeHead
        state.pointee.freeHead = head
        state.pointee.freeCount += Int(descriptors)
    }

    /// Marks the queue broken (also used by upper layers for deadlines). Idempotent: the
    /// first violation stays.
    @discardableResult
    public func breakQueue(_ v: Violation) -> Violation { state.pointee.health.fail(v) }

    /// After the queue broke: the tokens of every request still in flight, which the
    /// caller fails with the violation. The descriptors stay quarantined until `reset()`.
    public func failAll() -> [UInt64] {
        state.pointee.inFlightCount = 0
        return inFlight.failAll()
    }

    /// Tokens of requests in flight, oldest first by head (for reconnect resubmission).
    public var inFlightTokens: [UInt64] { inFlight.tokens }

    // MARK: interrupt suppression

    /// Asks the device not to interrupt (a hint; it may still).
    public func disableInterrupts() {
        SplitEvents.disable(
            eventIndex: features.eventIndex, flags: &state.pointee.availFlags,
            at: memory.avail + SplitLayout.availFlagsOffset)
    }

    /// Asks for an interrupt at the next completion. Returns true if completions may
    /// already be pending (poll again before sleeping, or the wake-up is lost).
    public func enableInterrupts() -> Bool {
        SplitEvents.enable(
            eventIndex: features.eventIndex, position: state.pointee.lastUsed,
            ourEvent: memory.avail + SplitLayout.usedEventOffset(Int(queueSize)), flags: &state.pointee.availFlags,
            at: memory.avail + SplitLayout.availFlagsOffset, peerIndex: memory.used + SplitLayout.usedIdxOffset)
    }
}

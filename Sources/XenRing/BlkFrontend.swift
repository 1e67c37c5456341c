import SharedMemory

/// A validated blkif completion: request `token` (posted as ring id `id`) finished with
/// a known status; for an OKAY read the data is already in the caller's buffer.
public struct BlkCompletion: Sendable, Equatable {
    /// The caller's token of the request.
    public let token: UInt64
    /// The ring id the request was posted with.
    public let id: UInt16
    /// The request's operation (the response echoed it, checked).
    public let operation: BlkOperation
    /// The backend's answer: OKAY, ERROR or EOPNOTSUPP.
    public let status: BlkStatus
}

/// Why a request could not be posted. Only `.broken` is the backend's fault.
public enum BlkSubmitError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The device is disabled for further use (R6); reconnect to recover.
    case broken(XenViolation)
    /// Every ring slot is in flight; consume completions and retry.
    case full
    /// Not enough bounce pages or grant refs left (some may be quarantined, R7).
    case noBounceSpace
    /// Byte counts must be a non-zero multiple of 512 and at most 11 pages.
    case invalidLength(Int)
    /// The request does not fit the capacity the backend announced.
    case beyondCapacity(sector: UInt64, sectors: UInt64)

    /// One line naming what was refused.
    public var description: String {
        switch self {
        case .broken(let v): return "device disabled: \(v)"
        case .full: return "ring full"
        case .noBounceSpace: return "no bounce pages or grant refs left"
        case .invalidLength(let n): return "invalid length \(n) (multiple of 512, at most 45056)"
        case .beyondCapacity(let s, let n): return "sectors \(s)+\(n) beyond capacity"
        }
    }
}

/// The frontend's view of the shared memory: the ring page, and the grant table with its
/// frames (frame `ringFrame` holds the ring; the others are bounce pages).
public struct BlkFrontendMemory: @unchecked Sendable {
    // @unchecked Sendable: as `GrantTableMemory` (immutable pointers, shared-access loads).
    /// The grant table and its frames.
    public let grants: GrantTableMemory
    /// The frame that holds the shared ring.
    public let ringFrame: UInt32

    /// The frontend's memory: `ringFrame` holds the ring, the other frames are bounce pages.
    public init(grants: GrantTableMemory, ringFrame: UInt32 = 0) {
        self.grants = grants
        self.ringFrame = ringFrame
    }

    /// The shared ring page (accessed only through `SharedAccess`).
    public var ring: UnsafeMutableRawPointer { grants.page(ringFrame) }
}

/// The hardened blkif frontend on one Xen PV ring ("blkfront without trusting blkback").
///
/// - R1: requests are built in a private buffer and copied into their slot whole; ids,
///   grant refs, pages and req_prod live in private shadow state and are never read back.
/// - R2: rsp_prod is loaded once per batch (acquire), each response copied once.
/// - R3: `rsp_prod - rsp_cons <= in flight`, never backwards; id in range and in flight;
///   operation echoed; status known.
/// - R6/R7: the first violation disables the device; grants the backend still maps are
///   quarantined, never reused.
///
/// Not thread-safe: one owner at a time. (That is also why the hot state is marked
/// `@exclusivity(unchecked)`: the runtime access checks cost ~13% of a 4 KiB round trip,
/// and they guard our own accesses, not anything the peer controls.)
public final class BlkFrontend {
    struct Shadow {
        var token: UInt64 = 0
        var operation = BlkOperation.read
        var segmentCount: Int = 0
        var destination: UnsafeMutableRawPointer?
        var byteCount: Int = 0
        var active = false
    }

    /// The shared ring and bounce pages.
    public let memory: BlkFrontendMemory
    /// Slots of the ring (32 for one page).
    public let ringSize: Int
    /// The disk size the backend announced, in 512-byte sectors: requests beyond it are refused locally.
    public let capacitySectors: UInt64
    let mask: UInt32
    let ring: UnsafeMutableRawPointer
    /// Grants the bounce pages to the backend, one per segment, and ends them.
    public let grants: GrantIssuer

    /// The tables own their memory; the hot path indexes their base pointers directly
    /// (one load fewer per access than going through the table object).
    let tables: (shadow: PrivateTable<Shadow>, refs: PrivateTable<UInt32>, frames: PrivateTable<UInt32>)
    let shadow: UnsafeMutablePointer<Shadow>
    let freeIds: PrivateStack<UInt16>
    /// Grant ref and frame of segment `s` of id `i` at `i * 11 + s`, valid while `i` is in
    /// flight (a ref of UInt32.max was already revoked).
    let segmentRefs: UnsafeMutablePointer<UInt32>
    let segmentFrames: UnsafeMutablePointer<UInt32>
    let freeFrames: PrivateStack<UInt32>
    /// Bounce pages the backend still mapped when their request ended: never reused (R7).
    @exclusivity(unchecked) public private(set) var quarantinedFrames: [UInt32] = []
    /// The request built privately, then copied whole into its slot (R1).
    let scratch: UnsafeMutableRawPointer

    /// Responses consumed so far (private, R1).
    @exclusivity(unchecked) var requestProducer: UInt32 = 0
    @exclusivity(unchecked) var publishedRequestProducer: UInt32 = 0
    @exclusivity(unchecked) public private(set) var responseConsumer: UInt32 = 0
    @exclusivity(unchecked) var responseSnapshot: UInt32 = 0
    @exclusivity(unchecked) public private(set) var inFlightCount = 0
    @exclusivity(unchecked) public private(set) var violation: XenViolation?
    /// `violation != nil`, as one flag: the hot path tests this byte instead of copying the
    /// optional enum (whose String payloads make every copy an outlined retain/release).
    @exclusivity(unchecked) public private(set) var isBroken = false
    /// The Adversary's hook points (nil in service).
    @exclusivity(unchecked) public var hooks: (any XenFrontendHooks)?

    /// Takes over the ring page (SHARED_RING_INIT) and every frame but `ringFrame` as
    /// bounce pages.
    public init(memory: BlkFrontendMemory, grants: GrantIssuer, capacitySectors: UInt64 = .max) {
        self.memory = memory
        self.grants = grants
        self.capacitySectors = capacitySectors
        ringSize = BlkifLayout.ringSize
        mask = UInt32(ringSize - 1)
        ring = memory.ring
        ring.initializeMemory(as: UInt8.self, repeating: 0, count: SharedRingLayout.pageSize)
        SharedAccess.store32(ring + SharedRingLayout.requestEvent, 1)
        SharedAccess.store32(ring + SharedRingLayout.responseEvent, 1)
        tables = (
            PrivateTable(repeating: Shadow(), count: ringSize),
            PrivateTable(repeating: .max, count: ringSize * BlkifLayout.maxSegments),
            PrivateTable(repeating: .max, count: ringSize * BlkifLayout.maxSegments)
        )
        shadow = tables.shadow.base
        segmentRefs = tables.refs.base
        segmentFrames = tables.frames.base
        freeIds = PrivateStack(capacity: ringSize)
        for id in (0..<ringSize).reversed() { freeIds.push(UInt16(id)) }
        freeFrames = PrivateStack(capacity: memory.grants.frameCount)
        for frame in (0..<memory.grants.frameCount).reversed() where frame != Int(memory.ringFrame) {
            freeFrames.push(UInt32(frame))
        }
        scratch = UnsafeMutableRawPointer.allocate(byteCount: BlkifLayout.requestSize, alignment: 8)
    }

    deinit { scratch.deallocate() }

    /// Bounce pages still usable (quarantined ones excluded).
    public var availablePages: Int { freeFrames.count }

    // MARK: posting

    /// Posts a read of `buffer.count` bytes at 512-byte `sector`; the data lands in
    /// `buffer` (private memory, which must stay valid until completion) only on OKAY.
    @discardableResult
    @inlinable
    public func submitRead(sector: UInt64, into buffer: UnsafeMutableRawBufferPointer, token: UInt64)
        throws(BlkSubmitError) -> UInt16
    {
        try submitData(
            .read, sector: sector, source: nil, destination: buffer.baseAddress, count: buffer.count, token: token)
    }

    /// Posts a write of `data` (copied into bounce pages now) at `sector`.
    @discardableResult
    @inlinable
    public func submitWrite(sector: UInt64, from data: UnsafeRawBufferPointer, token: UInt64)
        throws(BlkSubmitError) -> UInt16
    {
        try submitData(
            .write, sector: sector, source: data.baseAddress, destination: nil, count: data.count, token: token)
    }

    /// Posts a cache flush (BLKIF_OP_FLUSH_DISKCACHE, no segments).
    @discardableResult
    public func submitFlush(token: UInt64) throws(BlkSubmitError) -> UInt16 {
        let id = try takeId()
        build(operation: .flush, id: id, sector: 0, segments: 0)
        post(id, operation: .flush, segments: 0, destination: nil, count: 0, token: token)
        return id
    }

    /// Posts a discard of `sectors` sectors at `sector` (blkif_request_discard).
    @discardableResult
    public func submitDiscard(sector: UInt64, sectors: UInt64, token: UInt64) throws(BlkSubmitError) -> UInt16 {
        try checkCapacity(sector: sector, sectors: sectors)
        let id = try takeId()
        build(operation: .discard, id: id, sector: sector, segments: 0)
        scratch.storeBytes(of: sectors, toByteOffset: BlkifLayout.discardSectorCount, as: UInt64.self)
        post(id, operation: .discard, segments: 0, destination: nil, count: 0, token: token)
        return id
    }

    func checkCapacity(sector: UInt64, sectors: UInt64) throws(BlkSubmitError) {
        let (end, overflow) = sector.addingReportingOverflow(sectors)
        guard !overflow, end <= capacitySectors else { throw .beyondCapacity(sector: sector, sectors: sectors) }
    }

    func takeId() throws(BlkSubmitError) -> UInt16 {
        if isBroken { throw .broken(stickyViolation()) }
        guard let id = freeIds.pop() else { throw .full }
        return id
    }

    /// The violation that disabled the device (`disable` sets it before `isBroken`).
    @inline(never)
    func stickyViolation() -> XenViolation {
        violation ?? .deadlineExceeded(milliseconds: 0)  // unreachable: isBroken implies a violation
    }

    @usableFromInline
    func submitData(
        _ operation: BlkOperation, sector: UInt64, source: UnsafeRawPointer?,
        destination: UnsafeMutableRawPointer?, count: Int, token: UInt64
    ) throws(BlkSubmitError) -> UInt16 {
        if isBroken { throw .broken(stickyViolation()) }
        let page = SharedRingLayout.pageSize
        guard count > 0, count % BlkifLayout.sectorSize == 0, count <= BlkifLayout.maxSegments * page else {
            throw .invalidLength(count)
        }
        try checkCapacity(sector: sector, sectors: UInt64(count / BlkifLayout.sectorSize))
        let segments = (count + page - 1) / page
        guard freeFrames.count >= segments, grants.available >= segments else { throw .noBounceSpace }
        guard let id = freeIds.pop() else { throw .full }
        let readOnly = operation == .write
        build(operation: operation, id: id, sector: sector, segments: segments)
        if segments == 1 {
            // The common case (up to 4 KiB) without the loop: fewer live values, no spills.
            grantSegment(0, of: id, bytes: count, source: source, readOnly: readOnly)
        } else {
            var offset = 0
            for s in 0..<segments {
                let bytes = min(page, count &- offset)
                grantSegment(s, of: id, bytes: bytes, source: source.map { $0 + offset }, readOnly: readOnly)
                offset &+= bytes
            }
        }
        post(id, operation: operation, segments: segments, destination: destination, count: count, token: token)
        return id
    }

    /// Segment `s` of request `id`: a free bounce page with `bytes` of `source` (or none,
    /// for a read), granted to the backend, recorded privately and in the request buffer.
    /// The caller checked that enough pages and refs are free.
    @inline(__always)
    func grantSegment(_ s: Int, of id: UInt16, bytes: Int, source: UnsafeRawPointer?, readOnly: Bool) {
        guard let frame = freeFrames.pop() else { return }  // counted by the caller
        let page = memory.grants.page(frame)
        // R7: a bounce page starts zero (fresh sealed memfd, one per device) and only
        // ever holds bytes this same backend was already shown; what we grant beyond
        // the payload is zeroed, so nothing private leaks. (Re-zeroing whole pages for
        // every read cost ~12% of the frontend's CPU and protected nothing more.)
        if let source { page.copyMemory(from: source, byteCount: bytes) }
        if bytes < SharedRingLayout.pageSize {
            (page + bytes).initializeMemory(as: UInt8.self, repeating: 0, count: SharedRingLayout.pageSize &- bytes)
        }
        // Enough refs were checked by the caller, so grant cannot fail here.
        let ref = grants.grant(frame: frame, readOnly: readOnly) ?? 0
        let k = Int(id) &* BlkifLayout.maxSegments &+ s
        segmentRefs[k] = ref
        segmentFrames[k] = frame
        // The whole 8-byte segment at once: gref, first_sect 0, last_sect, zero padding.
        let lastSector = UInt64(truncatingIfNeeded: bytes &>> 9 &- 1)  // bytes / 512 - 1, bytes in 512...4096
        scratch.storeBytes(
            of: UInt64(ref) | lastSector << (8 * BlkifLayout.segmentLastSector),
            toByteOffset: BlkifLayout.segments &+ s &* BlkifLayout.segmentSize, as: UInt64.self)
    }

    /// Fills the private request buffer (R1) in whole 8-byte words: operation,
    /// nr_segments, handle 0 and padding; id; sector; and a zero word at offset 24 (the
    /// first segment, or `nr_sectors`), which the caller overwrites. With the segments the
    /// caller stores, every byte of `requestBytes` is written, so nothing stale is posted.
    @inline(__always)
    func build(operation: BlkOperation, id: UInt16, sector: UInt64, segments: Int) {
        let head = UInt64(operation.rawValue) | UInt64(UInt8(truncatingIfNeeded: segments)) << 8
        scratch.storeBytes(of: head, toByteOffset: BlkifLayout.operation, as: UInt64.self)
        scratch.storeBytes(of: UInt64(id), toByteOffset: BlkifLayout.id, as: UInt64.self)
        scratch.storeBytes(of: sector, toByteOffset: BlkifLayout.sectorNumber, as: UInt64.self)
        scratch.storeBytes(of: 0 as UInt64, toByteOffset: BlkifLayout.segments, as: UInt64.self)
    }

    /// Bytes of a request with `segments` segments: the header and the segments in use
    /// (32 for flush/discard, whose `nr_sectors` ends there).
    @inline(__always)
    static func requestBytes(segments: Int) -> Int {
        max(BlkifLayout.discardSectorCount + 8, BlkifLayout.segments + segments * BlkifLayout.segmentSize)
    }

    /// Copies the private request into its slot whole (every byte the request defines;
    /// segment entries past `nr_segments` are not part of it) and records the shadow.
    /// Word by word: 4 words for a one-page request, cheaper than a call to memcpy.
    @inline(__always)
    func post(
        _ id: UInt16, operation: BlkOperation, segments: Int, destination: UnsafeMutableRawPointer?, count: Int,
        token: UInt64
    ) {
        let slot = ring + SharedRingLayout.headerSize + Int(requestProducer & mask) * BlkifLayout.slotSize
        @inline(__always) func copyWord(_ w: Int) {
            slot.storeBytes(
                of: scratch.load(fromByteOffset: w &* 8, as: UInt64.self), toByteOffset: w &* 8, as: UInt64.self)
        }
        if let hooks {
            postHooked(hooks, segments: segments)
        } else if segments <= 1 {  // 32 bytes: header and one segment (or nr_sectors)
            copyWord(0)
            copyWord(1)
            copyWord(2)
            copyWord(3)
        } else {
            for w in 0..<(Self.requestBytes(segments: segments) / 8) { copyWord(w) }
        }
        requestProducer &+= 1
        shadow[Int(id)] = Shadow(
            token: token, operation: operation, segmentCount: segments, destination: destination,
            byteCount: count, active: true)
        inFlightCount &+= 1
    }

    /// Publishes req_prod once per batch; true if the backend asked to be notified.
    /// Decides from the private last-published value, not the old req_prod read back
    /// from the shared page as RING_PUSH_REQUESTS_AND_CHECK_NOTIFY does (R1).
    public func publish() -> Bool {
        guard !isBroken, requestProducer != publishedRequestProducer else { return false }
        let new = requestProducer
        SharedAccess.store32Release(
            ring + SharedRingLayout.requestProducer, hooks?.willPublish(requestProducer: new) ?? new)
        SharedAccess.fullFence()
        let event = SharedAccess.load32(ring + SharedRingLayout.requestEvent)
        let old = publishedRequestProducer
        publishedRequestProducer = new
        return new &- event < new &- old
    }

    // MARK: completions

    /// The next validated completion, nil when the backend has published nothing new.
    /// Throws (for good, R6) on the first violation; `failAll` then returns the tokens.
    public func nextCompletion() throws(XenViolation) -> BlkCompletion? {
        if isBroken { throw stickyViolation() }
        if responseConsumer == responseSnapshot {
            let producer = SharedAccess.load32Acquire(ring + SharedRingLayout.responseProducer)
            let delta = producer &- responseConsumer
            if delta == 0 { return nil }
            // Backwards shows as a huge delta, so one compare covers both checks.
            guard delta <= UInt32(truncatingIfNeeded: inFlightCount) else { throw rejectProducer(producer) }
            responseSnapshot = producer
        }
        // One copy of the response before any field is looked at (R2, RING_COPY_RESPONSE):
        // two single 8-byte loads into locals (id; operation and status), never re-read.
        let slot = ring + SharedRingLayout.headerSize + Int(responseConsumer & mask) * BlkifLayout.slotSize
        let words = (SharedAccess.load64(slot), SharedAccess.load64(slot + 8))
        responseConsumer &+= 1
        let rawId = words.0
        let rawOperation = UInt8(truncatingIfNeeded: words.1)
        let rawStatus = Int16(truncatingIfNeeded: words.1 >> 16)
        // Id in range, in flight, operation echoed, status known (R3); the violation is
        // built out of line, so the hot path keeps its registers.
        guard rawId < UInt64(ringSize), shadow[Int(rawId)].active,
            rawOperation == shadow[Int(rawId)].operation.rawValue, let status = BlkStatus(rawValue: rawStatus)
        else { throw rejectResponse(id: rawId, operation: rawOperation, status: rawStatus) }
        let id = Int(rawId)
        let operation = shadow[id].operation  // the echo matched what we posted
        // Revoke first, then copy: once try-end succeeded the backend can no longer write
        // the page under us (XSA-396 order).
        if !endGrants(id, readOnly: operation == .write) { throw stickyViolation() }
        let request = shadow[id]
        if status == .okay, operation == .read, let destination = request.destination {
            let first = id &* BlkifLayout.maxSegments
            if request.segmentCount == 1 {  // up to 4 KiB: one page, no loop
                let page = memory.grants.page(segmentFrames[first])
                SharedAccess.copy(from: page, to: destination, count: min(SharedRingLayout.pageSize, request.byteCount))
            } else {
                var offset = 0
                for k in first..<(first &+ request.segmentCount) {
                    let bytes = min(SharedRingLayout.pageSize, request.byteCount &- offset)
                    SharedAccess.copy(
                        from: memory.grants.page(segmentFrames[k]), to: destination + offset, count: bytes)
                    offset &+= bytes
                }
            }
        }
        release(id)
        return BlkCompletion(
            token: request.token, id: UInt16(truncatingIfNeeded: id), operation: operation, status: status)
    }

    /// The producer check failed: backwards (R3: never) or beyond what is in flight.
    @inline(never)
    func rejectProducer(_ producer: UInt32) -> XenViolation {
        if Int32(bitPattern: producer &- responseConsumer) < 0 {
            return disable(.xenResponseProducerWentBackwards(consumer: responseConsumer, producer: producer))
        }
        return disable(
            .xenResponseProducerBeyondInFlight(consumer: responseConsumer, producer: producer, inFlight: inFlightCount))
    }

    /// One of the response checks failed: names the first, in the order they are made,
    /// from the private copy of the response (never re-read, R2).
    @inline(never)
    func rejectResponse(id rawId: UInt64, operation rawOperation: UInt8, status rawStatus: Int16) -> XenViolation {
        guard rawId < UInt64(ringSize) else { return disable(.xenResponseIdOutOfRange(id: rawId, ringSize: ringSize)) }
        let id = Int(rawId)
        guard shadow[id].active else { return disable(.xenResponseIdNotInFlight(id: rawId)) }
        let expected = shadow[id].operation.rawValue
        guard rawOperation == expected else {
            return disable(.xenResponseOperationMismatch(id: rawId, expected: expected, got: rawOperation))
        }
        return disable(.xenResponseStatusUnknown(id: rawId, status: rawStatus))
    }

    /// Revokes every grant of `id` (one compare-exchange each); a page whose grant cannot
    /// be revoked is quarantined and the device disabled (XSA-396: "backend has not
    /// unmapped grant"), the first failure being the violation. False on any failure.
    @inline(__always)
    func endGrants(_ id: Int, readOnly: Bool) -> Bool {
        let first = id &* BlkifLayout.maxSegments
        let count = shadow[id].segmentCount
        if count == 1 { return endGrant(first, readOnly: readOnly) }  // the common case, no loop
        var ended = true
        for k in first..<(first &+ count) where !endGrant(k, readOnly: readOnly) { ended = false }
        return ended
    }

    /// Revokes the grant of segment slot `k` (if not revoked already); false if the
    /// backend kept it (quarantined, device disabled).
    @inline(__always)
    func endGrant(_ k: Int, readOnly: Bool) -> Bool {
        let ref = segmentRefs[k]
        guard ref != .max else { return true }
        segmentRefs[k] = .max
        if let found = grants.tryEndAccess(ref, readOnly: readOnly) {
            quarantine(frame: segmentFrames[k], ref: ref, found: found, readOnly: readOnly)
            return false
        }
        freeFrames.push(segmentFrames[k])
        return true
    }

    /// The cold half of `endGrants`: the page is never reused (R7) and the device is
    /// disabled with the first such failure (R6).
    @inline(never)
    func quarantine(frame: UInt32, ref: UInt32, found: UInt16, readOnly: Bool) {
        quarantinedFrames.append(frame)
        if found & (GrantLayout.reading | GrantLayout.writing) != 0 {
            _ = disable(.xenGrantStillMapped(ref: ref, flags: found))
        } else {
            _ = disable(
                .xenGrantFlagsScribbled(ref: ref, expected: GrantIssuer.expectedFlags(readOnly: readOnly), found: found)
            )
        }
    }

    @inline(__always)
    func release(_ id: Int) {
        shadow[id] = Shadow()
        freeIds.push(UInt16(truncatingIfNeeded: id))
        inFlightCount &-= 1
    }

    /// Disables the device (sticky, R6) and returns the violation to throw.
    public func disable(_ v: XenViolation) -> XenViolation {
        if violation == nil {
            violation = v
            isBroken = true
        }
        return violation ?? v
    }

    /// Hands back the tokens of every request in flight (after a violation or a
    /// timeout), revoking their grants; pages still mapped stay quarantined.
    public func failAll() -> [UInt64] {
        var tokens: [UInt64] = []
        for id in 0..<ringSize where shadow[id].active {
            _ = endGrants(id, readOnly: shadow[id].operation == .write)  // failures quarantined
            tokens.append(shadow[id].token)
            release(id)
        }
        return tokens
    }

    /// RING_FINAL_CHECK_FOR_RESPONSES: asks for an event at the next response, then
    /// re-checks (with a full fence between) so a response published meanwhile is not
    /// slept through. True if there is something to consume.
    public func enableNotifications() -> Bool {
        guard !isBroken else { return false }
        if responseConsumer != responseSnapshot { return true }
        if SharedAccess.load32Acquire(ring + SharedRingLayout.responseProducer) != responseConsumer { return true }
        SharedAccess.store32(ring + SharedRingLayout.responseEvent, responseConsumer &+ 1)
        SharedAccess.fullFence()
        return SharedAccess.load32Acquire(ring + SharedRingLayout.responseProducer) != responseConsumer
    }
}

extension BlkFrontend {
    /// The request copy under a hook: every byte past what the request defines is zeroed,
    /// the hook may rewrite any of them, and all of it goes into the slot.
    @inline(never)
    func postHooked(_ hooks: any XenFrontendHooks, segments: Int) {
        let defined = Self.requestBytes(segments: segments)
        (scratch + defined).initializeMemory(as: UInt8.self, repeating: 0, count: BlkifLayout.requestSize - defined)
        hooks.willPost(scratch, frontend: self)
        let slot = ring + SharedRingLayout.headerSize + Int(requestProducer & mask) * BlkifLayout.slotSize
        slot.copyMemory(from: scratch, byteCount: BlkifLayout.requestSize)
    }
}

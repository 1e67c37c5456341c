import SharedMemory

/// A validated tx completion: every slot of the frame posted with `token` was answered.
public struct NetTxCompletion: Sendable, Equatable {
    public let token: UInt64
    /// OKAY only if every slot was; else the first ERROR or DROPPED seen.
    public let status: NetStatus
}

/// GSO metadata of a frame (the `netif_extra_info` GSO segment), validated.
public struct NetGSO: Sendable, Equatable {
    public var type: NetGSOType
    public var size: UInt16

    public init(type: NetGSOType, size: UInt16) {
        self.type = type
        self.size = size
    }
}

/// A validated received frame: `length` bytes were copied into the caller's buffer (at
/// most its size: `truncated` says the frame was longer). A frame the backend failed
/// (ERROR/DROPPED in a slot) has that status and no bytes.
public struct NetReceivedFrame: Sendable, Equatable {
    public let length: Int
    public let status: NetStatus
    public let slots: Int
    public let flags: UInt16
    public let gso: NetGSO?
    public let truncated: Bool
}

/// Why a frame could not be posted. Only `.broken` is the backend's fault.
public enum NetSubmitError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The device is disabled for further use (R6); reconnect to recover.
    case broken(XenViolation)
    /// Not enough free tx slots; consume completions and retry.
    case full
    /// Not enough bounce pages or grant refs left (some may be quarantined, R7).
    case noBounceSpace
    /// Frames are 1...65535 bytes.
    case invalidLength(Int)

    public var description: String {
        switch self {
        case .broken(let v): return "device disabled: \(v)"
        case .full: return "tx ring full"
        case .noBounceSpace: return "no bounce pages or grant refs left"
        case .invalidLength(let n): return "invalid frame length \(n) (1...65535)"
        }
    }
}

/// The frontend's view of the shared memory: the two ring pages and the bounce pages,
/// all frames of one grant table.
public struct NetFrontendMemory: @unchecked Sendable {
    public let grants: GrantTableMemory
    public let txRingFrame: UInt32
    public let rxRingFrame: UInt32

    public init(grants: GrantTableMemory, txRingFrame: UInt32 = 0, rxRingFrame: UInt32 = 1) {
        self.grants = grants
        self.txRingFrame = txRingFrame
        self.rxRingFrame = rxRingFrame
    }
}

/// The hardened netif frontend on one tx and one rx ring ("netfront without trusting
/// netback": the checks Linux added after XSA-391/392/403, in one mode, always on).
///
/// - R1: requests are built privately and stored whole; ids, grant refs, pages and both
///   req_prods live in private shadow state and are never read back.
/// - R2: rsp_prod is loaded once per batch (acquire), each response copied once.
/// - R3: `rsp_prod - rsp_cons <=` slots in flight, never backwards; tx ids in flight,
///   statuses known (NULL only for an outstanding extra-info slot); rx ids in range,
///   posted, answering their own ring position, `offset + status` within the page,
///   extra-info types known and at most one per type, GSO fields valid.
/// - R5: more_data chains at most `maxSlotsPerFrame` and within what was published.
/// - R6/R7: the first violation disables the device; every page is a private bounce page;
///   a tx page holds its frame and zeroes only (zeroed past the payload on reuse); an rx
///   page is zeroed whenever its audience changes (before the first grant of each
///   `NetFrontend`, i.e. of each connection) and otherwise holds only what this
///   connection's backend wrote (see `refillRx`); rx and tx pages stay granted across
///   uses (persistent grants, `refillRx`, `txGrant`) and are revoked by `failAll`; a tx
///   grant the backend still maps (or whose flags it changed) when its frame completes,
///   or any grant it still maps when we revoke it, is quarantined.
///
/// Not thread-safe: one owner at a time.
public final class NetFrontend {
    struct TxShadow {
        var token: UInt64 = 0
        var head: UInt16 = 0
        var ref: UInt32 = .max
        var frame: UInt32 = .max
        /// Posted and not answered yet.
        var active = false
        /// On the head: slots of the frame not answered yet, and the worst status.
        var remaining = 0
        var status = NetStatus.okay
    }

    struct RxShadow {
        var ref: UInt32 = .max
        var frame: UInt32 = .max
        var active = false
    }

    public let memory: NetFrontendMemory
    public let grants: GrantIssuer
    public let txRingSize = NetifLayout.txRingSize
    public let rxRingSize = NetifLayout.rxRingSize
    let txMask: UInt32
    let rxMask: UInt32
    let txRing: UnsafeMutableRawPointer
    let rxRing: UnsafeMutableRawPointer

    /// The tables own their memory; the hot path indexes their base pointers (a field
    /// access then touches that field, not a copy of the whole element).
    let tables:
        (
            tx: PrivateTable<TxShadow>, rx: PrivateTable<RxShadow>, dirty: PrivateTable<Int>,
            zeroed: PrivateTable<Bool>, pageRef: PrivateTable<UInt32>
        )
    let txShadow: UnsafeMutablePointer<TxShadow>
    let rxShadow: UnsafeMutablePointer<RxShadow>
    let freeTxIds: PrivateStack<UInt16>
    let txFrames: PrivateStack<UInt32>
    let rxFrames: PrivateQueue<UInt32>
    /// The grant ref each bounce page (rx or tx) holds while it is granted (.max: not
    /// granted). A page is granted once, before its first use (rx pages writable, tx pages
    /// read-only), and stays granted to this connection's backend across its uses
    /// (persistent, as blkfront's persistent grants): it is revoked only by `failAll` (the
    /// end of the connection takes the memory away). See `refillRx` and `txGrant` for why
    /// that is safe. Refs come from two contiguous blocks claimed at init (rx, then tx), so
    /// a page's entry shares its cache line only with pages of its own ring.
    let pageRef: UnsafeMutablePointer<UInt32>
    /// Bytes of each tx page that may be non-zero (private): a page is zeroed beyond the
    /// payload up to here on reuse, so it never holds more than the frame it carries.
    let txDirty: UnsafeMutablePointer<Int>
    /// rx pages zeroed once before their first grant.
    let rxZeroed: UnsafeMutablePointer<Bool>
    /// Refs claimed at init for the rx pages' first grants (private, popped from the end).
    @exclusivity(unchecked) var rxRefBlock: [UInt32]
    /// Refs claimed at init for the tx pages' first grants (private, popped from the end).
    @exclusivity(unchecked) var txRefBlock: [UInt32]
    @exclusivity(unchecked) public private(set) var quarantinedFrames: [UInt32] = []

    @exclusivity(unchecked) var txRequestProducer: UInt32 = 0
    @exclusivity(unchecked) var txPublished: UInt32 = 0
    @exclusivity(unchecked) var txResponseConsumer: UInt32 = 0
    @exclusivity(unchecked) var txSnapshot: UInt32 = 0
    /// Request slots (data and extra info) not answered yet.
    @exclusivity(unchecked) public private(set) var txSlotsInFlight = 0
    @exclusivity(unchecked) var txExtrasInFlight = 0
    @exclusivity(unchecked) var framesInFlight = 0
    /// Frames posted on tx and not completed yet. (Computed: a client module reading a
    /// public stored var would check exclusivity dynamically on every read.)
    public var txFramesInFlight: Int { framesInFlight }

    @exclusivity(unchecked) var rxRequestProducer: UInt32 = 0
    @exclusivity(unchecked) var rxPublished: UInt32 = 0
    @exclusivity(unchecked) var rxResponseConsumer: UInt32 = 0
    @exclusivity(unchecked) var rxSnapshot: UInt32 = 0
    @exclusivity(unchecked) public private(set) var rxPosted = 0

    @exclusivity(unchecked) public private(set) var violation: XenViolation?
    @exclusivity(unchecked) public private(set) var isBroken = false
    /// The Adversary's hook points (nil in service).
    @exclusivity(unchecked) public var hooks: (any XenNetFrontendHooks)? {
        didSet { hooked = hooks != nil }
    }
    /// `hooks != nil` as one byte: the hot path tests it without loading (and retaining)
    /// the existential.
    @exclusivity(unchecked) var hooked = false

    /// Pages for tx bounce buffers and for posted rx buffers: every frame of the grant
    /// table but the two rings, split in half unless `rxPages` says otherwise (at most
    /// one ring's worth of each).
    public init(memory: NetFrontendMemory, grants: GrantIssuer, rxPages: Int? = nil) {
        self.memory = memory
        self.grants = grants
        txMask = UInt32(NetifLayout.txRingSize - 1)
        rxMask = UInt32(NetifLayout.rxRingSize - 1)
        txRing = memory.grants.page(memory.txRingFrame)
        rxRing = memory.grants.page(memory.rxRingFrame)
        for ring in [txRing, rxRing] {
            ring.initializeMemory(as: UInt8.self, repeating: 0, count: SharedRingLayout.pageSize)
            SharedAccess.store32(ring + SharedRingLayout.requestEvent, 1)
            SharedAccess.store32(ring + SharedRingLayout.responseEvent, 1)
        }
        tables = (
            PrivateTable(repeating: TxShadow(), count: NetifLayout.txRingSize),
            PrivateTable(repeating: RxShadow(), count: NetifLayout.rxRingSize),
            // Unknown contents at first: the first use zeroes the whole page past the payload.
            PrivateTable(repeating: SharedRingLayout.pageSize, count: memory.grants.frameCount),
            PrivateTable(repeating: false, count: memory.grants.frameCount),
            PrivateTable(repeating: UInt32.max, count: memory.grants.frameCount)
        )
        txShadow = tables.tx.base
        rxShadow = tables.rx.base
        txDirty = tables.dirty.base
        rxZeroed = tables.zeroed.base
        pageRef = tables.pageRef.base
        freeTxIds = PrivateStack(capacity: NetifLayout.txRingSize)
        for id in (0..<NetifLayout.txRingSize).reversed() { freeTxIds.push(UInt16(id)) }
        var pages = (0..<memory.grants.frameCount).map { UInt32($0) }
        pages.removeAll { $0 == memory.txRingFrame || $0 == memory.rxRingFrame }
        let rxCount = min(NetifLayout.rxRingSize, max(0, min(rxPages ?? pages.count / 2, pages.count)))
        rxFrames = PrivateQueue(capacity: rxCount)
        for frame in pages.prefix(rxCount) { rxFrames.push(frame) }
        rxRefBlock = grants.claim(count: rxCount)
        let tx = pages.dropFirst(rxCount).prefix(NetifLayout.txRingSize)
        txRefBlock = grants.claim(count: tx.count)
        txFrames = PrivateStack(capacity: tx.count)
        for frame in tx.reversed() { txFrames.push(frame) }
    }

    /// Bounce pages still usable for tx (quarantined ones excluded).
    public var availableTxPages: Int { txFrames.count }

    // MARK: tx

    /// Posts one frame (copied now into zeroed bounce pages, granted read-only), split in
    /// 4 KiB slots chained with more_data; a GSO segment follows the first slot when given.
    /// `publishTx()` makes it visible.
    public func submit(frame: UnsafeRawBufferPointer, token: UInt64, gso: NetGSO? = nil) throws(NetSubmitError) {
        if isBroken { throw .broken(stickyViolation()) }
        let count = frame.count
        guard count > 0, count <= NetifLayout.maxFrameSize, let source = frame.baseAddress else {
            throw .invalidLength(count)
        }
        let page = SharedRingLayout.pageSize
        let slots = (count + page - 1) / page
        let extras = gso == nil ? 0 : 1
        guard txSlotsInFlight + slots + extras <= txRingSize, freeTxIds.count >= slots else { throw .full }
        // Each slot needs a page, and a ref if its page is not granted yet.
        guard txFrames.count >= slots, grants.available &+ txRefBlock.count >= slots else { throw .noBounceSpace }
        if slots == 1 && extras == 0 {
            postSingle(source, count: count, token: token)
            return
        }
        var head: UInt16 = 0
        var offset = 0
        for s in 0..<slots {
            guard let id = freeTxIds.pop(), let frameNumber = txFrames.pop() else { break }  // counted above
            let bytes = min(page, count - offset)
            let bounce = memory.grants.page(frameNumber)
            // R7: the page holds this frame's bytes and zeroes, nothing older: what an
            // earlier, longer frame left past this payload is zeroed (tracked privately).
            bounce.copyMemory(from: source + offset, byteCount: bytes)
            let dirty = txDirty[Int(frameNumber)]
            if dirty > bytes { (bounce + bytes).initializeMemory(as: UInt8.self, repeating: 0, count: dirty - bytes) }
            txDirty[Int(frameNumber)] = bytes
            let ref = txGrant(frameNumber)
            if s == 0 { head = id }
            var flags: UInt16 = s < slots - 1 ? NetFlags.txMoreData : 0
            if s == 0 && extras > 0 { flags |= NetFlags.txExtraInfo }
            // The first slot's size is the whole frame's (netif.h).
            writeTxRequest(ref: ref, offset: 0, flags: flags, id: id, size: UInt16(s == 0 ? count : bytes))
            txShadow[Int(id)] = TxShadow(token: token, head: head, ref: ref, frame: frameNumber, active: true)
            if s == 0, let gso { writeTxExtra(gso) }
            offset += bytes
        }
        txShadow[Int(head)].remaining = slots
        txSlotsInFlight += slots + extras
        txExtrasInFlight += extras
        framesInFlight += 1
    }

    /// A frame of one slot without extra info (the common case, up to 4 KiB): the loop of
    /// `submit` without its bookkeeping. The caller checked ids, pages and refs.
    @inline(__always)
    func postSingle(_ source: UnsafeRawPointer, count: Int, token: UInt64) {
        guard let id = freeTxIds.pop(), let frameNumber = txFrames.pop() else { return }
        let bounce = memory.grants.page(frameNumber)
        bounce.copyMemory(from: source, byteCount: count)
        let dirty = txDirty[Int(frameNumber)]
        if dirty > count { (bounce + count).initializeMemory(as: UInt8.self, repeating: 0, count: dirty &- count) }
        txDirty[Int(frameNumber)] = count
        let ref = txGrant(frameNumber)
        writeTxRequest(ref: ref, offset: 0, flags: 0, id: id, size: UInt16(truncatingIfNeeded: count))
        txShadow[Int(id)] = TxShadow(
            token: token, head: id, ref: ref, frame: frameNumber, active: true, remaining: 1, status: .okay)
        txSlotsInFlight &+= 1
        framesInFlight &+= 1
    }

    /// Posts up to `frames.count` frames in one call, frame `i` with token
    /// `firstToken &+ i`, each exactly as `submit(frame:token:)` posts it (bounced, zeroed
    /// past the payload, persistent read-only grant); returns how many were posted.
    /// `publishTx()` makes them visible. It stops at the first frame that does not fit (ring
    /// slots, tx ids, bounce pages or grant refs used up): the count so far is returned, 0
    /// if none fit (never `.full` or `.noBounceSpace`). A frame of invalid length throws if
    /// it is the first, else the count before it is returned (the next call, starting at
    /// it, throws). A disabled device throws `.broken`.
    public func submitBatch(_ frames: UnsafeBufferPointer<UnsafeRawBufferPointer>, firstToken: UInt64)
        throws(NetSubmitError) -> Int
    {
        if isBroken { throw .broken(stickyViolation()) }
        let total = frames.count
        guard let list = frames.baseAddress else { return 0 }
        var n = 0
        while n < total {
            if !hooked {
                // One-slot frames (1...4096 bytes, no extra info): their resources are
                // counted once for the run instead of once per frame. Sound because each
                // such frame takes exactly one ring slot, one tx id, one bounce page and at
                // most one ref (for a page not granted yet), and nothing gives any of them
                // back or takes any other until this loop ends: one owner, no completion is
                // reaped here, and a violation cannot happen on the tx post path. (With a
                // hook set every frame takes `submit`'s path, hook calls and all.)
                var room = min(
                    txRingSize &- txSlotsInFlight, freeTxIds.count, txFrames.count,
                    grants.available &+ txRefBlock.count)
                while n < total, room > 0 {
                    let frame = list[n]
                    let count = frame.count
                    guard count > 0, count <= SharedRingLayout.pageSize, let source = frame.baseAddress else { break }
                    postSingleCounted(source, count: count, token: firstToken &+ UInt64(truncatingIfNeeded: n))
                    n &+= 1
                    room &-= 1
                }
                if n == total { break }
            }
            // Everything else (chains, a full ring, a bad length, hooks): `submit`'s checks.
            do { try submit(frame: list[n], token: firstToken &+ UInt64(truncatingIfNeeded: n)) } catch {
                if case .broken = error { throw error }
                if n > 0 { return n }
                if case .invalidLength = error { throw error }
                return 0
            }
            n &+= 1
        }
        return n
    }

    /// `postSingle` with every resource counted by the caller (`submitBatch`) and no hook
    /// set: pops without re-testing, the slot stored directly. Kept apart from
    /// `postSingle`'s body on purpose: sharing it (through `writeTxRequest`, which must
    /// offer the slot to a hook) costs 8 more instructions a frame in `submitBatch`
    /// (callgrind, xen-net-bench 64 B: 97.5 against 89.3).
    @inline(__always)
    func postSingleCounted(_ source: UnsafeRawPointer, count: Int, token: UInt64) {
        let id = freeTxIds.popCounted()
        let frameNumber = txFrames.popCounted()
        let bounce = memory.grants.page(frameNumber)
        bounce.copyMemory(from: source, byteCount: count)
        let dirtySlot = txDirty + Int(frameNumber)
        let dirty = dirtySlot.pointee
        if dirty > count { (bounce + count).initializeMemory(as: UInt8.self, repeating: 0, count: dirty &- count) }
        dirtySlot.pointee = count
        let ref = txGrant(frameNumber)
        let producer = txRequestProducer
        let slot = txRing + SharedRingLayout.headerSize + Int(producer & txMask) * NetifLayout.txSlotSize
        SharedAccess.store32(slot, ref)
        SharedAccess.store32(slot + 4, 0)  // offset 0, flags 0
        SharedAccess.store32(slot + 8, UInt32(id) | UInt32(truncatingIfNeeded: count) << 16)
        txRequestProducer = producer &+ 1
        txShadow[Int(id)] = TxShadow(
            token: token, head: id, ref: ref, frame: frameNumber, active: true, remaining: 1, status: .okay)
        txSlotsInFlight &+= 1
        framesInFlight &+= 1
    }

    /// The ref of a tx page: its persistent read-only grant, made on the page's first use.
    /// Why a tx page may stay granted across frames (docs/xen.md "Netif", persistent tx
    /// grants), as for rx pages (`refillRx`):
    /// - R7, audience: a tx page only ever holds zeroes and frames sent to this backend
    ///   (each frame is copied in whole and the page zeroed past it, `txDirty`); tx and rx
    ///   pools are disjoint and fixed at init, every page of a new `NetFrontend` (a new
    ///   connection) is zeroed past the payload on its first use, and a disabled frontend
    ///   grants nothing. Reading the page at any time shows the backend nothing it was not
    ///   sent or is not about to be sent.
    /// - The grant is read-only: the backend cannot write the page (and we never read it
    ///   back, R1).
    /// - XSA-396: at each completion the entry's flags are loaded once (`checkTxGrant`): a
    ///   page the backend still maps (GTF_reading) or flags it scribbled quarantine the
    ///   page and disable the device, as the compare-exchange revocation did; `failAll`
    ///   revokes every tx grant with the compare-exchange and quarantines a page still
    ///   mapped.
    @inline(__always)
    func txGrant(_ frameNumber: UInt32) -> UInt32 {
        let ref = pageRef[Int(frameNumber)]
        return ref != .max ? ref : grantTxPage(frameNumber)
    }

    /// First use of a tx page (or first after `failAll` revoked it): granted read-only
    /// with a ref of the tx block (or a free one; `submit` counted them).
    @inline(never)
    func grantTxPage(_ frameNumber: UInt32) -> UInt32 {
        guard let ref = txRefBlock.popLast() ?? grants.claim() else { return 0 }  // counted in `submit`
        grants.grant(ref: ref, frame: frameNumber, readOnly: true)
        pageRef[Int(frameNumber)] = ref
        return ref
    }

    /// A tx page's grant at its completion: the flags must be exactly the read-only grant
    /// we wrote, with no mapping pinned (one load, no compare-exchange: the grant stays).
    /// Otherwise the ref and page are quarantined for good and the device disabled (R7,
    /// XSA-396). False on failure.
    @inline(__always)
    func checkTxGrant(_ ref: UInt32, frame: UInt32) -> Bool {
        let found = grants.memory.flagsAtomic(ref).load(ordering: .acquiring)
        if found == GrantLayout.permitAccess | GrantLayout.readOnly { return true }
        return quarantineTx(ref, frame: frame, found: found)
    }

    @inline(never)
    func quarantineTx(_ ref: UInt32, frame: UInt32, found: UInt16) -> Bool {
        grants.quarantine(ref)
        pageRef[Int(frame)] = .max
        quarantinedFrames.append(frame)
        if found & (GrantLayout.reading | GrantLayout.writing) != 0 {
            _ = disable(.xenGrantStillMapped(ref: ref, flags: found))
        } else {
            _ = disable(
                .xenGrantFlagsScribbled(ref: ref, expected: GrantIssuer.expectedFlags(readOnly: true), found: found))
        }
        return false
    }

    /// One tx request, stored whole into the next slot (R1).
    func writeTxRequest(ref: UInt32, offset: UInt16, flags: UInt16, id: UInt16, size: UInt16) {
        storeTxSlot((ref, UInt32(offset) | UInt32(flags) << 16, UInt32(id) | UInt32(size) << 16), isExtra: false)
    }

    /// Stores one whole 12-byte slot (R1), through the hook if one is set.
    func storeTxSlot(_ words: (UInt32, UInt32, UInt32), isExtra: Bool) {
        var words = words
        if hooked, let hooks {
            withUnsafeMutableBytes(of: &words) { b in
                if let base = b.baseAddress { hooks.willPostTx(base, isExtra: isExtra, frontend: self) }
            }
        }
        let slot = txRing + SharedRingLayout.headerSize + Int(txRequestProducer & txMask) * NetifLayout.txSlotSize
        SharedAccess.store32(slot, words.0)
        SharedAccess.store32(slot + 4, words.1)
        SharedAccess.store32(slot + 8, words.2)
        txRequestProducer &+= 1
    }

    /// A GSO extra-info segment in the next tx slot (the slot's last 4 bytes zeroed).
    func writeTxExtra(_ gso: NetGSO) {
        storeTxSlot(
            (UInt32(NetExtraType.gso.rawValue) | UInt32(gso.size) << 16, UInt32(gso.type.rawValue), 0), isExtra: true)
    }

    /// Publishes the tx req_prod; true if the backend asked to be notified (decided from
    /// the private last-published value, R1).
    public func publishTx() -> Bool {
        guard !isBroken, txRequestProducer != txPublished else { return false }
        let new = txRequestProducer
        SharedAccess.store32Release(
            txRing + SharedRingLayout.requestProducer, hooked ? hooks?.willPublishTx(requestProducer: new) ?? new : new)
        SharedAccess.fullFence()
        let event = SharedAccess.load32(txRing + SharedRingLayout.requestEvent)
        let old = txPublished
        txPublished = new
        return new &- event < new &- old
    }

    /// The next validated tx completion (a frame whose slots were all answered); nil
    /// when nothing new is published. Throws (for good, R6) on the first violation.
    public func nextTxCompletion() throws(XenViolation) -> NetTxCompletion? {
        if isBroken { throw stickyViolation() }
        return try txCompletion(load: true)
    }

    /// Up to `results.count` validated tx completions in one call, on one load of
    /// rsp_prod; returns how many (0: nothing new published). Every rule of
    /// `nextTxCompletion` is checked on every response. On a bad response in the middle of
    /// a batch the completions before it are returned, nothing after it is read, the
    /// device is disabled at once (R6) and the next call throws the violation; a bad
    /// first response throws now.
    public func reapTxBatch(into results: UnsafeMutableBufferPointer<NetTxCompletion>) throws(XenViolation) -> Int {
        if isBroken { throw stickyViolation() }
        guard let out = results.baseAddress else { return 0 }
        let limit = results.count
        var n = 0
        var load = true  // rsp_prod once per batch
        do {
            while n < limit, let done = try txCompletion(load: load) {
                (out + n).initialize(to: done)
                n &+= 1
                load = false
            }
        } catch {
            if n > 0 { return n }
            throw error
        }
        return n
    }

    /// The next whole tx completion from the published responses; nil when the snapshot
    /// is used up and `load` is false, or nothing new is published.
    @inline(__always)
    func txCompletion(load: Bool) throws(XenViolation) -> NetTxCompletion? {
        var load = load
        while true {
            if txResponseConsumer == txSnapshot {
                guard load else { return nil }
                load = false
                let producer = SharedAccess.load32Acquire(txRing + SharedRingLayout.responseProducer)
                let delta = producer &- txResponseConsumer
                if delta == 0 { return nil }
                guard delta <= UInt32(truncatingIfNeeded: txSlotsInFlight) else {
                    throw rejectProducer(producer, consumer: txResponseConsumer, inFlight: txSlotsInFlight)
                }
                txSnapshot = producer
            }
            let position = txResponseConsumer
            let slot = txRing + SharedRingLayout.headerSize + Int(position & txMask) * NetifLayout.txSlotSize
            let word = SharedAccess.load32(slot)  // id and status, one copy (R2)
            txResponseConsumer &+= 1
            let rawId = UInt16(truncatingIfNeeded: word)
            let rawStatus = Int16(bitPattern: UInt16(truncatingIfNeeded: word >> 16))
            // The common completion: OKAY for the head of a frame in flight whose last
            // unanswered slot it is (a one-slot frame, or a chain answered head last). The
            // same checks and state changes as the general path below, without its chain
            // bookkeeping; anything else, every violation included, takes the general path.
            if rawStatus == NetStatus.okay.rawValue, Int(rawId) < txRingSize {
                let shadow = txShadow + Int(rawId)
                if shadow.pointee.active, shadow.pointee.head == rawId, shadow.pointee.remaining == 1 {
                    let ref = shadow.pointee.ref
                    let frameNumber = shadow.pointee.frame
                    shadow.pointee.active = false
                    shadow.pointee.ref = .max  // the page is back (still granted, persistent)
                    txSlotsInFlight &-= 1
                    if !checkTxGrant(ref, frame: frameNumber) { throw stickyViolation() }
                    txFrames.push(frameNumber)
                    let done = NetTxCompletion(token: shadow.pointee.token, status: shadow.pointee.status)
                    // Free: not active, no ref, nothing remaining (what `failAll` and the
                    // checks above look at); the next post rewrites the whole entry.
                    shadow.pointee.remaining = 0
                    freeTxIds.push(rawId)
                    framesInFlight &-= 1
                    return done
                }
            }
            if rawStatus == NetStatus.null.rawValue {
                // The answer to an extra-info slot: only as many as we posted.
                guard txExtrasInFlight > 0 else { throw disable(.xenNetUnexpectedNullResponse(position: position)) }
                txExtrasInFlight -= 1
                txSlotsInFlight -= 1
                continue
            }
            guard Int(rawId) < txRingSize else {
                throw disable(.xenResponseIdOutOfRange(id: UInt64(rawId), ringSize: txRingSize))
            }
            let id = Int(rawId)
            guard txShadow[id].active else { throw disable(.xenResponseIdNotInFlight(id: UInt64(rawId))) }
            guard let status = NetStatus(rawValue: rawStatus), status != .null else {
                throw disable(.xenNetStatusUnknown(ring: "tx", id: rawId, status: rawStatus))
            }
            txShadow[id].active = false
            txSlotsInFlight -= 1
            let ref = txShadow[id].ref
            let frameNumber = txShadow[id].frame
            txShadow[id].ref = .max  // the page is back (still granted, persistent)
            if !checkTxGrant(ref, frame: frameNumber) { throw stickyViolation() }
            txFrames.push(frameNumber)
            let head = Int(txShadow[id].head)
            if status != .okay && txShadow[head].status == .okay { txShadow[head].status = status }
            txShadow[head].remaining -= 1
            if id != head { freeTxIds.push(rawId) }
            if txShadow[head].remaining == 0 {
                let done = NetTxCompletion(token: txShadow[head].token, status: txShadow[head].status)
                txShadow[head] = TxShadow()
                freeTxIds.push(UInt16(truncatingIfNeeded: head))
                framesInFlight -= 1
                return done
            }
        }
    }

    // MARK: rx

    /// Posts every free rx page (zeroed, granted writable) as an rx request; id is the
    /// ring position (as Linux's netfront), so a response must answer its own slot.
    /// Returns how many were posted; `publishRx()` makes them visible.
    @discardableResult
    public func refillRx() -> Int {
        guard !isBroken else { return 0 }
        var posted = 0
        // Counted once: each post takes one pooled page and one ring slot, and nothing in
        // the loop gives either back (the one exit that returns a page stops the loop).
        let count = min(rxRingSize &- rxPosted, rxFrames.count)
        while posted < count {
            let frameNumber = rxFrames.popCounted()
            let id = Int(rxRequestProducer & rxMask)
            var ref = pageRef[Int(frameNumber)]
            if ref == .max {
                // First post of the page in this frontend (or after `failAll` revoked it):
                // zeroed, then granted writable, and it stays granted. Why that is safe
                // (docs/xen.md "Netif", persistent rx grants):
                // - R7, audience: an rx page's audience is this frontend's backend, and only
                //   it. The page is zeroed before this frontend first grants it (nothing of
                //   an earlier connection or backend on the same memory survives,
                //   `rxZeroed` is per instance), rx and tx pages are disjoint pools fixed at
                //   init, we never write an rx page after zeroing it, and a disabled
                //   frontend grants nothing. So the page only ever holds zeroes and bytes
                //   this same backend wrote itself: nothing private, ever.
                // - R2, a page the backend may write at any time: a response is loaded once
                //   (one 8-byte copy), its id, offset and length validated on that private
                //   copy, the page chosen from our private shadow by position (never from
                //   anything the backend wrote), and its bytes copied exactly once into the
                //   caller's buffer; the page is never read again. A backend rewriting it
                //   during or after the copy only changes bytes it could have sent anyway.
                // - XSA-396: the page never leaves this backend's audience while granted, so
                //   a mapping it keeps cannot see anything else; `failAll` revokes every rx
                //   grant and quarantines a page still mapped.
                if !rxZeroed[Int(frameNumber)] {
                    memory.grants.page(frameNumber).initializeMemory(
                        as: UInt8.self, repeating: 0, count: SharedRingLayout.pageSize)
                    rxZeroed[Int(frameNumber)] = true
                }
                guard let claimed = rxRefBlock.popLast() ?? grants.claim() else {
                    rxFrames.push(frameNumber)
                    break
                }
                ref = claimed
                pageRef[Int(frameNumber)] = claimed
                grants.grant(ref: ref, frame: frameNumber, readOnly: false)
            }
            let slot = rxRing + SharedRingLayout.headerSize + id * NetifLayout.rxSlotSize
            SharedAccess.store64(slot, UInt64(id) | UInt64(ref) << 32)
            rxShadow[id] = RxShadow(ref: ref, frame: frameNumber, active: true)
            rxRequestProducer &+= 1
            rxPosted &+= 1  // < rxRingSize
            posted &+= 1
        }
        return posted
    }

    /// Publishes the rx req_prod; true if the backend asked to be notified.
    public func publishRx() -> Bool {
        guard !isBroken, rxRequestProducer != rxPublished else { return false }
        let new = rxRequestProducer
        SharedAccess.store32Release(rxRing + SharedRingLayout.requestProducer, new)
        SharedAccess.fullFence()
        let event = SharedAccess.load32(rxRing + SharedRingLayout.requestEvent)
        let old = rxPublished
        rxPublished = new
        return new &- event < new &- old
    }

    /// The next validated received frame, its bytes copied into `buffer`; nil when no
    /// response is published. A frame is all its slots (first, extra info, more_data),
    /// which must all be published (netback publishes whole frames). Throws (for good,
    /// R6) on the first violation; the pages of the frame go back to the rx pool.
    public func nextReceived(into buffer: UnsafeMutableRawBufferPointer) throws(XenViolation) -> NetReceivedFrame? {
        if isBroken { throw stickyViolation() }
        if rxResponseConsumer == rxSnapshot, try !snapshotRx() { return nil }
        return try receiveFrame(into: buffer, first: SharedAccess.load64(rxSlot(rxResponseConsumer)))
    }

    /// Loads the rx rsp_prod once (acquire) and checks it against what is posted (R2, R3);
    /// false when nothing new is published.
    @inline(__always)
    func snapshotRx() throws(XenViolation) -> Bool {
        let producer = SharedAccess.load32Acquire(rxRing + SharedRingLayout.responseProducer)
        let delta = producer &- rxResponseConsumer
        if delta == 0 { return false }
        guard delta <= UInt32(truncatingIfNeeded: rxPosted) else {
            throw rejectProducer(producer, consumer: rxResponseConsumer, inFlight: rxPosted)
        }
        rxSnapshot = producer
        return true
    }

    /// Up to `results.count` validated received frames in one call, on one load of
    /// rsp_prod: frame `i` is copied into `buffer` at `i * stride`, at most `stride` bytes
    /// (`stride` 0: every frame into the whole of `buffer`, each over the last, for a
    /// caller that only looks at the metadata); its metadata goes to `results[i]`. Returns
    /// how many frames were delivered (0: nothing published, or a negative `stride`). A
    /// place running past the end of `buffer` is cut there (the frame is `truncated`).
    ///
    /// Every rule of `nextReceived` is checked on every response. On a bad response in
    /// the middle of a batch the frames before it are returned (delivered: copied, their
    /// pages back in the pool), nothing after it is read, the device is disabled at once
    /// (R6) and the next call throws the violation; a bad first frame throws now.
    public func receiveBatch(
        into buffer: UnsafeMutableRawBufferPointer, stride: Int, results: UnsafeMutableBufferPointer<NetReceivedFrame>
    ) throws(XenViolation) -> Int {
        if isBroken { throw stickyViolation() }
        guard let out = results.baseAddress, stride >= 0 else { return 0 }
        let limit = results.count
        if rxResponseConsumer == rxSnapshot, try !snapshotRx() { return 0 }
        let page = SharedRingLayout.pageSize
        let base = buffer.baseAddress
        let size = buffer.count
        var n = 0
        var place = 0  // where frame n goes, at most `size` (no overflow for any stride)
        do {
            while n < limit && rxResponseConsumer != rxSnapshot {
                let room = stride == 0 ? size : min(stride, size &- place)
                let position = rxResponseConsumer
                let word = SharedAccess.load64(rxSlot(position))  // one copy of the response (R2)
                let id = Int(position & rxMask)
                let offset = Int(UInt16(truncatingIfNeeded: word >> 16))
                let flags = UInt16(truncatingIfNeeded: word >> 32)
                let rawStatus = Int16(bitPattern: UInt16(truncatingIfNeeded: word >> 48))
                // The common frame (one slot, no extra info, data): the id answers its own
                // position (so it is in range) and was posted, offset + size within the page.
                // Anything else, including every violation, takes the general path with the
                // same copy of the response.
                if UInt16(truncatingIfNeeded: word) == UInt16(truncatingIfNeeded: id), rxShadow[id].active,
                    flags & (NetFlags.rxMoreData | NetFlags.rxExtraInfo) == 0, rawStatus >= 0,
                    offset &+ Int(rawStatus) <= page
                {
                    rxResponseConsumer = position &+ 1
                    let frameNumber = releaseRx(id)  // still granted: copied once, never read again
                    let bytes = Int(rawStatus)
                    let copied = min(bytes, room)
                    let page = memory.grants.page(frameNumber)
                    if hooked { hooks?.willCopyRx(position: position, page: page) }
                    // The length and offset are the private copy's; the page is read once.
                    if copied > 0, let base { SharedAccess.copy(from: page + offset, to: base + place, count: copied) }
                    rxFrames.push(frameNumber)
                    (out + n).initialize(
                        to: NetReceivedFrame(
                            length: copied, status: .okay, slots: 1, flags: flags, gso: nil, truncated: bytes > room))
                } else {
                    let frame = try receiveFrame(
                        into: UnsafeMutableRawBufferPointer(start: base.map { $0 + place }, count: room), first: word)
                    (out + n).initialize(to: frame)
                }
                n &+= 1
                if stride != 0 { place &+= room }
            }
        } catch {
            // Disabled already (R6): the frames before the bad one are delivered, the next
            // call throws.
            if n > 0 { return n }
            throw error
        }
        return n
    }

    /// One whole frame from the published responses (at least one is), `first` the one
    /// copy of the response at `rxResponseConsumer`: the body of `nextReceived`.
    func receiveFrame(into buffer: UnsafeMutableRawBufferPointer, first: UInt64) throws(XenViolation)
        -> NetReceivedFrame
    {
        var length = 0
        var slots = 0
        var status = NetStatus.okay
        var truncated = false
        var firstFlags: UInt16 = 0
        var gso: NetGSO?
        var more = true
        var word = first
        while more {
            let position = rxResponseConsumer
            if slots > 0 {
                // R5: a chain no longer than a frame may be, and within what was published.
                guard slots < NetifLayout.maxSlotsPerFrame else {
                    throw disable(.xenNetChainTooLong(slots: slots + 1, limit: NetifLayout.maxSlotsPerFrame))
                }
                guard position != rxSnapshot else { throw disable(.xenNetChainIncomplete(slots: slots)) }
                word = SharedAccess.load64(rxSlot(position))  // one copy of the response (R2)
            }
            rxResponseConsumer &+= 1
            let rawId = UInt16(truncatingIfNeeded: word)
            let offset = UInt16(truncatingIfNeeded: word >> 16)
            let flags = UInt16(truncatingIfNeeded: word >> 32)
            let rawStatus = Int16(bitPattern: UInt16(truncatingIfNeeded: word >> 48))
            let frameNumber = try takeRxSlot(id: rawId, position: position)
            if slots == 0 { firstFlags = flags }
            slots += 1
            if rawStatus < 0 {
                guard let failed = NetStatus(rawValue: rawStatus) else {
                    throw disable(.xenNetStatusUnknown(ring: "rx", id: rawId, status: rawStatus))
                }
                if status == .okay { status = failed }
            } else {
                guard Int(offset) + Int(rawStatus) <= SharedRingLayout.pageSize else {
                    throw disable(.xenNetRxOffsetBeyondPage(id: rawId, offset: offset, size: rawStatus))
                }
                let bytes = Int(rawStatus)
                let room = max(0, buffer.count - length)
                if bytes > room { truncated = true }
                let page = memory.grants.page(frameNumber)
                if hooked { hooks?.willCopyRx(position: position, page: page) }
                if let base = buffer.baseAddress, room > 0, status == .okay {
                    SharedAccess.copy(from: page + Int(offset), to: base + length, count: min(bytes, room))
                }
                length += min(bytes, room)
            }
            rxFrames.push(frameNumber)
            if slots == 1 && flags & NetFlags.rxExtraInfo != 0 { gso = try takeRxExtras() }
            more = flags & NetFlags.rxMoreData != 0
        }
        if status != .okay { length = 0 }
        return NetReceivedFrame(
            length: length, status: status, slots: slots, flags: firstFlags, gso: gso, truncated: truncated)
    }

    @inline(__always)
    func rxSlot(_ position: UInt32) -> UnsafeMutableRawPointer {
        rxRing + SharedRingLayout.headerSize + Int(position & rxMask) * NetifLayout.rxSlotSize
    }

    /// Checks an rx response id (in range, posted, answering its own position) and frees
    /// its slot; returns the page's frame (still granted: persistent rx grants, `refillRx`).
    func takeRxSlot(id rawId: UInt16, position: UInt32) throws(XenViolation) -> UInt32 {
        guard Int(rawId) < rxRingSize else {
            throw disable(.xenResponseIdOutOfRange(id: UInt64(rawId), ringSize: rxRingSize))
        }
        let id = Int(rawId)
        guard rxShadow[id].active else { throw disable(.xenResponseIdNotInFlight(id: UInt64(rawId))) }
        let expected = UInt16(truncatingIfNeeded: position & rxMask)
        guard rawId == expected else { throw disable(.xenNetRxIdOutOfOrder(id: rawId, expected: expected)) }
        return releaseRx(id)
    }

    /// Frees the rx slot `id`; its page's frame. The page stays granted (persistent rx
    /// grants, `refillRx`): the caller copies what it needs out of it once, then pools it.
    @inline(__always)
    func releaseRx(_ id: Int) -> UInt32 {
        let shadow = rxShadow[id]
        rxShadow[id] = RxShadow()
        rxPosted &-= 1  // >= 1: the slot was active
        return shadow.frame
    }

    /// The extra-info segments after a first rx slot: each consumes the rx request posted
    /// at its position (whose page goes back to the pool unread). Types GSO and HASH only
    /// (MCAST is a tx-side request), at most one of each, GSO fields valid.
    func takeRxExtras() throws(XenViolation) -> NetGSO? {
        var seen: UInt8 = 0
        var count = 0
        var gso: NetGSO?
        var more = true
        while more {
            count += 1
            guard count <= NetifLayout.maxExtras else { throw disable(.xenNetExtraInfoChain(count: count)) }
            guard rxResponseConsumer != rxSnapshot else { throw disable(.xenNetChainIncomplete(slots: count)) }
            let position = rxResponseConsumer
            let word = SharedAccess.load64(rxSlot(position))
            rxResponseConsumer &+= 1
            let id = Int(position & rxMask)
            guard rxShadow[id].active else { throw disable(.xenResponseIdNotInFlight(id: UInt64(id))) }
            rxFrames.push(releaseRx(id))
            let type = UInt8(truncatingIfNeeded: word)
            let flags = UInt8(truncatingIfNeeded: word >> 8)
            guard type == NetExtraType.gso.rawValue || type == NetExtraType.hash.rawValue else {
                throw disable(.xenNetExtraInfoType(type: type))
            }
            guard seen & (1 << type) == 0 else { throw disable(.xenNetExtraInfoChain(count: count)) }
            seen |= 1 << type
            if type == NetExtraType.gso.rawValue {
                let size = UInt16(truncatingIfNeeded: word >> 16)
                let rawType = UInt8(truncatingIfNeeded: word >> 32)
                guard size > 0, let gsoType = NetGSOType(rawValue: rawType) else {
                    throw disable(.xenNetGSOField(type: rawType, size: size))
                }
                gso = NetGSO(type: gsoType, size: size)
            }
            more = flags & NetFlags.extraMore != 0
        }
        return gso
    }

    // MARK: grants, failure

    /// Revokes one grant (one compare-exchange); a page the backend still maps is
    /// quarantined and the device disabled (R7, XSA-396). False on failure.
    func endGrant(_ ref: UInt32, frame: UInt32, readOnly: Bool) -> Bool {
        guard ref != .max else { return true }
        guard let found = grants.tryEndAccess(ref, readOnly: readOnly) else { return true }
        quarantinedFrames.append(frame)
        if found & (GrantLayout.reading | GrantLayout.writing) != 0 {
            _ = disable(.xenGrantStillMapped(ref: ref, flags: found))
        } else {
            _ = disable(
                .xenGrantFlagsScribbled(ref: ref, expected: GrantIssuer.expectedFlags(readOnly: readOnly), found: found)
            )
        }
        return false
    }

    func rejectProducer(_ producer: UInt32, consumer: UInt32, inFlight: Int) -> XenViolation {
        if Int32(bitPattern: producer &- consumer) < 0 {
            return disable(.xenResponseProducerWentBackwards(consumer: consumer, producer: producer))
        }
        return disable(.xenResponseProducerBeyondInFlight(consumer: consumer, producer: producer, inFlight: inFlight))
    }

    func stickyViolation() -> XenViolation {
        violation ?? .deadlineExceeded(milliseconds: 0)  // unreachable: isBroken implies a violation
    }

    /// Disables the device (sticky, R6) and returns the violation to throw.
    public func disable(_ v: XenViolation) -> XenViolation {
        if violation == nil {
            violation = v
            isBroken = true
        }
        return violation ?? v
    }

    /// Hands back the tokens of every frame in flight (after a violation or a timeout),
    /// revoking all grants, tx and rx (persistent: pooled pages are granted too); pages
    /// still mapped stay quarantined.
    public func failAll() -> [UInt64] {
        var tokens: [UInt64] = []
        for id in 0..<txRingSize where txShadow[id].ref != .max || txShadow[id].remaining > 0 {
            let s = txShadow[id]
            if s.ref != .max { txFrames.push(s.frame) }  // revoked below with the pool
            if s.remaining > 0 { tokens.append(s.token) }
        }
        // Every tx page not quarantined is in the pool now: revoke the grants they keep.
        var pooled: [UInt32] = []
        while let frame = txFrames.pop() { pooled.append(frame) }
        for frame in pooled.reversed() {  // the stack's order kept
            let ref = pageRef[Int(frame)]
            pageRef[Int(frame)] = .max
            if endGrant(ref, frame: frame, readOnly: true) { txFrames.push(frame) }
        }
        for id in 0..<txRingSize where txShadow[id].active || txShadow[id].remaining > 0 {
            txShadow[id] = TxShadow()
            freeTxIds.push(UInt16(id))
        }
        txSlotsInFlight = 0
        txExtrasInFlight = 0
        framesInFlight = 0
        for id in 0..<rxRingSize where rxShadow[id].active { rxFrames.push(releaseRx(id)) }
        // Every rx page is in the pool now: revoke the grants they keep (persistent); a page
        // the backend still maps is quarantined (never pooled again, R7).
        for _ in 0..<rxFrames.count {
            guard let frame = rxFrames.pop() else { break }
            let ref = pageRef[Int(frame)]
            pageRef[Int(frame)] = .max
            if endGrant(ref, frame: frame, readOnly: false) { rxFrames.push(frame) }
        }
        return tokens
    }

    /// RING_FINAL_CHECK_FOR_RESPONSES on both rings: asks for an event at the next
    /// response, then re-checks after a full fence. True if something is waiting.
    public func enableNotifications() -> Bool {
        guard !isBroken else { return false }
        var pending = false
        for (ring, consumer, snapshot) in [
            (txRing, txResponseConsumer, txSnapshot), (rxRing, rxResponseConsumer, rxSnapshot),
        ] {
            if consumer != snapshot { return true }
            if SharedAccess.load32Acquire(ring + SharedRingLayout.responseProducer) != consumer { return true }
            SharedAccess.store32(ring + SharedRingLayout.responseEvent, consumer &+ 1)
        }
        SharedAccess.fullFence()
        for (ring, consumer) in [(txRing, txResponseConsumer), (rxRing, rxResponseConsumer)] {
            pending = pending || SharedAccess.load32Acquire(ring + SharedRingLayout.responseProducer) != consumer
        }
        return pending
    }
}

#if canImport(Glibc)
import Glibc
#endif
public import SharedMemory
import Synchronization
import Virtqueue

/// The outcome of one request: `bytes` transferred into the caller's buffer (reads and
/// GET_ID), or 0.
public struct BlockCompletion: Sendable, Equatable {
    /// The tag given when the request was submitted.
    public let tag: UInt64
    /// Bytes transferred into the caller's buffer (reads, GET_ID; 0 otherwise), or why it failed.
    public let result: Result<Int, VirtioError>
}

/// Counters a caller (or the audit) can read.
public struct BlockQueueStatistics: Sendable, Equatable {
    /// Requests posted to the ring.
    public var submitted: UInt64 = 0
    /// Completions handed back by `poll()`/`wait()` (validated).
    public var completed: UInt64 = 0
    /// Notifications sent to the device (only when it asked for them, R1).
    public var kicks: UInt64 = 0
    /// Wake-ups that brought no completion (a storm is backed off, R5).
    public var spuriousNotifications: UInt64 = 0
    /// Requests posted again after a reconnect.
    public var resubmitted: UInt64 = 0
    /// Times `wait` blocked on the call eventfd (0 under `WaitStrategy.poll`).
    public var blocks: UInt64 = 0
    /// Times submitted requests were made visible to the device (one store of the ring's
    /// index each, a kick when the device asks for one): `poll` publishes a batch at once.
    public var publishes: UInt64 = 0
}

/// One virtqueue of a `VirtioBlockDriver`: the synchronous hot path.
///
/// `submit...` posts a request (copying write data into the bounce pool, R7); `poll()`
/// returns a validated completion without blocking; `wait(until:)` spins briefly, then
/// blocks on the call eventfd with the earliest request deadline (R5). Requests are
/// published lazily, once per batch, by `kick()`, `poll()` or `wait()`.
///
/// Not thread-safe: one thread per queue. A read's destination buffer must stay valid
/// until its completion (or failure) has been returned. Only that thread ever touches the
/// queue's state, also across a reconnect (see `VirtioBlockDriver`'s handoff). The queue holds
/// its device's `DriverSupervisor`, never the device: failures go into it, and its slow
/// path (`settle`) parks, resubmits and asks for its ring to be announced through it.
///
/// Like `DriverQueue`, the mutable state lives behind owned raw pointers: class `var`s and
/// `Array`s cost a dynamic exclusivity check and a uniqueness check per access, which
/// on this path were most of the driver's cost. A finished request's bounce slice stays
/// parked on its slot (its private write data zeroed) and the next request on that slot
/// reuses it: slots are handed out LIFO, so the hot slices stay in cache and the bitmap
/// allocator is only on the path when sizes change.
public final class BlockQueue {
    struct Slot {
        /// Submitted and not yet handed back by `poll()`.
        var active = false
        /// Handed back as a failure while the broken device may still write its slice:
        /// neither the slot nor the slice is reused until a reconnect resets the ring (R6).
        var quarantined = false
        var type: BlockProtocol.RequestType = .read
        var tag: UInt64 = 0
        var sector: UInt64 = 0
        var dataLength = 0
        var dataWritable = false
        /// The request's slice; on a free slot, a parked one to reuse (or nil).
        var slice: BounceSlice?
        var destination: UnsafeMutableRawPointer?
        var destinationCount = 0
        var deadline: UInt64 = 0
    }

    struct State {
        var activeCount = 0
        var freeCount = 0
        var failedCount = 0
        /// Wake-ups without a completion: the shared storm policy (R5).
        var wakeBackoff = WakeBackoff()
        var statistics = BlockQueueStatistics()
        /// A lower bound of the active requests' deadlines (min over every deadline
        /// stamped since the last exact scan): `wait` scans the slots only once the clock
        /// passes it, not on every check (a scan of every slot per request was most of
        /// the hardened driver's extra latency at iodepth 1).
        var deadlineBound = UInt64.max
        /// The supervisor's `epoch` this queue last found itself attached and healthy at.
        var settledEpoch: UInt64 = 0
        /// How long `wait` polls before blocking (adapts under `.adaptive`).
        var spin: AdaptiveSpin
        /// Requests posted since the last publish.
        var unpublished = 0
        /// `poll` publishes at the latest once this many requests wait unpublished:
        /// `publishBatchLimit`, or 1 (every request) under `.interrupts`.
        var publishLimit = BlockQueue.publishBatchLimit
    }

    /// Where the device stands for this queue, as its slow path (`settle`) sees it.
    enum Standing {
        /// Attached to the current connection: the fast path may go on.
        case ready
        /// In-flight requests are handed back as this failure.
        case failed(VirtioError)
        /// Another thread is reconnecting: submissions stay private, `wait` parks.
        case reconnecting
    }

    /// `poll` publishes once per batch of completions, and at the latest once this many
    /// submitted requests wait unpublished (`DriverRing.nextCompletion(publishingAfter:)`):
    /// a long batch still feeds a device that went idle, and a driver about to sleep has
    /// given the device most of its batch already. Under `WaitStrategy.interrupts` the
    /// limit is 1 (every request is published at the next `poll`): that queue sleeps right
    /// after the batch, and a batch held back reached qsd just before it slept, a wake-up
    /// per batch (0.92-1.43M against 1.77-1.82M IOPS at iodepth 32, docs/benchmarks.md).
    public static let publishBatchLimit = 8

    /// Status sentinel: a device that never writes the status leaves this (invalid) value.
    static let statusSentinel: UInt8 = 0xff
    static let headerSize = BlockProtocol.requestHeaderSize
    /// Where a request's data starts in its slice: the header, then padding to the next
    /// cache line, so the 4 KiB copy out of (or into) the pool runs on aligned lines
    /// (with the data at 16, half of the copy's 32-byte loads crossed a line) and the
    /// header's line holds nothing else. The status byte follows the data.
    static let dataOffset = 64

    /// The queue's index on the device.
    public let index: Int
    /// Failure sink, control-socket watch and reconnect state of the device (shared with
    /// its other queues). The hot path reads only its `epoch`.
    let supervisor: DriverSupervisor
    let info: BlockInfo
    let requestTimeout: Double
    let timeoutNanoseconds: UInt64
    let ring: any DriverRing
    let pool: BouncePool
    let kickNotifier: Notifier
    let callNotifier: Notifier
    let slotCount: Int
    /// Private state only (R4): every `.pointee` in this file is on `state`, which nothing
    /// but this queue can write; slots, free stacks and scratch are private allocations too.
    /// What the device writes is read only through the ring and `BouncePool.loadByte`.
    let state: UnsafeMutablePointer<State>
    let slots: UnsafeMutablePointer<Slot>
    /// Free slot indices, a LIFO stack of `state.freeCount`.
    let freeSlots: UnsafeMutablePointer<Int>
    /// Slots that failed (device broken) and are still to be handed back by `poll()`.
    let failedSlots: UnsafeMutablePointer<Int>
    /// Scratch for one request's chain: header, data segments, status.
    let segments: UnsafeMutablePointer<Segment>
    let segmentCapacity: Int

    init(
        index: Int, supervisor: DriverSupervisor, info: BlockInfo, options: VirtioBlockDriver.Options,
        ring: any DriverRing,
        pool: BouncePool, kick: Notifier, call: Notifier
    ) {
        self.index = index
        self.supervisor = supervisor
        self.info = info
        self.requestTimeout = options.requestTimeout
        self.timeoutNanoseconds = UInt64(max(0, min(options.requestTimeout, 1e9)) * 1e9) + coarseClockSlack
        self.ring = ring
        self.pool = pool
        self.kickNotifier = kick
        self.callNotifier = call
        let n = Int(ring.queueSize)
        slotCount = n
        state = .allocate(capacity: 1)
        state.initialize(
            to: State(
                freeCount: n, spin: AdaptiveSpin(options.wait),
                publishLimit: options.wait == .interrupts ? 1 : Self.publishBatchLimit))
        slots = .allocate(capacity: n)
        slots.initialize(repeating: Slot(), count: n)
        freeSlots = .allocate(capacity: n)
        failedSlots = .allocate(capacity: n)
        for i in 0..<n { freeSlots[i] = n - 1 - i }
        segmentCapacity = info.segmentsPerRequest + 2
        segments = .allocate(capacity: segmentCapacity)
    }

    deinit {
        state.deallocate()
        slots.deinitialize(count: slotCount)
        slots.deallocate()
        freeSlots.deallocate()
        failedSlots.deallocate()
        segments.deallocate()
    }

    /// Requests submitted and not yet handed back by `poll()`.
    public var inFlight: Int { state.pointee.activeCount }

    /// Counters of this queue (read on its own thread).
    public var statistics: BlockQueueStatistics { state.pointee.statistics }

    // MARK: submission

    /// Reads `buffer.count` bytes at byte `offset` into `buffer` (valid until completion).
    public func submitRead(offset: UInt64, into buffer: UnsafeMutableRawBufferPointer, tag: UInt64) throws(VirtioError)
    {
        try info.checkRange(offset: offset, length: buffer.count)
        try postRead(offset: offset, into: buffer, tag: tag)
    }

    /// Writes `buffer` at byte `offset` (copied into the bounce pool now).
    public func submitWrite(offset: UInt64, from buffer: UnsafeRawBufferPointer, tag: UInt64) throws(VirtioError) {
        guard !info.readOnly else { throw .readOnly }
        try info.checkRange(offset: offset, length: buffer.count)
        try postWrite(offset: offset, from: buffer, tag: tag)
    }

    /// Posts a FLUSH (refused locally if the device did not offer VIRTIO_BLK_F_FLUSH).
    public func submitFlush(tag: UInt64) throws(VirtioError) {
        guard info.supportsFlush else { throw .unsupported("VIRTIO_BLK_F_FLUSH") }
        try post(.flush, sector: 0, data: 0, writable: false, tag: tag, source: nil, destination: nil)
    }

    /// GET_ID into `buffer` (up to 20 bytes); the completion counts the bytes up to NUL.
    public func submitGetID(into buffer: UnsafeMutableRawBufferPointer, tag: UInt64) throws(VirtioError) {
        try post(
            .getID, sector: 0, data: BlockProtocol.idSize, writable: true, tag: tag,
            source: nil, destination: buffer)
    }

    /// DISCARD (or WRITE_ZEROES with `zeroes`) of one range.
    public func submitDiscard(offset: UInt64, length: Int, zeroes: Bool = false, unmap: Bool = false, tag: UInt64)
        throws(VirtioError)
    {
        try info.checkDiscard(zeroes: zeroes)
        try info.checkRange(offset: offset, length: length, transferLimit: false)
        let limit = zeroes ? info.maxWriteZeroesBytes : info.maxDiscardBytes
        guard UInt64(length) <= limit else { throw .invalidRequest("range of \(length) bytes exceeds \(limit)") }
        try postDiscard(offset: offset, length: length, zeroes: zeroes, unmap: unmap, tag: tag)
    }

    // The `post...` calls take a range already checked (`BlockInfo.checkRange`): by the
    // `submit...` call in front of them, or once for a whole convenience call.

    @inline(__always)
    func postRead(offset: UInt64, into buffer: UnsafeMutableRawBufferPointer, tag: UInt64) throws(VirtioError) {
        try post(
            .read, sector: offset / 512, data: buffer.count, writable: true, tag: tag,
            source: nil, destination: buffer)
    }

    @inline(__always)
    func postWrite(offset: UInt64, from buffer: UnsafeRawBufferPointer, tag: UInt64) throws(VirtioError) {
        try post(
            .write, sector: offset / 512, data: buffer.count, writable: false, tag: tag,
            source: buffer, destination: nil)
    }

    func postDiscard(offset: UInt64, length: Int, zeroes: Bool, unmap: Bool, tag: UInt64) throws(VirtioError) {
        try post(
            zeroes ? .writeZeroes : .discard, sector: 0, data: BlockProtocol.discardSegmentSize,
            writable: false, tag: tag, source: nil, destination: nil,
            range: (offset / 512, UInt32(truncatingIfNeeded: length / 512), unmap ? 1 : 0))
    }

    func post(
        _ type: BlockProtocol.RequestType, sector: UInt64, data: Int, writable: Bool, tag: UInt64,
        source: UnsafeRawBufferPointer?, destination: UnsafeMutableRawBufferPointer?,
        range: (sector: UInt64, sectors: UInt32, flags: UInt32)? = nil
    ) throws(VirtioError) {
        if needsSettling {
            // While another thread reconnects, the request waits in the private list.
            if case .failed(let failure) = settle() { throw failure }
        }
        guard state.pointee.freeCount > 0 else { throw .busy }
        let slotIndex = freeSlots[state.pointee.freeCount - 1]
        guard let slice = slice(for: slotIndex, length: Self.dataOffset + data + 1) else { throw .busy }
        // The slice holds header, data and status (its length, by construction): the
        // fixed-offset stores need no bounds check each.
        let bytes = pool.base + slice.offset
        bytes.storeBytes(of: UInt64(type.rawValue).littleEndian, as: UInt64.self)  // type, then ioprio 0
        bytes.storeBytes(of: sector.littleEndian, toByteOffset: 8, as: UInt64.self)
        if let source { pool.copyIn(slice, at: Self.dataOffset, from: source) }
        if let range {  // struct virtio_blk_discard_write_zeroes
            pool.store(range.sector, in: slice, at: Self.dataOffset)
            pool.store(range.sectors, in: slice, at: Self.dataOffset + 8)
            pool.store(range.flags, in: slice, at: Self.dataOffset + 12)
        }
        bytes.storeBytes(of: Self.statusSentinel, toByteOffset: Self.dataOffset + data, as: UInt8.self)
        state.pointee.freeCount -= 1
        slots[slotIndex] = Slot(
            active: true, type: type, tag: tag, sector: sector, dataLength: data, dataWritable: writable,
            slice: slice, destination: destination?.baseAddress, destinationCount: destination?.count ?? 0,
            deadline: 0)
        do {
            try addToRing(slotIndex)
        } catch {
            slots[slotIndex].active = false
            pool.free(slice)  // zeroes what was copied in
            slots[slotIndex].slice = nil
            state.pointee.freeCount += 1
            throw error
        }
        state.pointee.activeCount += 1
        state.pointee.unpublished += 1
        state.pointee.statistics.submitted &+= 1
    }

    /// A slice of `length` bytes for a free slot: its parked slice when the size fits,
    /// else a fresh one; when the pool is full, parked slices of other free slots go back
    /// to it first.
    @inline(__always)
    func slice(for slotIndex: Int, length: Int) -> BounceSlice? {
        if let parked = slots[slotIndex].slice {
            if let reused = pool.reuse(parked, length: length) { return reused }
            pool.free(parked)
            slots[slotIndex].slice = nil
        }
        if let fresh = pool.allocate(length) { return fresh }
        for i in 0..<state.pointee.freeCount {
            let s = freeSlots[i]
            if let parked = slots[s].slice {
                pool.free(parked)
                slots[s].slice = nil
            }
        }
        return pool.allocate(length)
    }

    /// Posts the chain of a slot: header, data in at most seg_max segments, status.
    func addToRing(_ slotIndex: Int) throws(VirtioError) {
        let slot = slots[slotIndex]
        guard let slice = slot.slice else { return }
        var count = 0
        let chunk = info.segmentSizeMax == 0 ? max(slot.dataLength, 1) : info.segmentSizeMax
        if slot.dataLength > 0 && slot.dataLength <= chunk {
            // One data segment (every 4 KiB request): header, data, status, straight from
            // the slice's guest address (the slice holds all three).
            let g = pool.guestAddress(of: slice)
            segments[0] = Segment(address: g, length: UInt32(Self.headerSize), deviceWritable: false)
            segments[1] = Segment(
                address: g &+ UInt64(Self.dataOffset), length: UInt32(clamping: slot.dataLength),
                deviceWritable: slot.dataWritable)
            segments[2] = Segment(
                address: g &+ UInt64(Self.dataOffset + slot.dataLength), length: 1, deviceWritable: true)
            count = 3
        } else {
            count = try addSegments(slot, slice: slice, chunk: chunk)
        }
        do {
            try ring.add(UnsafeBufferPointer(start: segments, count: count), token: UInt64(slotIndex))
        } catch {
            switch error {
            case .full: throw .busy
            case .broken(let v): throw .violation(v)
            case .emptyChain, .tooManySegments: throw .invalidRequest(error.description)
            }
        }
        // The tick clock plus its slack (in timeoutNanoseconds): never earlier than the
        // precise deadline, a few milliseconds later at most, and far cheaper to read.
        let (sum, overflow) = coarseMonotonicNanoseconds().addingReportingOverflow(timeoutNanoseconds)
        let deadline = overflow ? UInt64.max : sum
        slots[slotIndex].deadline = deadline
        state.pointee.deadlineBound = min(state.pointee.deadlineBound, deadline)
    }

    /// The chain's segments in `segments`: header, data in at most seg_max segments of
    /// `chunk` bytes, status. Returns their count.
    func addSegments(_ slot: Slot, slice: BounceSlice, chunk: Int) throws(VirtioError) -> Int {
        var count = 0
        segments[count] = pool.segment(slice, offset: 0, length: Self.headerSize, deviceWritable: false)
        count += 1
        var offset = 0
        while offset < slot.dataLength {
            guard count < segmentCapacity - 1 else {
                throw .invalidRequest(
                    "request needs more than \(info.segmentsPerRequest) segments, the device's limit")
            }
            let n = min(chunk, slot.dataLength - offset)
            segments[count] = pool.segment(
                slice, offset: Self.dataOffset + offset, length: n, deviceWritable: slot.dataWritable)
            count += 1
            offset += n
        }
        segments[count] = pool.segment(
            slice, offset: Self.dataOffset + slot.dataLength, length: 1, deviceWritable: true)
        return count + 1
    }

    /// Publishes everything submitted and kicks the device if it wants it.
    @inline(__always)
    public func kick() {
        if state.pointee.unpublished > 0 {
            state.pointee.unpublished = 0
            state.pointee.statistics.publishes &+= 1
        }
        if ring.publish() { signalKick() }
    }

    /// The device asked for a notification of what was just published.
    func signalKick() {
        #if RINGFENCE_SPLIT_PROBE
        SplitProbe.kickBegin()
        defer { SplitProbe.kicked() }
        #endif
        if !kickNotifier.signal() { supervisor.fail(.violation(.notifierBlocked(role: "kick"))) }
        state.pointee.statistics.kicks &+= 1
    }

    // MARK: completion

    /// The next completion, or nil. Never blocks. After the device broke, hands back every
    /// request still in flight as a failure, one per call.
    ///
    /// Publishes what was submitted before it reads the device's index again, not while it
    /// returns completions seen at the last read (and at the latest once
    /// `publishBatchLimit` requests wait): requests submitted while a batch of completions
    /// is reaped go out together, with one kick at most, as a C poller does. Every wait
    /// strategy but `.interrupts`, which publishes every request at the next call (the
    /// packed ring publishes at every call). A `poll` that returns nil has published
    /// everything, so `wait` never blocks on a request the device cannot see.
    public func poll() -> BlockCompletion? {
        if needsSettling {
            switch settle() {
            case .ready: break
            case .failed(let failure): return nextFailure(failure)
            case .reconnecting: return nil
            }
        }
        var publication = Publication.none
        let completion: Completion?
        do {
            completion = try ring.nextCompletion(
                publishingAfter: state.pointee.publishLimit, publication: &publication)
        } catch {
            supervisor.fail(.violation(error))
            return firstFailure()
        }
        if publication != .none {
            if state.pointee.unpublished > 0 {
                state.pointee.unpublished = 0
                state.pointee.statistics.publishes &+= 1
            }
            if publication == .publishedKick { signalKick() }
        }
        guard let completion else { return nil }
        #if RINGFENCE_SPLIT_PROBE
        SplitProbe.seen()
        #endif
        if let c = finish(completion) { return c }
        return firstFailure()
    }

    /// Whether the supervisor moved since this queue last settled: the device failed or a
    /// reconnect started or ended. The hot path's only look at shared state.
    @inline(__always)
    var needsSettling: Bool { supervisor.epoch.load(ordering: .relaxed) != state.pointee.settledEpoch }

    /// Right after this queue broke the device: the first of its requests handed back as
    /// the failure (a loop-free `poll` tail, no recursion).
    func firstFailure() -> BlockCompletion? {
        if case .failed(let failure) = settle() { return nextFailure(failure) }
        return nil
    }

    /// Validates the status byte (read once, R2) and the used length, copies read data
    /// out of the bounce pool, and frees the slot.
    func finish(_ completion: Completion) -> BlockCompletion? {
        let slotIndex = Int(truncatingIfNeeded: completion.token)
        guard slotIndex >= 0, slotIndex < slotCount else { return nil }  // token is ours; cannot happen
        let slot = slots + slotIndex
        guard slot.pointee.active, let slice = slot.pointee.slice else { return nil }
        let dataLength = slot.pointee.dataLength
        let length = Int(completion.length)
        let untrustedStatus = pool.loadByte(slice, at: Self.dataOffset + dataLength) ?? Self.statusSentinel
        var result: Result<Int, VirtioError>
        if length == 0 {
            return breakDevice(.blockStatusMissing(id: UInt32(completion.head)))
        }
        switch BlockProtocol.Status(rawValue: untrustedStatus) {
        case nil:
            return breakDevice(.blockStatusInvalid(status: untrustedStatus))
        case .ioError?, .unsupported?:
            result = .failure(.deviceError(BlockProtocol.Status(rawValue: untrustedStatus) ?? .ioError))
        case .ok?:
            switch slot.pointee.type {
            case .read:
                guard length >= dataLength + 1 else {
                    return breakDevice(.blockShortRead(expected: UInt64(dataLength), got: UInt64(max(0, length - 1))))
                }
                if let dst = slot.pointee.destination {
                    let d = UnsafeMutableRawBufferPointer(
                        start: dst, count: min(dataLength, slot.pointee.destinationCount))
                    pool.copyOut(slice, at: Self.dataOffset, validatedLength: dataLength, to: d)
                }
                result = .success(dataLength)
            case .getID:
                // qsd over-reports GET_ID's used len: trust neither it nor a missing NUL.
                let n = min(max(0, length - 1), BlockProtocol.idSize)
                var id = [UInt8](repeating: 0, count: BlockProtocol.idSize)
                id.withUnsafeMutableBytes { d in _ = pool.copyOut(slice, at: Self.dataOffset, validatedLength: n, to: d)
                }
                let visible = id.prefix(n).firstIndex(of: 0) ?? n
                if let dst = slot.pointee.destination {
                    let count = min(visible, slot.pointee.destinationCount)
                    id.withUnsafeBytes { s in
                        if let src = s.baseAddress { dst.copyMemory(from: src, byteCount: count) }
                    }
                    result = .success(count)
                } else {
                    result = .success(0)
                }
            default:
                result = .success(0)
            }
        }
        let tag = slot.pointee.tag
        release(slotIndex)
        state.pointee.statistics.completed &+= 1
        if state.pointee.wakeBackoff.consecutive != 0 { state.pointee.wakeBackoff.note(productive: true) }
        return BlockCompletion(tag: tag, result: result)
    }

    /// The completion broke a virtio-blk rule: the ring and the device break (R6); nil,
    /// and `poll` hands back the first failure.
    func breakDevice(_ v: BlockViolation) -> BlockCompletion? {
        ring.breakQueue(.brokenAbove(rule: v.rule, reason: v.detail))
        supervisor.fail(.deviceViolation(v))
        return nil
    }

    /// Ends a slot's request: its private write data is zeroed (R7: none of it outlives
    /// the request in shared memory) and the slice stays parked on the slot for reuse.
    @inline(__always)
    func release(_ slotIndex: Int) {
        let slot = slots + slotIndex
        if slot.pointee.type == .write, let slice = slot.pointee.slice {
            pool.zero(slice, at: Self.dataOffset, count: slot.pointee.dataLength)
        }
        if slot.pointee.active { state.pointee.activeCount -= 1 }
        // What a free slot keeps is its parked slice; `post` writes every other field.
        slot.pointee.active = false
        slot.pointee.destination = nil
        slot.pointee.destinationCount = 0
        slot.pointee.deadline = 0
        freeSlots[state.pointee.freeCount] = slotIndex
        state.pointee.freeCount += 1
    }

    /// Called once the device is broken: everything in flight becomes a failure. The
    /// descriptors stay quarantined in the ring until a reconnect resets it (R6); the
    /// bounce slices are zeroed and freed only then (the device may still write them).
    func nextFailure(_ failure: VirtioError) -> BlockCompletion? {
        if state.pointee.failedCount == 0 {
            _ = ring.failAll()
            ring.breakQueue(failureViolation(failure))
            for i in 0..<slotCount where slots[i].active && !slots[i].quarantined {
                failedSlots[state.pointee.failedCount] = i
                state.pointee.failedCount += 1
            }
            if state.pointee.failedCount == 0 { return nil }
        }
        state.pointee.failedCount -= 1
        let i = failedSlots[state.pointee.failedCount]
        let tag = slots[i].tag
        slots[i].active = false
        slots[i].quarantined = true
        slots[i].destination = nil  // never copy into the caller's buffer after this
        state.pointee.activeCount -= 1
        return BlockCompletion(tag: tag, result: .failure(failure))
    }

    /// What the ring records as the reason it is broken: its own violation, or the
    /// layer above's failure (translated here, once).
    func failureViolation(_ failure: VirtioError) -> Violation {
        switch failure {
        case .violation(let v): return v
        case .deviceViolation(let v): return .brokenAbove(rule: v.rule, reason: v.detail)
        case .timeout: return .deadlineExceeded(milliseconds: UInt64(requestTimeout * 1000))
        default: return .brokenAbove(rule: .r6, reason: failure.description)
        }
    }

    /// Waits for the next completion: polls for as long as the wait strategy says (by
    /// time; `.poll` never stops), then blocks on the call eventfd and the control socket
    /// until the earliest request deadline (then: timeout, device broken) or `until`
    /// (then: nil). Wake-ups without completions are counted and, when they keep coming,
    /// backed off so a storm cannot burn the CPU (R5).
    public func wait(until limit: Deadline = .distantFuture) -> BlockCompletion? {
        wait(until: limit, orWake: nil)
    }

    /// `wait(until:)` that also returns nil once `wake` is signalled (an async engine's
    /// thread: new work arrived). With nil, inlined into `wait(until:)` as it was.
    @inline(__always)
    func wait(until limit: Deadline, orWake wake: Notifier?) -> BlockCompletion? {
        var spins = 0
        var spinStart: UInt64 = 0
        var spinning = state.pointee.spin.limit > 0
        while true {
            if let c = poll() { return c }
            if state.pointee.activeCount == 0 { return nil }
            if needsSettling {
                // Failures are returned by poll; a reconnect under way parks this thread.
                if !supervisor.awaitReconnect(until: limit, notifier: callNotifier) { return nil }
                continue
            }
            // While spinning, look at the clock and the deadlines only every 64 polls.
            spins += 1
            if spinning && spins & 63 != 0 { continue }
            let now = monotonicNanoseconds()
            if spinStart == 0 { spinStart = now }
            spinning = now &- spinStart < state.pointee.spin.limit
            var earliest = state.pointee.deadlineBound
            if now >= earliest {
                earliest = earliestDeadline()
                state.pointee.deadlineBound = earliest
            }
            if now >= earliest {
                supervisor.fail(.timeout(milliseconds: UInt64(requestTimeout * 1000)))
                continue
            }
            if now >= limit.uptimeNanoseconds { return nil }
            if spinning { continue }
            if ring.enableInterrupts() { continue }
            let until = Deadline(uptimeNanoseconds: min(earliest, limit.uptimeNanoseconds))
            state.pointee.statistics.blocks &+= 1
            let woken = block(until: until, orWake: wake)
            state.pointee.spin.noteBlock(
                nanoseconds: monotonicNanoseconds() &- now, productive: woken == .notified)
            switch woken {
            case .woken:
                return nil
            case .notified:
                // A completion may follow; if none does, it was spurious.
                if let c = poll() { return c }
                if needsSettling { continue }
                state.pointee.statistics.spuriousNotifications &+= 1
                state.pointee.wakeBackoff.note(productive: false)
                state.pointee.wakeBackoff.pause(until: until)
            case .timedOut:
                continue
            case .socket(let generation):
                supervisor.controlSocketSignalled(generation: generation)
            }
        }
    }

    enum Wake: Equatable {
        case notified, timedOut
        /// The control socket of connection `generation` is readable.
        case socket(generation: UInt32)
        /// The async engine's wake eventfd.
        case woken
    }

    @inline(__always)
    func block(until deadline: Deadline, orWake wake: Notifier?) -> Wake {
        let control = supervisor.watch
        if let wake {
            switch EventWaiter.wait(for: callNotifier, orReadable: control.descriptor, orWoken: wake, until: deadline) {
            case .other: return .socket(generation: control.generation)
            case .woken: return .woken
            case .notified(let count): return count > 0 ? .notified : .timedOut
            case .timedOut: return .timedOut
            }
        }
        switch EventWaiter.wait(for: callNotifier, orReadable: control.descriptor, until: deadline) {
        case .other: return .socket(generation: control.generation)
        case .notified(let count): return count > 0 ? .notified : .timedOut
        case .timedOut: return .timedOut
        }
    }

    /// The deadline check of `wait`, without waiting: for the async engine's callers, who
    /// poll but never block (R5 acts on them as on a waiting thread).
    func expireOverdue() {
        guard state.pointee.activeCount > 0, !needsSettling else { return }
        let now = monotonicNanoseconds()
        guard now >= state.pointee.deadlineBound else { return }
        let earliest = earliestDeadline()
        state.pointee.deadlineBound = earliest
        if now >= earliest { supervisor.fail(.timeout(milliseconds: UInt64(requestTimeout * 1000))) }
    }

    func earliestDeadline() -> UInt64 {
        var earliest = UInt64.max
        for i in 0..<slotCount where slots[i].active && slots[i].deadline != 0 && slots[i].deadline < earliest {
            earliest = slots[i].deadline
        }
        return earliest
    }

    // MARK: reconnect

    /// This queue's slow path, on its own driving thread once the supervisor moved:
    /// reports a failure or a reconnect under way, or re-attaches the queue to the current
    /// connection (reset, resubmit, announce) and records the epoch it settled at.
    func settle() -> Standing {
        // Each round returns, or attaches once, or ends a reconnect it started: a back-end
        // that keeps dropping the connection during the attach gets a few rounds, no more.
        for _ in 0..<4 {
            let generation: UInt64
            switch supervisor.step(queue: index, inFlight: inFlight) {
            case .ready(let epoch):
                state.pointee.settledEpoch = epoch
                return .ready
            case .failed(let failure): return .failed(failure)
            case .reconnecting: return .reconnecting
            case .attach(let g): generation = g
            }
            do throws(VirtioError) {
                try resubmitAfterReconnect()
            } catch {
                supervisor.fail(error)
                continue
            }
            if supervisor.announce(queue: index, generation: generation) { kickNotifier.signal() }
        }
        let lost = VirtioError.disconnected("queue \(index) could not be attached to the back-end again")
        supervisor.fail(lost)
        return .failed(supervisor.failure ?? lost)
    }

    /// After the back-end came back: a fresh ring, the same bounce slices, every request
    /// that had not completed posted again from the private in-flight list (qsd keeps no
    /// inflight log). Writes are idempotent, so re-executing one is safe; completed ones
    /// are never resubmitted. Runs on this queue's own thread (`settle`),
    /// before the ring is announced on the new connection.
    func resubmitAfterReconnect() throws(VirtioError) {
        ring.reset()
        state.pointee.failedCount = 0
        // Requests already handed back as failures: their quarantine ends with the ring.
        for i in 0..<slotCount where slots[i].quarantined { releaseQuarantined(i) }
        for i in 0..<slotCount where slots[i].active {
            guard let slice = slots[i].slice else { continue }
            pool.store(Self.statusSentinel, in: slice, at: Self.dataOffset + slots[i].dataLength)
            try addToRing(i)
            state.pointee.statistics.resubmitted &+= 1
        }
        state.pointee.wakeBackoff = WakeBackoff()
        kickNotifier.drain()
        callNotifier.drain()
        _ = ring.publish()  // visible once the back-end maps the ring; kicked after setup
    }

    /// A quarantined slot back to the free list, its slice zeroed and freed (the device
    /// may have written anything into it).
    func releaseQuarantined(_ i: Int) {
        if let slice = slots[i].slice { pool.free(slice) }
        slots[i] = Slot()
        freeSlots[state.pointee.freeCount] = i
        state.pointee.freeCount += 1
    }
}

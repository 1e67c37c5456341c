#if canImport(Glibc)
import Glibc
#endif
public import SharedMemory
import Virtqueue

/// The outcome of one request: `bytes` transferred into the caller's buffer (reads and
/// GET_ID), or 0.
public struct BlockCompletion: Sendable, Equatable {
    public let tag: UInt64
    public let result: Result<Int, VirtioError>
}

/// Counters a caller (or the audit) can read.
public struct BlockQueueStatistics: Sendable, Equatable {
    public var submitted: UInt64 = 0
    public var completed: UInt64 = 0
    public var kicks: UInt64 = 0
    /// Wake-ups that brought no completion (a storm is backed off, R5).
    public var spuriousNotifications: UInt64 = 0
    public var resubmitted: UInt64 = 0
}

/// One virtqueue of a `BlockDevice`: the synchronous hot path.
///
/// `submit...` posts a request (copying write data into the bounce pool, R7); `poll()`
/// returns a validated completion without blocking; `wait(until:)` spins briefly, then
/// blocks on the call eventfd with the earliest request deadline (R5). Requests are
/// published lazily, once per batch, by `kick()`, `poll()` or `wait()`.
///
/// Not thread-safe: one thread per queue. A read's destination buffer must stay valid
/// until its completion (or failure) has been returned.
public final class BlockQueue {
    struct Slot {
        var active = false
        var type: BlockProtocol.RequestType = .read
        var tag: UInt64 = 0
        var sector: UInt64 = 0
        var dataLength = 0
        var dataWritable = false
        var slice: BounceSlice?
        var destination: UnsafeMutableRawPointer?
        var destinationCount = 0
        var deadline: UInt64 = 0
    }

    /// Status sentinel: a device that never writes the status leaves this (invalid) value.
    static let statusSentinel: UInt8 = 0xff
    static let headerSize = BlockProtocol.requestHeaderSize

    public let index: Int
    unowned let device: BlockDevice
    let ring: any DriverRing
    let pool: BouncePool
    let kickNotifier: Notifier
    let callNotifier: Notifier
    var slots: [Slot]
    var freeSlots: [Int]
    /// Slots that failed (device broken) and are still to be handed back by `poll()`.
    var failedSlots: [Int] = []
    var segments: [Segment] = []
    public private(set) var statistics = BlockQueueStatistics()
    var consecutiveSpurious = 0

    init(index: Int, device: BlockDevice, ring: any DriverRing, pool: BouncePool, kick: Notifier, call: Notifier) {
        self.index = index
        self.device = device
        self.ring = ring
        self.pool = pool
        self.kickNotifier = kick
        self.callNotifier = call
        let n = Int(ring.queueSize)
        slots = Array(repeating: Slot(), count: n)
        freeSlots = Array((0..<n).reversed())
        segments.reserveCapacity(device.info.segmentsPerRequest + 2)
    }

    /// Requests submitted and not yet handed back by `poll()`.
    public var inFlight: Int { activeCount }
    var activeCount = 0

    // MARK: submission

    /// Reads `buffer.count` bytes at byte `offset` into `buffer` (valid until completion).
    public func submitRead(offset: UInt64, into buffer: UnsafeMutableRawBufferPointer, tag: UInt64) throws(VirtioError)
    {
        try checkRange(offset: offset, length: buffer.count)
        try post(
            .read, sector: offset / 512, data: buffer.count, writable: true, tag: tag,
            source: nil, destination: buffer)
    }

    /// Writes `buffer` at byte `offset` (copied into the bounce pool now).
    public func submitWrite(offset: UInt64, from buffer: UnsafeRawBufferPointer, tag: UInt64) throws(VirtioError) {
        guard !device.info.readOnly else { throw .readOnly }
        try checkRange(offset: offset, length: buffer.count)
        try post(
            .write, sector: offset / 512, data: buffer.count, writable: false, tag: tag,
            source: buffer, destination: nil)
    }

    public func submitFlush(tag: UInt64) throws(VirtioError) {
        guard device.info.supportsFlush else { throw .unsupported("VIRTIO_BLK_F_FLUSH") }
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
        let info = device.info
        if zeroes {
            guard info.supportsWriteZeroes else { throw .unsupported("VIRTIO_BLK_F_WRITE_ZEROES") }
        } else {
            guard info.supportsDiscard else { throw .unsupported("VIRTIO_BLK_F_DISCARD") }
        }
        guard !info.readOnly else { throw .readOnly }
        try checkRange(offset: offset, length: length, transferLimit: false)
        let limit = zeroes ? info.maxWriteZeroesBytes : info.maxDiscardBytes
        guard UInt64(length) <= limit else { throw .invalidRequest("range of \(length) bytes exceeds \(limit)") }
        try post(
            zeroes ? .writeZeroes : .discard, sector: 0, data: BlockProtocol.discardSegmentSize,
            writable: false, tag: tag, source: nil, destination: nil,
            range: (offset / 512, UInt32(truncatingIfNeeded: length / 512), unmap ? 1 : 0))
    }

    func checkRange(offset: UInt64, length: Int, transferLimit: Bool = true) throws(VirtioError) {
        let info = device.info
        guard length > 0 else { throw .invalidRequest("length 0") }
        let (end, overflow) = offset.addingReportingOverflow(UInt64(length))
        guard !overflow, end <= info.capacityBytes else {
            throw .outOfRange(offset: offset, length: UInt64(length), capacity: info.capacityBytes)
        }
        let b = UInt64(info.blockSize)
        guard offset % b == 0, UInt64(length) % b == 0 else {
            throw .invalidRequest("offset \(offset) and length \(length) must be multiples of \(b)")
        }
        if transferLimit && length > info.maxTransfer {
            throw .invalidRequest("\(length) bytes exceed the \(info.maxTransfer)-byte request limit")
        }
    }

    func post(
        _ type: BlockProtocol.RequestType, sector: UInt64, data: Int, writable: Bool, tag: UInt64,
        source: UnsafeRawBufferPointer?, destination: UnsafeMutableRawBufferPointer?,
        range: (sector: UInt64, sectors: UInt32, flags: UInt32)? = nil
    ) throws(VirtioError) {
        if let failure = device.failure { throw failure }
        guard let slotIndex = freeSlots.last else { throw .busy }
        guard let slice = pool.allocate(Self.headerSize + data + 1) else { throw .busy }
        pool.store(type.rawValue, in: slice, at: 0)
        pool.store(UInt32(0), in: slice, at: 4)
        pool.store(sector, in: slice, at: 8)
        if let source { pool.copyIn(slice, at: Self.headerSize, from: source) }
        if let range {  // struct virtio_blk_discard_write_zeroes
            pool.store(range.sector, in: slice, at: Self.headerSize)
            pool.store(range.sectors, in: slice, at: Self.headerSize + 8)
            pool.store(range.flags, in: slice, at: Self.headerSize + 12)
        }
        pool.store(Self.statusSentinel, in: slice, at: Self.headerSize + data)
        freeSlots.removeLast()
        slots[slotIndex] = Slot(
            active: true, type: type, tag: tag, sector: sector, dataLength: data, dataWritable: writable,
            slice: slice, destination: destination?.baseAddress, destinationCount: destination?.count ?? 0,
            deadline: 0)
        do {
            try addToRing(slotIndex)
        } catch {
            slots[slotIndex].active = false
            pool.free(slice)
            freeSlots.append(slotIndex)
            throw error
        }
        activeCount += 1
        statistics.submitted &+= 1
    }

    /// Posts the chain of a slot: header, data in at most seg_max segments, status.
    func addToRing(_ slotIndex: Int) throws(VirtioError) {
        let slot = slots[slotIndex]
        guard let slice = slot.slice else { return }
        let info = device.info
        segments.removeAll(keepingCapacity: true)
        segments.append(pool.segment(slice, offset: 0, length: Self.headerSize, deviceWritable: false))
        var offset = 0
        let chunk = info.segmentSizeMax == 0 ? max(slot.dataLength, 1) : info.segmentSizeMax
        while offset < slot.dataLength {
            let n = min(chunk, slot.dataLength - offset)
            segments.append(
                pool.segment(slice, offset: Self.headerSize + offset, length: n, deviceWritable: slot.dataWritable))
            offset += n
        }
        guard segments.count - 1 <= max(info.segmentsPerRequest, 1) || slot.dataLength == 0 else {
            throw .invalidRequest(
                "request needs \(segments.count - 1) segments, device allows \(info.segmentsPerRequest)")
        }
        segments.append(pool.segment(slice, offset: Self.headerSize + slot.dataLength, length: 1, deviceWritable: true))
        do {
            try ring.add(segments, token: UInt64(slotIndex))
        } catch {
            switch error {
            case .full: throw .busy
            case .broken(let v): throw .violation(v)
            case .emptyChain, .tooManySegments: throw .invalidRequest(error.description)
            }
        }
        slots[slotIndex].deadline = Deadline.after(seconds: device.options.requestTimeout).uptimeNanoseconds
    }

    /// Publishes everything submitted and kicks the device if it wants it.
    public func kick() {
        if ring.publish() {
            kickNotifier.signal()
            statistics.kicks &+= 1
        }
    }

    // MARK: completion

    /// The next completion, or nil. Never blocks. After the device broke, hands back every
    /// request still in flight as a failure, one per call.
    public func poll() -> BlockCompletion? {
        kick()
        if let failure = device.failure {
            return nextFailure(failure)
        }
        let completion: Completion?
        do {
            completion = try ring.nextCompletion()
        } catch {
            device.fail(.violation(error))
            return poll()
        }
        guard let completion else { return nil }
        return finish(completion)
    }

    /// Validates the status byte (read once, R2) and the used length, copies read data
    /// out of the bounce pool, and frees the slot.
    func finish(_ completion: Completion) -> BlockCompletion? {
        let slotIndex = Int(truncatingIfNeeded: completion.token)
        guard slotIndex >= 0, slotIndex < slots.count, slots[slotIndex].active, let slice = slots[slotIndex].slice
        else { return nil }  // token is ours; cannot happen
        let slot = slots[slotIndex]
        let length = Int(completion.length)
        let untrustedStatus = pool.loadByte(slice, at: Self.headerSize + slot.dataLength) ?? Self.statusSentinel
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
            switch slot.type {
            case .read:
                guard length >= slot.dataLength + 1 else {
                    return breakDevice(
                        .blockShortRead(expected: UInt64(slot.dataLength), got: UInt64(max(0, length - 1))))
                }
                copyOut(slot, slice: slice, count: slot.dataLength)
                result = .success(slot.dataLength)
            case .getID:
                // qsd over-reports GET_ID's used len: trust neither it nor a missing NUL.
                let n = min(max(0, length - 1), BlockProtocol.idSize)
                var id = [UInt8](repeating: 0, count: BlockProtocol.idSize)
                id.withUnsafeMutableBytes { d in _ = pool.copyOut(slice, at: Self.headerSize, validatedLength: n, to: d)
                }
                let visible = id.prefix(n).firstIndex(of: 0) ?? n
                if let dst = slot.destination {
                    let count = min(visible, slot.destinationCount)
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
        release(slotIndex)
        statistics.completed &+= 1
        consecutiveSpurious = 0
        return BlockCompletion(tag: slot.tag, result: result)
    }

    func copyOut(_ slot: Slot, slice: BounceSlice, count: Int) {
        guard let dst = slot.destination else { return }
        let d = UnsafeMutableRawBufferPointer(start: dst, count: min(count, slot.destinationCount))
        pool.copyOut(slice, at: Self.headerSize, validatedLength: count, to: d)
    }

    func breakDevice(_ v: Violation) -> BlockCompletion? {
        ring.breakQueue(v)
        device.fail(.violation(v))
        return poll()
    }

    func release(_ slotIndex: Int) {
        if let slice = slots[slotIndex].slice { pool.free(slice) }
        if slots[slotIndex].active { activeCount -= 1 }
        slots[slotIndex] = Slot()
        freeSlots.append(slotIndex)
    }

    /// Called once the device is broken: everything in flight becomes a failure. The
    /// descriptors stay quarantined in the ring until a reconnect resets it (R6); the
    /// bounce slices are zeroed and freed only then (the device may still write them).
    func nextFailure(_ failure: VirtioError) -> BlockCompletion? {
        if failedSlots.isEmpty {
            _ = ring.failAll()
            ring.breakQueue(failureViolation(failure))
            for i in 0..<slots.count where slots[i].active {
                failedSlots.append(i)
            }
            if failedSlots.isEmpty { return nil }
        }
        let i = failedSlots.removeLast()
        let tag = slots[i].tag
        slots[i].active = false
        slots[i].destination = nil  // never copy into the caller's buffer after this
        activeCount -= 1
        return BlockCompletion(tag: tag, result: .failure(failure))
    }

    func failureViolation(_ failure: VirtioError) -> Violation {
        if case .violation(let v) = failure { return v }
        return .deadlineExceeded(milliseconds: UInt64(device.options.requestTimeout * 1000))
    }

    /// Waits for the next completion: spins briefly, then blocks on the call eventfd and
    /// the control socket until the earliest request deadline (then: timeout, device
    /// broken) or `until` (then: nil). Wake-ups without completions are counted and,
    /// when they keep coming, backed off so a storm cannot burn the CPU (R5).
    public func wait(until limit: Deadline = .distantFuture) -> BlockCompletion? {
        var spins = 0
        while true {
            if let c = poll() { return c }
            if inFlight == 0 { return nil }
            if device.failure != nil { continue }  // failures are returned by poll
            // While spinning, look at the clock and the deadlines only every 64 polls.
            spins += 1
            let spinning = spins <= device.options.spinIterations
            if spinning && spins & 63 != 0 { continue }
            let now = monotonicNanoseconds()
            let earliest = earliestDeadline()
            if now >= earliest {
                device.fail(.timeout(milliseconds: UInt64(device.options.requestTimeout * 1000)))
                continue
            }
            if now >= limit.uptimeNanoseconds { return nil }
            if spinning { continue }
            if ring.enableInterrupts() { continue }
            let until = Deadline(uptimeNanoseconds: min(earliest, limit.uptimeNanoseconds))
            switch block(until: until) {
            case .notified:
                // A completion may follow; if none does, it was spurious.
                if let c = poll() { return c }
                if device.failure != nil { continue }
                statistics.spuriousNotifications &+= 1
                consecutiveSpurious += 1
                if consecutiveSpurious > 16 {
                    let backoff = min(1 << min(consecutiveSpurious - 16, 10), 1000)  // up to 1 ms
                    usleep(UInt32(backoff))
                }
            case .timedOut:
                continue
            case .socket:
                device.controlChannelSignalled()
            }
        }
    }

    enum Wake { case notified, timedOut, socket }

    func block(until deadline: Deadline) -> Wake {
        var fds = [
            pollfd(fd: callNotifier.fileDescriptor, events: Int16(POLLIN), revents: 0),
            pollfd(fd: device.controlDescriptor, events: Int16(POLLIN), revents: 0),
        ]
        let r = Glibc.poll(&fds, 2, deadline.pollTimeoutMilliseconds)
        if r <= 0 { return .timedOut }
        if fds[1].revents != 0 { return .socket }
        return callNotifier.drain() > 0 ? .notified : .timedOut
    }

    func earliestDeadline() -> UInt64 {
        var earliest = UInt64.max
        for s in slots where s.active && s.deadline != 0 && s.deadline < earliest { earliest = s.deadline }
        return earliest
    }

    // MARK: reconnect

    /// After the back-end came back: a fresh ring, the same bounce slices, every request
    /// that had not completed posted again from the private in-flight list (qsd keeps no
    /// inflight log). Writes are idempotent, so re-executing one is safe; completed ones
    /// are never resubmitted.
    func resubmitAfterReconnect() throws(VirtioError) {
        ring.reset()
        failedSlots.removeAll()
        // Requests already handed back as failures: their quarantine ends with the ring.
        for i in 0..<slots.count where !slots[i].active && slots[i].slice != nil { release(i) }
        for i in 0..<slots.count where slots[i].active {
            guard let slice = slots[i].slice else { continue }
            pool.store(Self.statusSentinel, in: slice, at: Self.headerSize + slots[i].dataLength)
            try addToRing(i)
            statistics.resubmitted &+= 1
        }
        consecutiveSpurious = 0
        kickNotifier.drain()
        callNotifier.drain()
        _ = ring.publish()  // visible once the back-end maps the ring; kicked after setup
    }

    /// Drops every slot (after a fatal failure has been reported and a reconnect resets
    /// the ring): bounce memory is zeroed and reused.
    func discardAll() {
        ring.reset()
        failedSlots.removeAll()
        for i in 0..<slots.count where slots[i].slice != nil || slots[i].active {
            release(i)
        }
        freeSlots = Array((0..<slots.count).reversed())
        activeCount = 0
    }
}

#if canImport(Glibc)
import Glibc
#endif
public import SharedMemory
import Virtqueue

/// Counters a caller (or a benchmark) can read.
public struct NetQueueStatistics: Sendable, Equatable {
    public var framesSent: UInt64 = 0
    public var bytesSent: UInt64 = 0
    public var framesReceived: UInt64 = 0
    public var bytesReceived: UInt64 = 0
    public var kicks: UInt64 = 0
    /// Wake-ups that brought nothing (a storm is backed off, R5).
    public var spuriousNotifications: UInt64 = 0
}

/// One receive queue and one transmit queue of a `VirtioNetDriver`: the hot path.
///
/// `transmit` copies each frame behind a zero header into a transmit slice of the bounce
/// pool (R7) and posts it; the device's used length for a transmitted frame is ignored
/// (it means nothing). `receive` takes validated completions and copies out only the
/// validated length (R3): the first buffer's used len must hold the 12-byte header,
/// num_buffers must be 1...buffers posted (mergeable) and the frame 14...MTU+18 bytes,
/// the header must name no offload that was not negotiated, and NEEDS_CSUM must point
/// inside the frame. Receive buffers are private-size slices posted once per slot and
/// reposted as soon as they are consumed. No call allocates.
///
/// Not thread-safe: one thread per pair. The first violation breaks the whole device (R6).
public final class NetQueuePair {
    struct State {
        var rxPosted = 0
        var txFree = 0
        /// Buffers still to merge into the frame in `assembly` (mergeable receive).
        var mergeRemaining = 0
        var assemblyLength = 0
        var wakeBackoff = WakeBackoff()
        var statistics = NetQueueStatistics()
    }

    public let index: Int
    let supervisor: NetSupervisor
    let info: NetInfo
    let rx: any DriverRing
    let rxPool: BouncePool
    let tx: any DriverRing
    let txPool: BouncePool
    let rxKick: Notifier
    let rxCall: Notifier
    let txKick: Notifier
    let txCall: Notifier
    /// Bytes of one receive buffer as posted (header included); private, never re-read.
    let rxBufferSize: Int
    let maximumFrame: Int
    let slotCount: Int
    let state: UnsafeMutablePointer<State>
    let rxSlices: UnsafeMutablePointer<BounceSlice>
    let rxIsPosted: UnsafeMutablePointer<Bool>
    let txSlices: UnsafeMutablePointer<BounceSlice>
    let txLengths: UnsafeMutablePointer<Int>
    let txFreeSlots: UnsafeMutablePointer<Int>
    /// A merged frame being assembled (private).
    let assembly: UnsafeMutableRawPointer
    let headerScratch: UnsafeMutableRawPointer

    init(
        index: Int, supervisor: NetSupervisor, info: NetInfo, rx: (any DriverRing, BouncePool),
        tx: (any DriverRing, BouncePool), notifiers: [Notifier], rxBufferSize: Int
    ) throws(NetError) {
        self.index = index
        self.supervisor = supervisor
        self.info = info
        (self.rx, rxPool) = rx
        (self.tx, txPool) = tx
        rxKick = notifiers[0]
        rxCall = notifiers[1]
        txKick = notifiers[2]
        txCall = notifiers[3]
        self.rxBufferSize = rxBufferSize
        maximumFrame = info.maximumFrame
        let n = Int(rx.0.queueSize)
        slotCount = n
        state = .allocate(capacity: 1)
        state.initialize(to: State(txFree: n))
        rxSlices = .allocate(capacity: n)
        rxIsPosted = .allocate(capacity: n)
        rxIsPosted.initialize(repeating: false, count: n)
        txSlices = .allocate(capacity: n)
        txLengths = .allocate(capacity: n)
        txLengths.initialize(repeating: 0, count: n)
        txFreeSlots = .allocate(capacity: n)
        for i in 0..<n { txFreeSlots[i] = n - 1 - i }
        assembly = .allocate(byteCount: maximumFrame + NetProtocol.headerSize, alignment: 64)
        headerScratch = .allocate(byteCount: NetProtocol.headerSize, alignment: 8)
        let txSize = NetProtocol.headerSize + maximumFrame
        for i in 0..<n {
            guard let r = rxPool.allocate(rxBufferSize), let t = txPool.allocate(txSize) else {
                throw .system("bounce pool too small for \(n) buffers")
            }
            (rxSlices + i).initialize(to: r)
            (txSlices + i).initialize(to: t)
        }
        // A transmitted frame's used len means nothing (DPDK writes stale values): never read.
        self.tx.usedLengthIgnored = true
        self.rx.disableInterrupts()
        self.tx.disableInterrupts()
        refill()
    }

    deinit {
        state.deallocate()
        rxSlices.deallocate()
        rxIsPosted.deallocate()
        txSlices.deallocate()
        txLengths.deallocate()
        txFreeSlots.deallocate()
        assembly.deallocate()
        headerScratch.deallocate()
    }

    public var statistics: NetQueueStatistics { state.pointee.statistics }

    /// Transmit slots free now (frames `transmit` can take without waiting).
    public var transmitRoom: Int {
        reapTransmitted()
        return state.pointee.txFree
    }

    /// The device's failure, once broken.
    public var failure: NetError? { supervisor.failure }

    // MARK: transmit

    /// Posts frames `from..<batch.count` while there is room; publishes once and kicks if
    /// the device wants it. Returns how many were posted (0: the ring is full, wait).
    /// A frame shorter than an Ethernet header or longer than MTU + 18 is refused.
    public func transmit(_ batch: NetFrameBatch, from start: Int = 0) throws(NetError) -> Int {
        if supervisor.isBroken { throw failure ?? .disconnected("device broken") }
        reapTransmitted()
        var posted = 0
        var i = max(0, start)
        while i < batch.count {
            let frame = batch[i]
            guard frame.count >= NetProtocol.ethernetHeaderSize, frame.count <= maximumFrame else {
                if posted > 0 { break }
                throw .invalidRequest("frame of \(frame.count) bytes is not in 14...\(maximumFrame)")
            }
            guard state.pointee.txFree > 0 else { break }
            let slot = txFreeSlots[state.pointee.txFree - 1]
            let slice = txSlices[slot]
            // The header is all zero (no offload): stored, never read back (R1).
            txPool.store(UInt64(0), in: slice, at: 0)
            txPool.store(UInt32(0), in: slice, at: 8)
            txPool.copyIn(slice, at: NetProtocol.headerSize, from: frame)
            let segment = txPool.segment(
                slice, offset: 0, length: NetProtocol.headerSize + frame.count, deviceWritable: false)
            do {
                try withUnsafePointer(to: segment) { p throws(SubmitError) in
                    _ = try tx.add(UnsafeBufferPointer(start: p, count: 1), token: UInt64(slot))
                }
            } catch {
                txPool.zero(slice, at: NetProtocol.headerSize, count: frame.count)
                if case .full = error { break }
                if case .broken(let v) = error { throw supervisor.fail(.violation(v)) }
                throw .invalidRequest(error.description)
            }
            state.pointee.txFree -= 1
            txLengths[slot] = frame.count
            state.pointee.statistics.framesSent &+= 1
            state.pointee.statistics.bytesSent &+= UInt64(frame.count)
            posted += 1
            i += 1
        }
        if posted > 0 && tx.publish() {
            if !txKick.signal() { throw supervisor.fail(.violation(.notifierBlocked(role: "kick"))) }
            state.pointee.statistics.kicks &+= 1
        }
        return posted
    }

    /// Takes transmit completions (their used len is ignored: it means nothing for a
    /// transmitted frame) and zeroes the private frame bytes they carried (R7).
    @inline(__always)
    func reapTransmitted() {
        while true {
            let c: Completion?
            do {
                c = try tx.nextCompletion()
            } catch {
                supervisor.fail(.violation(error))
                return
            }
            guard let c else { return }
            let slot = Int(truncatingIfNeeded: c.token)
            guard slot >= 0, slot < slotCount else { continue }  // tokens are ours
            txPool.zero(txSlices[slot], at: NetProtocol.headerSize, count: txLengths[slot])
            txFreeSlots[state.pointee.txFree] = slot
            state.pointee.txFree += 1
        }
    }

    /// Convenience: one frame (copies it into the bounce pool, no batch needed).
    public func send(_ frame: [UInt8]) throws(NetError) -> Bool {
        let batch = NetFrameBatch(capacity: 1, frameCapacity: max(1, frame.count))
        batch.append(frame)
        return try transmit(batch) == 1
    }

    // MARK: receive

    /// Appends up to `limit` validated frames to `batch` (never blocks), then reposts the
    /// consumed buffers. Returns how many frames were appended.
    public func receive(into batch: NetFrameBatch, limit: Int = .max) throws(NetError) -> Int {
        if supervisor.isBroken { throw failure ?? .disconnected("device broken") }
        var got = 0
        defer { if got > 0 { state.pointee.wakeBackoff.note(productive: true) } }
        while got < limit && batch.count < batch.capacity {
            let c: Completion?
            do {
                c = try rx.nextCompletion()
            } catch {
                throw supervisor.fail(.violation(error))
            }
            guard let c else { break }
            let slot = Int(truncatingIfNeeded: c.token)
            guard slot >= 0, slot < slotCount, rxIsPosted[slot] else { continue }  // tokens are ours
            rxIsPosted[slot] = false
            state.pointee.rxPosted -= 1
            if try take(c, slice: rxSlices[slot], into: batch) { got += 1 }
        }
        refill()
        return got
    }

    /// One receive buffer: the first of a frame (header checked) or a merged one. True
    /// when a whole frame was appended to `batch`.
    func take(_ c: Completion, slice: BounceSlice, into batch: NetFrameBatch) throws(NetError) -> Bool {
        let length = Int(c.length)
        guard length <= rxBufferSize else {  // the ring checked it too
            throw fail(.usedLengthBeyondBuffer(length: c.length, posted: rxBufferSize))
        }
        if state.pointee.mergeRemaining == 0 {
            guard length >= NetProtocol.headerSize else { throw fail(.usedLengthShorterThanHeader(length: c.length)) }
            // The header once into private memory (R2); only the copy is looked at.
            rxPool.copyOut(
                slice, at: 0, validatedLength: NetProtocol.headerSize,
                to: UnsafeMutableRawBufferPointer(start: headerScratch, count: NetProtocol.headerSize))
            let header = NetHeader(bytes: headerScratch)
            var buffers = 1
            if info.mergeableRxBuffers {
                // This buffer is no longer counted as posted: it is one of the num_buffers.
                let posted = state.pointee.rxPosted + 1
                guard header.numBuffers >= 1, Int(header.numBuffers) <= posted else {
                    throw fail(.numBuffersInvalid(numBuffers: header.numBuffers, posted: posted))
                }
                buffers = Int(header.numBuffers)
            }
            if let problem = header.problem(frameLength: maximumFrame, partialChecksum: info.partialChecksum) {
                throw fail(.headerInvalid(problem))
            }
            let frameBytes = length - NetProtocol.headerSize
            if buffers == 1 {
                return try deliver(
                    from: slice, at: NetProtocol.headerSize, count: frameBytes, header: header, into: batch)
            }
            guard frameBytes <= maximumFrame else {
                throw fail(.frameLengthInvalid(length: frameBytes, maximum: maximumFrame))
            }
            rxPool.copyOut(
                slice, at: NetProtocol.headerSize, validatedLength: frameBytes,
                to: UnsafeMutableRawBufferPointer(start: assembly, count: frameBytes))
            (headerScratch + NetProtocol.headerSize - 2).storeBytes(of: UInt16(0), as: UInt16.self)
            state.pointee.assemblyLength = frameBytes
            state.pointee.mergeRemaining = buffers - 1
            return false
        }
        let have = state.pointee.assemblyLength
        guard length <= maximumFrame - have else {
            throw fail(.frameLengthInvalid(length: have + length, maximum: maximumFrame))
        }
        rxPool.copyOut(
            slice, at: 0, validatedLength: length,
            to: UnsafeMutableRawBufferPointer(start: assembly + have, count: length))
        state.pointee.assemblyLength = have + length
        state.pointee.mergeRemaining -= 1
        guard state.pointee.mergeRemaining == 0 else { return false }
        let total = state.pointee.assemblyLength
        let header = NetHeader(bytes: headerScratch)
        try check(header, frameLength: total)
        guard let dst = batch.nextSlot, total <= batch.frameCapacity else { return false }
        dst.copyMemory(from: assembly, byteCount: total)
        batch.commit(length: total)
        count(total)
        return true
    }

    @inline(__always)
    func deliver(
        from slice: BounceSlice, at offset: Int, count frameBytes: Int, header: NetHeader, into batch: NetFrameBatch
    ) throws(NetError) -> Bool {
        try check(header, frameLength: frameBytes)
        guard let dst = batch.nextSlot, frameBytes <= batch.frameCapacity else { return false }
        rxPool.copyOut(
            slice, at: offset, validatedLength: frameBytes,
            to: UnsafeMutableRawBufferPointer(start: dst, count: frameBytes))
        batch.commit(length: frameBytes)
        count(frameBytes)
        return true
    }

    @inline(__always)
    func check(_ header: NetHeader, frameLength: Int) throws(NetError) {
        guard frameLength >= NetProtocol.ethernetHeaderSize, frameLength <= maximumFrame else {
            throw fail(.frameLengthInvalid(length: frameLength, maximum: maximumFrame))
        }
        if header.flags & NetProtocol.HeaderFlag.needsCsum != 0,
            let problem = header.problem(frameLength: frameLength, partialChecksum: info.partialChecksum)
        {
            throw fail(.headerInvalid(problem))
        }
    }

    @inline(__always)
    func count(_ bytes: Int) {
        state.pointee.statistics.framesReceived &+= 1
        state.pointee.statistics.bytesReceived &+= UInt64(bytes)
    }

    /// The device broke a virtio-net rule: both rings and the device break (R6).
    func fail(_ v: NetViolation) -> NetError {
        rx.breakQueue(.brokenAbove(rule: v.rule, reason: v.detail))
        tx.breakQueue(.brokenAbove(rule: v.rule, reason: v.detail))
        return supervisor.fail(.deviceViolation(v))
    }

    /// Posts every free receive slot again (private size, never re-read: R1).
    func refill() {
        guard !rx.isBroken else { return }
        var added = 0
        for slot in 0..<slotCount where !rxIsPosted[slot] {
            let segment = rxPool.segment(rxSlices[slot], offset: 0, length: rxBufferSize, deviceWritable: true)
            let ok = withUnsafePointer(to: segment) { p in
                (try? rx.add(UnsafeBufferPointer(start: p, count: 1), token: UInt64(slot))) != nil
            }
            guard ok else { break }
            rxIsPosted[slot] = true
            state.pointee.rxPosted += 1
            added += 1
        }
        if added > 0 && rx.publish() {
            if !rxKick.signal() { supervisor.fail(.violation(.notifierBlocked(role: "kick"))) }
            state.pointee.statistics.kicks &+= 1
        }
    }

    // MARK: waiting

    /// Blocks until a receive completion may be pending, or `deadline` (false). Spins
    /// `spin` polls first; wake-ups that bring nothing are backed off (R5).
    public func waitForReceive(until deadline: Deadline, spin: Int = 64) -> Bool {
        wait(rx, rxCall, until: deadline, spin: spin)
    }

    /// Blocks until a transmit slot may be free, or `deadline` (false).
    public func waitForTransmitRoom(until deadline: Deadline, spin: Int = 64) -> Bool {
        if transmitRoom > 0 { return true }
        return wait(tx, txCall, until: deadline, spin: spin)
    }

    /// Blocks until the device has consumed every frame posted (the transmit ring is
    /// empty again), or `deadline` (false). A driver that closes right after `transmit`
    /// may otherwise leave frames on the ring that the device never takes.
    public func waitUntilTransmitted(until deadline: Deadline, spin: Int = 64) -> Bool {
        while transmitRoom < slotCount {
            guard wait(tx, txCall, until: deadline, spin: spin), !deadline.hasPassed else {
                return transmitRoom == slotCount
            }
        }
        return true
    }

    func wait(_ ring: any DriverRing, _ call: Notifier, until deadline: Deadline, spin: Int) -> Bool {
        var spins = 0
        while !supervisor.isBroken {
            if ring.enableInterrupts() {
                ring.disableInterrupts()
                return true
            }
            spins += 1
            if spins <= spin {
                ring.disableInterrupts()
                continue
            }
            if deadline.hasPassed {
                ring.disableInterrupts()
                return false
            }
            switch EventWaiter.wait(for: call, until: deadline) {
            case .notified:
                if ring.enableInterrupts() {
                    ring.disableInterrupts()
                    return true
                }
                state.pointee.statistics.spuriousNotifications &+= 1
                state.pointee.wakeBackoff.note(productive: false)
                state.pointee.wakeBackoff.pause(until: deadline)
            case .timedOut, .other:
                ring.disableInterrupts()
                return !deadline.hasPassed && ring.enableInterrupts()
            }
        }
        return true  // broken: the next call reports the failure
    }
}

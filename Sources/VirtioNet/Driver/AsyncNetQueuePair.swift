#if canImport(Glibc)
import Glibc
#endif
import SharedMemory
import Synchronization

/// A queue pair for async code: `send` suspends while the transmit ring is full,
/// `receive` (and the `frames` sequence) suspends until a frame arrives; no call blocks a
/// thread.
///
/// ```swift
/// let net = try VirtioNetDriver.connect(socket: "/tmp/net.sock")
/// let port = try AsyncNetQueuePair(net)
/// try await port.send(frame)
/// for try await frame in port.frames { handle(frame) }
/// ```
///
/// Takes over pair `index` of `driver`: an I/O thread of its own transmits, receives,
/// waits on the pair's call eventfds and resumes the callers; nothing else may use that
/// pair afterwards. Received frames are validated exactly as `NetQueuePair.receive` does
/// (it is the same code) and kept, up to `backlog` of them, until a caller takes them;
/// with the backlog full the thread stops taking frames off the ring (the device then
/// sees a full receive ring, as with a slow guest).
///
/// Cancellation: a cancelled task gets `CancellationError` at once. A send still waiting
/// for room is never posted; a send already posted was resumed when it was posted (its
/// bounce slot is the pair's and is reused only after the device completed it). A
/// cancelled receive takes no frame: the frame goes to the next receiver. The first
/// violation breaks the device (R6): every waiting and later call fails with it.
///
/// The thread also watches the vhost-user control socket: when the back-end dies or
/// closes it, every waiting and later call fails at once with
/// `NetError.disconnected("back-end closed the vhost-user socket")` (and the device is
/// broken); a message the back-end sends unasked is a control-protocol violation.
public final class AsyncNetQueuePair: @unchecked Sendable {
    // @unchecked: `pair`, `batch`, `outgoing` and `driver` are touched only by the I/O
    // thread (and by init before it starts); everything shared is under `shared`, and
    // `wake` is an eventfd.
    struct Send {
        let id: UInt64
        let frame: [UInt8]
        let continuation: UnsafeContinuation<Void, any Error>
    }

    struct Receive {
        let id: UInt64
        let continuation: UnsafeContinuation<[UInt8], any Error>
    }

    struct Shared {
        var sends: [Send] = []
        var receivers: [Receive] = []
        var frames: [[UInt8]] = []
        var framesHead = 0
        /// Calls whose cancellation came before they were queued.
        var cancelled: Set<UInt64> = []
        var nextID: UInt64 = 0
        var failure: (any Error)?
        var sleeping = false
        var stopping = false

        var backlogCount: Int { frames.count - framesHead }
    }

    /// Frames kept for receivers before the thread stops taking them off the ring.
    public let backlog: Int
    let driver: VirtioNetDriver
    let pair: NetQueuePair
    let wake: Notifier
    let shared = Mutex<Shared>(Shared())
    let received: NetFrameBatch
    let outgoing: NetFrameBatch

    /// Takes over queue pair `index` of `driver` (no other user of that pair from now)
    /// and starts its I/O thread. The driver stays open as long as this object lives.
    public init(_ driver: VirtioNetDriver, pair index: Int = 0, backlog: Int = 1024) throws(NetError) {
        self.driver = driver
        self.pair = driver.pair(index)
        self.backlog = max(1, backlog)
        received = NetFrameBatch(capacity: 64, frameCapacity: driver.info.maximumFrame)
        outgoing = NetFrameBatch(capacity: 64, frameCapacity: driver.info.maximumFrame)
        do {
            wake = try Notifier()
            try spawnThread { [self] in run() }.detach()
        } catch {
            throw .system("\(error)")
        }
    }

    /// Stops the I/O thread (which holds this object until then: call it when done):
    /// waiting calls fail with `NetError.disconnected`, frames kept are dropped. The
    /// driver itself is closed by its owner.
    public func close() {
        shared.withLock { $0.stopping = true }
        wake.signal()
    }

    /// Posts `frame` (14...MTU + 18 bytes, copied into the pair's bounce memory) on the
    /// transmit ring; suspends while the ring is full.
    ///
    /// - Throws: `NetError` (a refused frame, the device's failure) or `CancellationError`.
    public func send(_ frame: [UInt8]) async throws {
        guard frame.count >= NetProtocol.ethernetHeaderSize, frame.count <= driver.info.maximumFrame else {
            throw NetError.invalidRequest("frame of \(frame.count) bytes is not in 14...\(driver.info.maximumFrame)")
        }
        let id = shared.withLock { s in
            defer { s.nextID &+= 1 }
            return s.nextID
        }
        try await withTaskCancellationHandler {
            try await withUnsafeThrowingContinuation { (c: UnsafeContinuation<Void, any Error>) in
                let refused = shared.withLock { s -> (any Error)? in
                    if s.cancelled.remove(id) != nil { return CancellationError() }
                    if let failure = s.failure { return failure }
                    s.sends.append(Send(id: id, frame: frame, continuation: c))
                    return nil
                }
                if let refused { c.resume(throwing: refused) } else { poke() }
            }
        } onCancel: {
            let waiting = shared.withLock { s -> Send? in
                guard let i = s.sends.firstIndex(where: { $0.id == id }) else {
                    s.cancelled.insert(id)
                    return nil
                }
                return s.sends.remove(at: i)
            }
            waiting?.continuation.resume(throwing: CancellationError())
        }
        shared.withLock { _ = $0.cancelled.remove(id) }
    }

    /// The next received frame (validated); suspends until one arrives.
    ///
    /// - Throws: `NetError` (the device's failure, or `disconnected` after `close()`) or
    ///   `CancellationError`.
    public func receive() async throws -> [UInt8] {
        let id = shared.withLock { s in
            defer { s.nextID &+= 1 }
            return s.nextID
        }
        let frame = try await withTaskCancellationHandler {
            try await withUnsafeThrowingContinuation { (c: UnsafeContinuation<[UInt8], any Error>) in
                let outcome = shared.withLock { s -> Result<[UInt8], any Error>? in
                    if s.cancelled.remove(id) != nil { return .failure(CancellationError()) }
                    if s.backlogCount > 0 {
                        let f = s.frames[s.framesHead]
                        s.framesHead += 1
                        return .success(f)
                    }
                    if let failure = s.failure { return .failure(failure) }
                    s.receivers.append(Receive(id: id, continuation: c))
                    return nil
                }
                if let outcome { c.resume(with: outcome) }
                // A frame taken from a full backlog: the thread may take more now.
                if case .success? = outcome { poke() }
            }
        } onCancel: {
            let waiting = shared.withLock { s -> Receive? in
                guard let i = s.receivers.firstIndex(where: { $0.id == id }) else {
                    s.cancelled.insert(id)
                    return nil
                }
                return s.receivers.remove(at: i)
            }
            waiting?.continuation.resume(throwing: CancellationError())
        }
        shared.withLock { _ = $0.cancelled.remove(id) }
        return frame
    }

    /// Received frames as an `AsyncSequence`; it ends with the device's failure (thrown)
    /// or when the consuming task is cancelled.
    public var frames: AsyncThrowingStream<[UInt8], any Error> {
        AsyncThrowingStream(unfolding: { [self] in
            do {
                return try await receive()
            } catch is CancellationError {
                return nil
            }
        })
    }

    /// Frames kept for receivers now (for tests and monitors).
    public var backlogCount: Int { shared.withLock { $0.backlogCount } }

    /// Sends waiting for transmit room now.
    public var waitingSends: Int { shared.withLock { $0.sends.count } }

    /// Receivers parked now.
    public var waitingReceivers: Int { shared.withLock { $0.receivers.count } }

    /// Wakes the thread if it sleeps.
    func poke() {
        let signal = shared.withLock { s -> Bool in
            defer { s.sleeping = false }
            return s.sleeping
        }
        if signal { wake.signal() }
    }

    // MARK: the I/O thread

    func run() {
        while true {
            let stopping = shared.withLock { $0.stopping }
            if stopping {
                failAll(NetError.disconnected("the queue pair was closed"))
                return
            }
            // Failed (the device, or this pair: the driver closed under it): the thread
            // only waits for close().
            if let failure = driver.failure ?? shared.withLock({ $0.failure }) {
                failAll(failure)
                if !sleep(rx: false, tx: false) { return }
                continue
            }
            var progress = false
            var txFull = false
            do {
                (progress, txFull) = try transmit()
                progress = try receive() || progress
            } catch {
                failAll(error)
                continue
            }
            if progress { continue }
            let wantRx = shared.withLock { $0.backlogCount < backlog }
            _ = sleep(rx: wantRx, tx: txFull)
        }
    }

    /// Posts waiting sends while there is room; resumes each posted one. Returns whether
    /// any was posted, and whether sends still wait for room. Posting runs under the
    /// lock (it never blocks), so a send its task cancelled first is never posted.
    func transmit() throws(NetError) -> (Bool, Bool) {
        let outcome = shared.withLock { s -> Result<([Send], Bool), NetError> in
            guard !s.sends.isEmpty else { return .success(([], false)) }
            outgoing.removeAll()
            for send in s.sends.prefix(outgoing.capacity) { outgoing.append(send.frame) }
            let posted: Int
            do throws(NetError) {
                posted = try pair.transmit(outgoing)
            } catch {
                return .failure(error)
            }
            let taken = Array(s.sends.prefix(posted))
            s.sends.removeFirst(posted)
            return .success((taken, !s.sends.isEmpty && posted < outgoing.capacity))
        }
        let (posted, full) = try outcome.get()
        for send in posted { send.continuation.resume() }
        return (!posted.isEmpty, full)
    }

    /// Takes frames off the ring while the backlog has room and hands them to parked
    /// receivers first. Returns whether any frame arrived.
    func receive() throws(NetError) -> Bool {
        let room = shared.withLock { backlog - $0.backlogCount }
        guard room > 0 else { return false }
        received.removeAll()
        let n = try pair.receive(into: received, limit: room)
        guard n > 0 else { return false }
        var handed: [(Receive, [UInt8])] = []
        shared.withLock { s in
            for i in 0..<n {
                let f = received.bytes(i)
                if !s.receivers.isEmpty {
                    handed.append((s.receivers.removeFirst(), f))
                } else {
                    s.frames.append(f)
                }
            }
            if s.framesHead > 1024 && s.framesHead * 2 > s.frames.count {
                s.frames.removeFirst(s.framesHead)
                s.framesHead = 0
            }
        }
        for (r, f) in handed { r.continuation.resume(returning: f) }
        return true
    }

    /// Every waiting call fails with `error`; later calls too.
    func failAll(_ error: any Error) {
        let (sends, receivers) = shared.withLock { s -> ([Send], [Receive]) in
            if s.failure == nil { s.failure = error }
            defer {
                s.sends = []
                s.receivers = []
            }
            return (s.sends, s.receivers)
        }
        for s in sends { s.continuation.resume(throwing: error) }
        for r in receivers { r.continuation.resume(throwing: error) }
    }

    /// Blocks until the rings named may have work, or a caller pokes. False once stopping.
    func sleep(rx: Bool, tx: Bool) -> Bool {
        if rx && pair.rx.enableInterrupts() {
            pair.rx.disableInterrupts()
            return true
        }
        if tx && pair.tx.enableInterrupts() {
            pair.tx.disableInterrupts()
            return true
        }
        let go = shared.withLock { s -> Bool in
            if s.stopping { return false }
            // Work that came in since the thread looked: do it first.
            if s.failure == nil {
                if !s.sends.isEmpty && !tx { return false }
                if !rx && s.backlogCount < backlog { return false }
            }
            s.sleeping = true
            return true
        }
        guard go else {
            pair.rx.disableInterrupts()
            pair.tx.disableInterrupts()
            return !shared.withLock { $0.stopping }
        }
        // The control socket too, until the pair has failed (a closed socket stays
        // readable): the back-end dying wakes the thread, which fails every waiting call.
        let watchControl = driver.failure == nil && shared.withLock { $0.failure == nil }
        var fds = (
            pollfd(fd: wake.fileDescriptor, events: Int16(POLLIN), revents: 0),
            pollfd(fd: rx ? pair.rxCall.fileDescriptor : -1, events: Int16(POLLIN), revents: 0),
            pollfd(fd: tx ? pair.txCall.fileDescriptor : -1, events: Int16(POLLIN), revents: 0),
            pollfd(fd: watchControl ? driver.controlDescriptor : -1, events: Int16(POLLIN), revents: 0)
        )
        var r: Int32
        repeat {
            r = withUnsafeMutableBytes(of: &fds) { raw in
                poll(raw.baseAddress?.assumingMemoryBound(to: pollfd.self), 4, -1)
            }
        } while r < 0 && errno == EINTR
        shared.withLock { $0.sleeping = false }
        pair.rx.disableInterrupts()
        pair.tx.disableInterrupts()
        if fds.3.revents != 0, let failure = driver.controlSocketSignalled() {
            failAll(failure)
            return true
        }
        if fds.0.revents != 0 { wake.drain() }
        var notified = false
        if fds.1.revents != 0 { notified = pair.rxCall.drain() > 0 || notified }
        if fds.2.revents != 0 { notified = pair.txCall.drain() > 0 || notified }
        if notified && fds.0.revents == 0 {
            // A doorbell without work is a storm: backed off (R5).
            let productive = pair.rx.enableInterrupts() || pair.tx.enableInterrupts()
            pair.rx.disableInterrupts()
            pair.tx.disableInterrupts()
            pair.state.pointee.wakeBackoff.note(productive: productive)
            if !productive {
                pair.state.pointee.statistics.spuriousNotifications &+= 1
                pair.state.pointee.wakeBackoff.pause(until: .distantFuture)
            }
        }
        return true
    }
}

#if canImport(Glibc)
import Glibc
#endif
public import SharedMemory
public import Virtqueue
import VhostUser
import Synchronization

/// A virtio-blk disk behind a vhost-user back-end that is not trusted.
///
/// ```swift
/// let disk = try BlockDevice.connect(socket: "/tmp/vhost.sock")
/// try disk.write(at: 0, bytes: Array(repeating: 0xab, count: 4096))
/// let back = try await disk.read(at: 0, count: 4096)
/// ```
///
/// Convenience calls (`read`, `write`, `flush`, ...) run on queue 0 under a lock. The hot
/// path is `queue(i)`: one `BlockQueue` per thread with `submit...`/`poll`/`wait`. The
/// first violation or timeout breaks the whole device (R6): every request fails with a
/// `VirtioError` naming the rule; `reconnect()` recovers.
///
/// Reconnect handoff (any number of queue threads): the thread that first sees the socket
/// close (or calls `reconnect()`) owns the reconnection and touches only the control
/// plane (`frontend`, `link`). Every queue's private state, ring and bounce pool stay its
/// own driving thread's: the owner raises each queue's `attention` flag, a queue thread
/// that sees it parks in `wait` (bounded by the reconnect deadline) until the generation
/// changes, then resets its own ring, resubmits its own in-flight requests and announces
/// its ring on the new connection under the `link` lock (`settle`).
public final class BlockDevice: @unchecked Sendable {
    public struct Options: Sendable {
        /// Queues wanted (clamped to what the device offers).
        public var queues = 1
        public var queueSize = 128
        /// Per-request deadline in seconds (R5).
        public var requestTimeout: Double = 10
        /// Bound on each control-plane operation as a whole: connect plus negotiation and
        /// ring set-up, a reconnect attempt, a close (R5: not per message, so a back-end
        /// that answers each message just in time cannot stretch it).
        public var controlTimeout: Double = 5
        public var bounceBytesPerQueue = 4 << 20
        /// When the back-end goes away: reconnect and resubmit in-flight requests
        /// instead of failing them. Safe with one thread per queue: one thread reconnects,
        /// the others park, then each queue resubmits its own requests.
        public var reconnect = false
        /// How long to keep trying to reconnect.
        public var reconnectTimeout: Double = 10
        /// Polls before blocking on the call eventfd.
        public var spinIterations = 256
        /// Use packed virtqueues when the back-end offers VIRTIO_F_RING_PACKED.
        public var packedRing = true
        /// Called once with the first failure of the device (rate-limited logging, R6).
        public var onFailure: (@Sendable (VirtioError) -> Void)?
        public init() {}
    }

    /// Synthetic addresses announced to the back-end (R7): never our real pointers.
    public static let guestBase: UInt64 = 0x1_0000_0000
    public static let userBase: UInt64 = 0x5a5a_0000_0000

    /// The features we ask for; SET_FEATURES acks only those the back-end offered.
    public static let wantedFeatures: UInt64 =
        FeatureBits.version1 | FeatureBits.protocolFeatures | FeatureBits.ringEventIndex
        | BlockProtocol.Feature.sizeMax | BlockProtocol.Feature.segMax | BlockProtocol.Feature.blockSize
        | BlockProtocol.Feature.flush | BlockProtocol.Feature.readOnly | BlockProtocol.Feature.multiQueue
        | BlockProtocol.Feature.discard | BlockProtocol.Feature.writeZeroes

    public let socketPath: String
    public let options: Options
    public let info: BlockInfo
    /// The control connection. Guarded by `link`: touched only under its lock, or by the
    /// reconnection's owner while `link.reconnecting` keeps every other thread off it.
    var frontend: Frontend
    /// The connection before `frontend`, kept open (shut down) so a queue thread that
    /// read its descriptor before a reconnect never polls a reused descriptor number.
    var retiredFrontend: Frontend?
    let region: SharedRegion
    let layout: DriverRegionLayout
    var queues: [BlockQueue] = []
    /// Whether `link.failure` is set: one load for `isBroken`.
    let broken = Atomic<Bool>(false)
    let convenienceLock = Mutex<Int>(0)
    /// Who reconnects, and which connection each queue's ring is announced on.
    let link: Locked<Link>
    /// The control socket's descriptor (low 32 bits) and the connection generation it
    /// belongs to (high 32 bits), for queue threads that block on it without the lock.
    let control: Atomic<UInt64>

    /// Reconnection state; see the handoff in the type's documentation.
    struct Link {
        /// Bumped by every successful reconnect.
        var generation: UInt64 = 1
        /// A thread owns a reconnect in progress: queue threads park, nobody else touches
        /// `frontend`.
        var reconnecting = false
        var reconnectStarted = Deadline.now
        /// Per queue: the generation its ring was last announced on.
        var attached: [UInt64]
        /// Queues announced before this generation hand back their in-flight requests as
        /// failures (`dropReason`) before they re-attach: the device they were posted to
        /// broke a rule and may have written their bounce memory (R6).
        var dropBefore: UInt64 = 0
        var dropReason = VirtioError.disconnected("reconnected after a failure")
        var closed = false
        /// The sticky failure (R6), until a reconnect ends it.
        var failure: VirtioError?
    }

    static func controlWord(generation: UInt64, descriptor: Int32) -> UInt64 {
        (generation << 32) | UInt64(UInt32(bitPattern: descriptor))
    }

    /// Connects, negotiates, validates the config and sets up the queues.
    public static func connect(socket path: String, options: Options = Options()) throws(VirtioError) -> BlockDevice {
        let frontend: Frontend
        do {
            frontend = try Frontend.connect(
                path: path, replyTimeout: options.controlTimeout, until: .after(seconds: options.controlTimeout))
        } catch {
            throw VirtioError(error, replyTimeoutMilliseconds: UInt64(options.controlTimeout * 1000))
        }
        return try BlockDevice(path: path, frontend: frontend, options: options)
    }

    /// Uses an already connected channel (a socketpair with an in-process back-end).
    public static func connect(channel: UnixChannel, options: Options = Options()) throws(VirtioError) -> BlockDevice {
        let frontend = Frontend(channel: channel, replyTimeout: options.controlTimeout)
        frontend.operationDeadline = .after(seconds: options.controlTimeout)
        return try BlockDevice(path: "", frontend: frontend, options: options)
    }

    init(path: String, frontend: Frontend, options: Options) throws(VirtioError) {
        self.socketPath = path
        self.options = options
        self.frontend = frontend
        guard options.requestTimeout > 0, options.requestTimeout <= 86400, options.controlTimeout > 0,
            options.controlTimeout <= 86400, options.reconnectTimeout >= 0, options.reconnectTimeout <= 86400
        else { throw .invalidRequest("timeouts must be in (0, 86400] seconds") }
        guard SplitLayout.isValidQueueSize(options.queueSize), options.queueSize >= 4 else {
            throw .invalidRequest("queue size \(options.queueSize) is not a power of two >= 4")
        }
        let info = try Self.negotiate(frontend, options: options)
        self.info = info
        link = Locked(Link(attached: Array(repeating: 1, count: info.queueCount)))
        control = Atomic(Self.controlWord(generation: 1, descriptor: frontend.channel.channel.fileDescriptor))
        layout = DriverRegionLayout(
            queueCount: info.queueCount, queueSize: options.queueSize, indirectEntries: 0,
            bounceBytesPerQueue: max(options.bounceBytesPerQueue, 2 * info.maxTransfer + 8192))
        do {
            region = try SharedRegion(name: "ringfence-blk", size: layout.totalSize)
        } catch {
            throw .system(error.description)
        }
        let ringFeatures = RingFeatures(eventIndex: info.features & FeatureBits.ringEventIndex != 0)
        for q in 0..<info.queueCount {
            let (ring, pool) = layout.makeDriverRing(
                queue: q, region: region, guestBase: Self.guestBase, features: ringFeatures, format: ringFormat)
            let kick: Notifier
            let call: Notifier
            do {
                kick = try Notifier()
                call = try Notifier()
            } catch {
                throw .system(error.description)
            }
            queues.append(BlockQueue(index: q, device: self, ring: ring, pool: pool, kick: kick, call: call))
        }
        try attachRings(frontend)
        frontend.operationDeadline = .distantFuture  // set-up done: per-message deadlines from here
    }

    deinit { close() }

    /// Negotiation up to validated geometry (no rings yet).
    static func negotiate(_ frontend: Frontend, options: Options) throws(VirtioError) -> BlockInfo {
        let timeoutMs = UInt64(options.controlTimeout * 1000)
        do {
            try frontend.handshake()
            guard frontend.protocolFeatures.contains(.config) else {
                throw VirtioError.unsupported("VHOST_USER_PROTOCOL_F_CONFIG (capacity unknown)")
            }
            let raw = try frontend.getConfig(size: BlockConfig.size)
            let acked = try frontend.setFeatures(
                options.packedRing ? wantedFeatures | FeatureBits.ringPacked : wantedFeatures)
            do {
                return try BlockInfo.validate(
                    BlockConfig.decode(raw), features: acked, backendQueues: frontend.queueCount,
                    requestedQueues: max(1, options.queues), queueSize: options.queueSize)
            } catch {
                throw VirtioError.deviceViolation(error)
            }
        } catch let error as VhostUserError {
            throw VirtioError(error, replyTimeoutMilliseconds: timeoutMs)
        } catch let error as VirtioError {
            throw error
        } catch {
            throw .system("\(error)")
        }
    }

    /// SET_MEM_TABLE with the sealed region and synthetic addresses, then every queue,
    /// then a round trip proving the back-end accepted all of it.
    func attachRings(_ frontend: Frontend) throws(VirtioError) {
        do {
            try attachMemory(frontend)
            for q in queues { try attachQueue(q, frontend) }
            try frontend.sync()
        } catch {
            throw VirtioError(error, replyTimeoutMilliseconds: UInt64(options.controlTimeout * 1000))
        }
    }

    func attachMemory(_ frontend: Frontend) throws(VhostUserError) {
        try frontend.setMemTable(
            [
                MemoryRegionDescription(
                    guestAddress: Self.guestBase, size: UInt64(region.size), userAddress: Self.userBase,
                    mmapOffset: 0)
            ],
            descriptors: [region.fileDescriptor])
    }

    /// Announces one queue's ring, which must be fresh (reset, or never used).
    func attachQueue(_ q: BlockQueue, _ frontend: Frontend) throws(VhostUserError) {
        let r = layout.queues[q.index].ring
        try frontend.setUpQueue(
            index: q.index, size: options.queueSize,
            descriptor: Self.userBase + UInt64(r.descriptorOffset),
            avail: Self.userBase + UInt64(r.availOffset), used: Self.userBase + UInt64(r.usedOffset),
            kick: q.kickNotifier.fileDescriptor, call: q.callNotifier.fileDescriptor,
            base: ringFormat == .packed
                ? PackedLayout.encodeBase(avail: 0, availWrap: true, used: 0, usedWrap: true) : 0)
        try frontend.setQueueEnabled(index: q.index, true)
    }

    // MARK: queues and state

    public var queueCount: Int { queues.count }

    /// Split or packed: packed when VIRTIO_F_RING_PACKED was offered and wanted.
    public var ringFormat: RingFormat { info.features & FeatureBits.ringPacked != 0 ? .packed : .split }

    /// Queue `i` for the hot path (one thread per queue).
    public func queue(_ i: Int) -> BlockQueue { queues[max(0, min(i, queues.count - 1))] }

    /// The sticky failure, if the device is broken.
    public var failure: VirtioError? {
        guard isBroken else { return nil }
        return link.withLock { $0.failure }
    }

    public var isBroken: Bool { broken.load(ordering: .acquiring) }

    /// Marks the device broken (first failure wins) and reports it once. A timeout while
    /// a reconnect is under way is not a failure: resubmission stamps fresh deadlines.
    func fail(_ error: VirtioError) {
        let first = link.withLock { l -> Bool in
            if l.reconnecting, case .timeout = error { return false }
            return recordFailure(error, in: &l)
        }
        guard first else { return }
        // Wake threads blocked on other queues: they fail their requests now, not at
        // their own deadlines (our own eventfds; the device cannot see this).
        wakeQueues()
        options.onFailure?(error)
    }

    /// Under `link`'s lock: records the failure and sends every queue to its slow path.
    /// Returns whether it was the first.
    func recordFailure(_ error: VirtioError, in l: inout Link) -> Bool {
        raiseAttention()
        guard l.failure == nil else { return false }
        l.failure = error
        broken.store(true, ordering: .releasing)
        return true
    }

    /// Under `link`'s lock: every queue's next call takes its slow path (`settle`).
    func raiseAttention() {
        for q in queues { q.attention.store(true, ordering: .relaxed) }
    }

    /// Wakes every queue thread blocked on its call eventfd (ours; the device cannot see it).
    func wakeQueues() {
        for q in queues { q.callNotifier.signal() }
    }

    /// The control socket's descriptor and the generation tag it belongs to, read without
    /// the lock by queue threads about to block on it.
    var controlSnapshot: (descriptor: Int32, generation: UInt32) {
        let word = control.load(ordering: .acquiring)
        return (Int32(bitPattern: UInt32(truncatingIfNeeded: word)), UInt32(truncatingIfNeeded: word >> 32))
    }

    /// The control socket of connection `seen` became readable: the back-end closed it (or
    /// spoke unasked, which it never may). With `reconnect`, this thread becomes the
    /// reconnection's owner unless one is already under way (then the signal is stale).
    func controlChannelSignalled(generation seen: UInt32) {
        enum Verdict { case ignore, spoke, hungUp, reconnect }
        let verdict = link.withLock { l -> Verdict in
            guard !l.closed, !l.reconnecting, UInt32(truncatingIfNeeded: l.generation) == seen else { return .ignore }
            var byte: UInt8 = 0
            let n = recv(frontend.channel.channel.fileDescriptor, &byte, 1, Int32(MSG_PEEK | MSG_DONTWAIT))
            if n > 0 { return .spoke }
            if n < 0 && (errno == EAGAIN || errno == EINTR) { return .ignore }
            guard options.reconnect else { return .hungUp }
            beginReconnect(&l)
            return .reconnect
        }
        switch verdict {
        case .ignore: return
        case .spoke: fail(.deviceViolation(.controlProtocol("unsolicited message on the vhost-user socket")))
        case .hungUp: fail(.disconnected("back-end closed the vhost-user socket"))
        case .reconnect:
            wakeQueues()
            try? runReconnect()  // a failure is recorded for every queue
        }
    }

    /// Under `link`'s lock: the calling thread becomes the reconnection's owner.
    func beginReconnect(_ l: inout Link) {
        l.reconnecting = true
        l.reconnectStarted = .now
        raiseAttention()
    }

    /// Reconnects to the same socket path, renegotiates (the back-end must offer what was
    /// acked before) and re-announces memory; each queue then rebuilds its ring and posts
    /// its unfinished requests again on its own thread's next call. Requests posted to a
    /// device broken by a violation or timeout fail instead. Waits for a reconnect that
    /// another thread owns.
    public func reconnect() throws(VirtioError) {
        guard !socketPath.isEmpty else { throw .disconnected("no socket path to reconnect to") }
        enum Role { case closed, owner, waiter }
        let role = link.withLock { l -> Role in
            if l.closed { return .closed }
            if l.reconnecting { return .waiter }
            beginReconnect(&l)
            return .owner
        }
        switch role {
        case .closed: throw .disconnected("the device is closed")
        case .owner:
            wakeQueues()
            try runReconnect()
        case .waiter:
            _ = awaitReconnect(until: .distantFuture, notifier: nil)
            if let failure { throw failure }
        }
    }

    /// The owner's part of a reconnect: the control plane only, never a queue's state.
    /// Ends the reconnect (success or failure) before it returns.
    func runReconnect() throws(VirtioError) {
        // While `reconnecting` is set nobody else touches `frontend`.
        let old = link.withLock { _ in frontend }
        old.close()
        guard !socketPath.isEmpty else {
            let error = VirtioError.disconnected("no socket path to reconnect to")
            endReconnect(.failure(error))
            throw error
        }
        let timeoutMs = UInt64(options.controlTimeout * 1000)
        let deadline = Deadline.after(seconds: options.reconnectTimeout)
        var lastError = VirtioError.disconnected("reconnect timed out")
        while !deadline.hasPassed {
            do throws(VirtioError) {
                let f: Frontend
                do {
                    f = try Frontend.connect(
                        path: socketPath, replyTimeout: options.controlTimeout,
                        until: min(deadline, .after(seconds: options.controlTimeout)))
                } catch {
                    throw VirtioError(error, replyTimeoutMilliseconds: timeoutMs)
                }
                let newInfo = try Self.negotiate(f, options: options)
                guard newInfo.features == info.features, newInfo.queueCount >= queues.count,
                    newInfo.capacityBytes == info.capacityBytes, newInfo.blockSize == info.blockSize
                else {
                    f.close()
                    throw VirtioError.disconnected("back-end came back with a different device")
                }
                // The rings follow, each announced by its own queue's thread once it has
                // rebuilt it: a back-end never finds an old ring's indices.
                do throws(VhostUserError) {
                    try attachMemory(f)
                    try f.sync()
                } catch {
                    f.close()
                    throw VirtioError(error, replyTimeoutMilliseconds: timeoutMs)
                }
                f.operationDeadline = .distantFuture  // set-up done: per-message deadlines from here
                endReconnect(.success(f))
                return
            } catch {
                lastError = error
                // A malformed back-end is not waited for.
                if error.violationCause != nil {
                    endReconnect(.failure(error))
                    throw error
                }
            }
            usleep(50_000)
        }
        endReconnect(.failure(lastError))
        throw lastError
    }

    /// Installs the new connection (a reconnect ends a failure: recovery is explicit, R6)
    /// or records why there is none, then wakes every parked queue thread.
    func endReconnect(_ outcome: Result<Frontend, VirtioError>) {
        let first = link.withLock { l -> Bool in
            l.reconnecting = false
            raiseAttention()
            switch outcome {
            case .success(let f):
                guard !l.closed else {
                    f.close()
                    return false
                }
                retiredFrontend = frontend
                frontend = f
                l.generation += 1
                control.store(
                    Self.controlWord(generation: l.generation, descriptor: f.channel.channel.fileDescriptor),
                    ordering: .releasing)
                if let previous = l.failure {
                    if case .disconnected = previous {
                    } else {
                        l.dropBefore = l.generation
                        l.dropReason = previous
                    }
                    l.failure = nil
                    broken.store(false, ordering: .releasing)
                }
                return false
            case .failure(let error):
                return recordFailure(error, in: &l)
            }
        }
        wakeQueues()
        if first, case .failure(let error) = outcome { options.onFailure?(error) }
    }

    /// A queue's slow path, on its own driving thread while its `attention` flag is up:
    /// reports a failure or a reconnect under way, or re-attaches the queue to the current
    /// connection (reset, resubmit, announce) and lowers the flag.
    func settle(_ q: BlockQueue) -> BlockQueue.Standing {
        enum Step {
            case done(BlockQueue.Standing)
            case attach(generation: UInt64)
        }
        enum Announced {
            case yes, retry
            case lost(VirtioError)
            case reconnect
        }
        // Each round returns, or attaches once, or ends a reconnect it started: a back-end
        // that keeps dropping the connection during the attach gets a few rounds, no more.
        for _ in 0..<4 {
            let step = link.withLock { l -> Step in
                if let failure = l.failure { return .done(.failed(failure)) }
                if l.reconnecting { return .done(.reconnecting) }
                if l.attached[q.index] == l.generation {
                    q.attention.store(false, ordering: .relaxed)
                    return .done(.ready)
                }
                if l.attached[q.index] < l.dropBefore && q.inFlight > 0 { return .done(.failed(l.dropReason)) }
                return .attach(generation: l.generation)
            }
            let generation: UInt64
            switch step {
            case .done(let standing): return standing
            case .attach(let g): generation = g
            }
            do throws(VirtioError) {
                try q.resubmitAfterReconnect()
            } catch {
                fail(error)
                continue
            }
            let announced = link.withLock { l -> Announced in
                guard !l.reconnecting, l.generation == generation, l.failure == nil else { return .retry }
                do throws(VhostUserError) {
                    // One bound for the whole announcement, not one per message (R5).
                    try frontend.bounded(by: .after(seconds: options.controlTimeout)) { () throws(VhostUserError) in
                        try attachQueue(q, frontend)
                        try frontend.sync()
                    }
                } catch {
                    let e = VirtioError(error, replyTimeoutMilliseconds: UInt64(options.controlTimeout * 1000))
                    if e.violationCause != nil { return .lost(e) }
                    guard options.reconnect, !l.closed else { return .lost(e) }
                    beginReconnect(&l)
                    return .reconnect
                }
                l.attached[q.index] = generation
                return .yes
            }
            switch announced {
            case .yes: q.kickNotifier.signal()
            case .retry: break
            case .lost(let e): fail(e)
            case .reconnect:
                wakeQueues()
                try? runReconnect()
            }
        }
        fail(.disconnected("queue \(q.index) could not be attached to the back-end again"))
        return .failed(failure ?? .disconnected("queue \(q.index) could not be attached to the back-end again"))
    }

    /// Parks a queue thread (or a `reconnect()` caller) while another thread reconnects.
    /// Returns true once no reconnect is under way, false when `limit` passed first.
    /// Bounded: past the owner's deadline plus a last attempt's replies, the device fails.
    func awaitReconnect(until limit: Deadline, notifier: Notifier?) -> Bool {
        let patience = options.reconnectTimeout + 8 * options.controlTimeout + 1
        while true {
            guard let started = link.withLock({ l in l.reconnecting ? l.reconnectStarted : nil }) else { return true }
            let giveUp = Deadline(uptimeNanoseconds: started.uptimeNanoseconds &+ UInt64(patience * 1e9))
            if giveUp.hasPassed {
                fail(.disconnected("reconnect did not finish within \(Int(patience)) s"))
                return true
            }
            if limit.hasPassed { return false }
            let until = min(giveUp, limit, .after(seconds: 0.05))
            guard let notifier else {
                usleep(1000)
                continue
            }
            // The owner signals every call eventfd when it is done; other wake-ups come
            // from a back-end that kept the descriptor and are slowed down (R5).
            if notifier.wait(until: until) > 0 { usleep(1000) }
        }
    }

    /// Stops the rings (GET_VRING_BASE) and closes the connection. A reconnect under way
    /// closes what it connects.
    public func close() {
        link.withLock { l in
            guard !l.closed else { return }
            l.closed = true
            guard !l.reconnecting else { return }
            if l.failure == nil {
                // One bound for the whole close, not one per queue: a silent back-end costs
                // controlTimeout once, and the queues after the first timeout are not asked.
                frontend.bounded(by: .after(seconds: options.controlTimeout)) {
                    for q in queues where l.attached[q.index] == l.generation {
                        do { _ = try frontend.getVringBase(index: q.index) } catch { break }
                    }
                }
            }
            frontend.close()
        }
    }

    // MARK: convenience (queue 0, serialized)

    /// Largest chunk the convenience calls post per request.
    public static let convenienceChunk = 128 << 10
    static let convenienceDepth = 8

    /// Runs `total` bytes as chunks of at most `chunk`, several in flight, on queue 0.
    func pipeline(
        total: Int, chunk: Int,
        submit: (BlockQueue, _ at: Int, _ length: Int, _ tag: UInt64) throws(VirtioError) -> Void
    ) throws(VirtioError) {
        try convenienceLock.withLock { (_: inout Int) throws(VirtioError) in
            let q = queues[0]
            let step = max(info.blockSize, min(chunk, info.maxTransfer) / info.blockSize * info.blockSize)
            var next = 0
            var outstanding = 0
            var firstError: VirtioError?
            while true {
                while next < total && outstanding < Self.convenienceDepth && firstError == nil {
                    let length = min(step, total - next)
                    do throws(VirtioError) {
                        try submit(q, next, length, UInt64(next))
                    } catch {
                        if error == .busy && outstanding > 0 { break }
                        firstError = error
                        break
                    }
                    next += length
                    outstanding += 1
                }
                if outstanding == 0 { break }
                guard let c = q.wait() else {
                    firstError = firstError ?? .system("queue lost track of its requests")
                    break
                }
                outstanding -= 1
                if case .failure(let e) = c.result, firstError == nil { firstError = e }
            }
            if let firstError { throw firstError }
        }
    }

    /// Reads `buffer.count` bytes at `offset` (block-aligned).
    public func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(VirtioError) {
        try queues[0].checkRange(offset: offset, length: buffer.count, transferLimit: false)
        try pipeline(total: buffer.count, chunk: Self.convenienceChunk) { (q, at, length, tag) throws(VirtioError) in
            try q.submitRead(
                offset: offset + UInt64(at), into: UnsafeMutableRawBufferPointer(rebasing: buffer[at..<at + length]),
                tag: tag)
        }
    }

    public func read(at offset: UInt64, count: Int) throws(VirtioError) -> [UInt8] {
        try readBytes(at: offset, count: count)
    }

    func readBytes(at offset: UInt64, count: Int) throws(VirtioError) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        try bytes.withUnsafeMutableBytes { b in
            Result { () throws(VirtioError) in try read(at: offset, into: b) }
        }.get()
        return bytes
    }

    /// Writes `buffer` at `offset` (block-aligned).
    public func write(at offset: UInt64, from buffer: UnsafeRawBufferPointer) throws(VirtioError) {
        guard !info.readOnly else { throw .readOnly }
        try queues[0].checkRange(offset: offset, length: buffer.count, transferLimit: false)
        try pipeline(total: buffer.count, chunk: Self.convenienceChunk) { (q, at, length, tag) throws(VirtioError) in
            try q.submitWrite(
                offset: offset + UInt64(at), from: UnsafeRawBufferPointer(rebasing: buffer[at..<at + length]), tag: tag)
        }
    }

    public func write(at offset: UInt64, bytes: [UInt8]) throws(VirtioError) {
        try writeBytes(at: offset, bytes: bytes)
    }

    func writeBytes(at offset: UInt64, bytes: [UInt8]) throws(VirtioError) {
        try bytes.withUnsafeBytes { b in
            Result { () throws(VirtioError) in try write(at: offset, from: b) }
        }.get()
    }

    public func flush() throws(VirtioError) { try flushSync() }

    func flushSync() throws(VirtioError) {
        try pipeline(total: 1, chunk: 1) { (q, _, _, tag) throws(VirtioError) in try q.submitFlush(tag: tag) }
    }

    /// Discards (or, with `zeroes`, writes zeroes over) `length` bytes at `offset`,
    /// split into requests the device accepts.
    public func discard(at offset: UInt64, length: Int, zeroes: Bool = false, unmap: Bool = false) throws(VirtioError) {
        try queues[0].checkRange(offset: offset, length: length, transferLimit: false)
        let limit = Int(clamping: zeroes ? info.maxWriteZeroesBytes : info.maxDiscardBytes)
        guard limit > 0 else {
            throw .unsupported(zeroes ? "VIRTIO_BLK_F_WRITE_ZEROES" : "VIRTIO_BLK_F_DISCARD")
        }
        let chunk = max(info.blockSize, limit / info.blockSize * info.blockSize)
        try convenienceLock.withLock { (_: inout Int) throws(VirtioError) in
            let q = queues[0]
            var at = 0
            while at < length {
                let n = min(chunk, length - at)
                try q.submitDiscard(offset: offset + UInt64(at), length: n, zeroes: zeroes, unmap: unmap, tag: 0)
                guard let c = q.wait() else { throw .system("queue lost track of its requests") }
                if case .failure(let e) = c.result { throw e }
                at += n
            }
        }
    }

    public func writeZeroes(at offset: UInt64, length: Int, unmap: Bool = false) throws(VirtioError) {
        try discard(at: offset, length: length, zeroes: true, unmap: unmap)
    }

    /// GET_ID: the device's serial, up to 20 bytes, cut at the first NUL.
    public func identify() throws(VirtioError) -> String { try identifySync() }

    func identifySync() throws(VirtioError) -> String {
        var id = [UInt8](repeating: 0, count: BlockProtocol.idSize)
        var got = 0
        try id.withUnsafeMutableBytes { b in
            Result { () throws(VirtioError) in
                try convenienceLock.withLock { (_: inout Int) throws(VirtioError) in
                    let q = queues[0]
                    try q.submitGetID(into: b, tag: 0)
                    guard let c = q.wait() else { throw .system("queue lost track of its requests") }
                    got = try c.result.get()
                }
            }
        }.get()
        return String(decoding: id.prefix(got), as: UTF8.self)
    }

    // MARK: async convenience (blocks the calling thread at most until the deadlines)

    public func read(at offset: UInt64, count: Int) async throws(VirtioError) -> [UInt8] {
        try readBytes(at: offset, count: count)
    }

    public func write(at offset: UInt64, bytes: [UInt8]) async throws(VirtioError) {
        try writeBytes(at: offset, bytes: bytes)
    }

    public func flush() async throws(VirtioError) { try flushSync() }

    public func identify() async throws(VirtioError) -> String { try identifySync() }
}

/// A pthread mutex around a value. ThreadSanitizer sees pthread locks (it does not see
/// `Synchronization.Mutex`'s futex on Linux), so a race it reports under this is real.
final class Locked<Value>: @unchecked Sendable {
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private var value: Value

    init(_ value: Value) {
        self.value = value
        mutex = .allocate(capacity: 1)
        mutex.initialize(to: pthread_mutex_t())
        pthread_mutex_init(mutex, nil)
    }

    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    func withLock<Result, E: Error>(_ body: (inout Value) throws(E) -> Result) throws(E) -> Result {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body(&value)
    }
}

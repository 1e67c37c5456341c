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
/// let disk = try VirtioBlockDriver.connect(socket: "/tmp/vhost.sock")
/// try disk.write(at: 0, bytes: Array(repeating: 0xab, count: 4096))
/// let back = try await disk.read(at: 0, count: 4096)
/// ```
///
/// Convenience calls (`read`, `write`, `flush`, ...) run on queue 0 under a lock. The hot
/// path is `queue(i)`: one `BlockQueue` per thread with `submit...`/`poll`/`wait`. The
/// first violation or timeout breaks the whole device (R6): every request fails with a
/// `VirtioError` naming the rule; `reconnect()` recovers.
///
/// Ownership: the device owns its queues and a `DriverSupervisor` (failure sink,
/// control-socket watch, reconnect state); each queue holds only the supervisor, so the hot
/// path never calls back into the device. Reconnect with any number of queue threads: the
/// thread that first sees the socket close (or calls `reconnect()`) becomes the owner and
/// runs this device's control-plane part (`runReconnect`) through the supervisor; every
/// queue's private state, ring and bounce pool stay its own driving thread's, which parks
/// until the generation changes, then resets, resubmits and announces its own ring
/// (`BlockQueue.settle`, `announce(queue:)`).
public final class VirtioBlockDriver: ControlPlane, @unchecked Sendable {
    // @unchecked Sendable: the mutable control-plane state (`frontend`, `retiredFrontend`) is
    // used only under `supervisor.link`'s lock or by the reconnect's single owner; the
    // convenience calls and the async engine take `convenienceLock` for queue 0;
    // `asyncEngine` is a Mutex; each other queue belongs to one thread by contract
    // (`queue(_:)`); everything else is immutable after `init`.
    /// What `connect` negotiates and how the driver waits (every field has a safe default).
    public struct Options: Sendable {
        /// Queues wanted (clamped to what the device offers).
        public var queues = 1
        /// Ring size of each queue (a power of two, at least 4).
        public var queueSize = 128
        /// Per-request deadline in seconds (R5).
        public var requestTimeout: Double = 10
        /// Bound on each control-plane operation as a whole: connect plus negotiation and
        /// ring set-up, a reconnect attempt, a close (R5: not per message, so a back-end
        /// that answers each message just in time cannot stretch it).
        public var controlTimeout: Double = 5
        /// Bytes of the sealed bounce pool per queue (raised to twice the largest request if smaller).
        public var bounceBytesPerQueue = 4 << 20
        /// When the back-end goes away: reconnect and resubmit in-flight requests
        /// instead of failing them. Safe with one thread per queue: one thread reconnects,
        /// the others park, then each queue resubmits its own requests.
        public var reconnect = false
        /// How long to keep trying to reconnect.
        public var reconnectTimeout: Double = 10
        /// How `wait` spends the time until a completion: `.adaptive` (default) polls for
        /// a time that adapts, then blocks on the call eventfd; `.poll` never blocks;
        /// `.spin(nanoseconds:)` polls that long; `.interrupts` blocks at once.
        public var wait: WaitStrategy = .adaptive
        /// Not read by the driver (kept for source compatibility): the synchronous queues
        /// and the async calls both follow `wait` (the async I/O thread waits with the
        /// queue's `wait`; awaiting callers' threads poll for the current spin of `wait`,
        /// at most 50 µs, never blocking).
        public var spinIterations = 256
        /// Use packed virtqueues when the back-end offers VIRTIO_F_RING_PACKED.
        public var packedRing = true
        /// Called once with the first failure of the device (rate-limited logging, R6).
        public var onFailure: (@Sendable (VirtioError) -> Void)?
        /// The defaults: one queue of 128, 10 s per request, 5 s per control operation.
        public init() {}
    }

    /// Synthetic addresses announced to the back-end (R7): never our real pointers.
    public static let guestBase: UInt64 = 0x1_0000_0000
    /// Synthetic user address of the shared region announced to the back-end (R7).
    public static let userBase: UInt64 = 0x5a5a_0000_0000

    /// The features we ask for; SET_FEATURES acks only those the back-end offered.
    public static let wantedFeatures: UInt64 =
        FeatureBits.version1 | FeatureBits.protocolFeatures | FeatureBits.ringEventIndex
        | BlockProtocol.Feature.sizeMax | BlockProtocol.Feature.segMax | BlockProtocol.Feature.blockSize
        | BlockProtocol.Feature.flush | BlockProtocol.Feature.readOnly | BlockProtocol.Feature.multiQueue
        | BlockProtocol.Feature.discard | BlockProtocol.Feature.writeZeroes

    /// The back-end's socket path (empty when connected over a channel).
    public let socketPath: String
    /// The options the device was connected with.
    public let options: Options
    /// The validated geometry and features of the disk.
    public let info: BlockInfo
    /// The control connection. Used only under `supervisor.link`'s lock, or by the
    /// reconnection's owner while `link.reconnecting` keeps every other thread off it.
    var frontend: Frontend
    /// The connection before `frontend`, kept open (shut down) so a queue thread that
    /// read its descriptor before a reconnect never polls a reused descriptor number.
    var retiredFrontend: Frontend?
    let region: SharedRegion
    let layout: DriverRegionLayout
    /// Owned here; each holds `supervisor`, never this device.
    var queues: [BlockQueue] = []
    /// Failure sink, control-socket watch and reconnect state, shared with the queues.
    let supervisor: DriverSupervisor
    /// Queue 0's owner: the convenience calls, or the async engine while it has requests
    /// in flight (a class, so the engine holds it without holding the device).
    let convenienceLock = Locked<Int>(0)
    /// The async calls' engine on queue 0, started by the first of them.
    let asyncEngine = Locked<AsyncEngineSlot>(.none)

    /// Connects, negotiates, validates the config and sets up the queues.
    public static func connect(socket path: String, options: Options = Options()) throws(VirtioError)
        -> VirtioBlockDriver
    {
        let frontend: Frontend
        do {
            frontend = try Frontend.connect(
                path: path, replyTimeout: options.controlTimeout, until: .after(seconds: options.controlTimeout))
        } catch {
            throw VirtioError(error, replyTimeoutMilliseconds: UInt64(options.controlTimeout * 1000))
        }
        return try VirtioBlockDriver(path: path, frontend: frontend, options: options)
    }

    /// Uses an already connected channel (a socketpair with an in-process back-end).
    public static func connect(channel: UnixChannel, options: Options = Options()) throws(VirtioError)
        -> VirtioBlockDriver
    {
        let frontend = Frontend(channel: channel, replyTimeout: options.controlTimeout)
        frontend.operationDeadline = .after(seconds: options.controlTimeout)
        return try VirtioBlockDriver(path: "", frontend: frontend, options: options)
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
        let layout = DriverRegionLayout(
            queueCount: info.queueCount, queueSize: options.queueSize, indirectEntries: 0,
            bounceBytesPerQueue: max(options.bounceBytesPerQueue, 2 * info.maxTransfer + 8192))
        self.layout = layout
        let region: SharedRegion
        do {
            region = try SharedRegion(name: "ringfence-blk", size: layout.totalSize)
        } catch {
            throw .system(error.description)
        }
        self.region = region
        var notifiers: [(kick: Notifier, call: Notifier)] = []
        for _ in 0..<info.queueCount {
            do {
                notifiers.append((try Notifier(), try Notifier()))
            } catch {
                throw .system(error.description)
            }
        }
        let supervisor = DriverSupervisor(
            descriptor: frontend.channel.channel.fileDescriptor, wakers: notifiers.map(\.call), options: options)
        self.supervisor = supervisor
        let ringFeatures = RingFeatures(eventIndex: info.features & FeatureBits.ringEventIndex != 0)
        let format: RingFormat = info.features & FeatureBits.ringPacked != 0 ? .packed : .split
        queues = notifiers.indices.map { q in
            let (ring, pool) = layout.makeDriverRing(
                queue: q, region: region, guestBase: Self.guestBase, features: ringFeatures, format: format)
            return BlockQueue(
                index: q, supervisor: supervisor, info: info, options: options, ring: ring, pool: pool,
                kick: notifiers[q].kick, call: notifiers[q].call)
        }
        supervisor.controlPlane = self
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

    /// `ControlPlane`: a queue thread rebuilt its ring after a reconnect; announce it on
    /// the new connection (under the supervisor's lock), one bound for the whole of it (R5).
    func announce(queue index: Int) throws(VirtioError) {
        do throws(VhostUserError) {
            try frontend.bounded(by: .after(seconds: options.controlTimeout)) { () throws(VhostUserError) in
                try attachQueue(queues[index], frontend)
                try frontend.sync()
            }
        } catch {
            throw VirtioError(error, replyTimeoutMilliseconds: UInt64(options.controlTimeout * 1000))
        }
    }

    // MARK: queues and state

    /// Queues in use (what was asked, clamped to what the device offers).
    public var queueCount: Int { queues.count }

    /// Split or packed: packed when VIRTIO_F_RING_PACKED was offered and wanted.
    public var ringFormat: RingFormat { info.features & FeatureBits.ringPacked != 0 ? .packed : .split }

    /// Queue `i` for the hot path (one thread per queue).
    public func queue(_ i: Int) -> BlockQueue { queues[max(0, min(i, queues.count - 1))] }

    /// The sticky failure, if the device is broken.
    public var failure: VirtioError? { supervisor.failure }

    /// True once a violation or timeout broke the device (until `reconnect()`).
    public var isBroken: Bool { supervisor.isBroken }

    // MARK: reconnect (the control plane; queues reach it only through `supervisor`)

    /// Reconnects to the same socket path, renegotiates (the back-end must offer what was
    /// acked before) and re-announces memory; each queue then rebuilds its ring and posts
    /// its unfinished requests again on its own thread's next call. Requests posted to a
    /// device broken by a violation or timeout fail instead. Waits for a reconnect that
    /// another thread owns.
    public func reconnect() throws(VirtioError) {
        guard !socketPath.isEmpty else { throw .disconnected("no socket path to reconnect to") }
        switch supervisor.claimReconnect() {
        case .closed: throw .disconnected("the device is closed")
        case .owner:
            supervisor.wakeQueues()
            try runReconnect()
        case .waiter:
            _ = supervisor.awaitReconnect(until: .distantFuture, notifier: nil)
            if let failure { throw failure }
        }
    }

    /// The owner's part of a reconnect: the control plane only, never a queue's state.
    /// Ends the reconnect (success or failure) before it returns.
    func runReconnect() throws(VirtioError) {
        // While `reconnecting` is set nobody else touches `frontend`.
        let old = supervisor.link.withLock { _ in frontend }
        old.close()
        guard !socketPath.isEmpty else {
            let error = VirtioError.disconnected("no socket path to reconnect to")
            supervisor.endReconnect(failing: error)
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
                supervisor.endReconnect(
                    descriptor: f.channel.channel.fileDescriptor,
                    install: {
                        retiredFrontend = frontend
                        frontend = f
                    },
                    discard: { f.close() })
                return
            } catch {
                lastError = error
                // A malformed back-end is not waited for.
                if error.violationCause != nil {
                    supervisor.endReconnect(failing: error)
                    throw error
                }
            }
            usleep(50_000)
        }
        supervisor.endReconnect(failing: lastError)
        throw lastError
    }

    /// Stops the rings (GET_VRING_BASE) and closes the connection. A reconnect under way
    /// closes what it connects.
    public func close() {
        supervisor.closeOnce { attached in
            if let attached {
                // One bound for the whole close, not one per queue: a silent back-end costs
                // controlTimeout once, and the queues after the first timeout are not asked.
                frontend.bounded(by: .after(seconds: options.controlTimeout)) {
                    for q in attached {
                        do { _ = try frontend.getVringBase(index: q) } catch { break }
                    }
                }
            }
            frontend.close()
        }
        stopAsyncEngine()
    }

    // MARK: convenience (queue 0, serialized)

    /// Largest chunk the convenience calls post per request.
    public static let convenienceChunk = 128 << 10
    static let convenienceDepth = 8

    /// The one place a convenience call's range is cut into requests: `total` bytes in
    /// block-aligned pieces of at most `chunk`, up to `depth` in flight on queue 0. The
    /// caller checked the whole range once; every piece is inside it, aligned, and within
    /// the request limits by construction, so `submit` posts it unchecked.
    func pipeline(
        total: Int, chunk: Int, depth: Int = convenienceDepth,
        submit: (BlockQueue, _ at: Int, _ length: Int, _ tag: UInt64) throws(VirtioError) -> Void
    ) throws(VirtioError) {
        try convenienceLock.withLock { (_: inout Int) throws(VirtioError) in
            let q = queues[0]
            let step = max(info.blockSize, chunk / info.blockSize * info.blockSize)
            var next = 0
            var outstanding = 0
            var firstError: VirtioError?
            while true {
                while next < total && outstanding < depth && firstError == nil {
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

    /// Read and write pieces: the convenience size, never more than one request may carry.
    var transferChunk: Int { min(Self.convenienceChunk, info.maxTransfer) }

    /// Reads `buffer.count` bytes at `offset` (block-aligned).
    public func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(VirtioError) {
        try info.checkRange(offset: offset, length: buffer.count, transferLimit: false)
        try pipeline(total: buffer.count, chunk: transferChunk) { (q, at, length, tag) throws(VirtioError) in
            try q.postRead(
                offset: offset + UInt64(at), into: UnsafeMutableRawBufferPointer(rebasing: buffer[at..<at + length]),
                tag: tag)
        }
    }

    /// Reads `count` bytes at `offset` (block-aligned) into a new array, blocking this thread.
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
        try info.checkRange(offset: offset, length: buffer.count, transferLimit: false)
        try pipeline(total: buffer.count, chunk: transferChunk) { (q, at, length, tag) throws(VirtioError) in
            try q.postWrite(
                offset: offset + UInt64(at), from: UnsafeRawBufferPointer(rebasing: buffer[at..<at + length]), tag: tag)
        }
    }

    /// Writes `bytes` at `offset` (block-aligned), blocking this thread.
    public func write(at offset: UInt64, bytes: [UInt8]) throws(VirtioError) {
        try writeBytes(at: offset, bytes: bytes)
    }

    func writeBytes(at offset: UInt64, bytes: [UInt8]) throws(VirtioError) {
        try bytes.withUnsafeBytes { b in
            Result { () throws(VirtioError) in try write(at: offset, from: b) }
        }.get()
    }

    /// Flushes the device's write cache, blocking this thread.
    public func flush() throws(VirtioError) { try flushSync() }

    func flushSync() throws(VirtioError) {
        try pipeline(total: 1, chunk: 1) { (q, _, _, tag) throws(VirtioError) in try q.submitFlush(tag: tag) }
    }

    /// Discards (or, with `zeroes`, writes zeroes over) `length` bytes at `offset`,
    /// split into requests the device accepts, one at a time.
    public func discard(at offset: UInt64, length: Int, zeroes: Bool = false, unmap: Bool = false) throws(VirtioError) {
        try info.checkRange(offset: offset, length: length, transferLimit: false)
        try info.checkDiscard(zeroes: zeroes)
        let limit = Int(clamping: zeroes ? info.maxWriteZeroesBytes : info.maxDiscardBytes)
        try pipeline(total: length, chunk: limit, depth: 1) { (q, at, n, _) throws(VirtioError) in
            try q.postDiscard(offset: offset + UInt64(at), length: n, zeroes: zeroes, unmap: unmap, tag: 0)
        }
    }

    /// Writes zeroes over `length` bytes at `offset` (WRITE_ZEROES, optionally unmapping).
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
}

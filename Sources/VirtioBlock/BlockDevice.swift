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
        /// instead of failing them. The thread that notices reconnects every queue, so
        /// use it when one thread drives the device (as the CLI does).
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
    var frontend: Frontend
    let region: SharedRegion
    let layout: DriverRegionLayout
    var queues: [BlockQueue] = []
    /// Shared with the queues, which test `failed` on every poll without touching the device.
    let health = DeviceHealth()
    let convenienceLock = Mutex<Int>(0)
    var closed = false

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
            try frontend.setMemTable(
                [
                    MemoryRegionDescription(
                        guestAddress: Self.guestBase, size: UInt64(region.size), userAddress: Self.userBase,
                        mmapOffset: 0)
                ],
                descriptors: [region.fileDescriptor])
            for q in queues {
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
            try frontend.sync()
        } catch {
            throw VirtioError(error, replyTimeoutMilliseconds: UInt64(options.controlTimeout * 1000))
        }
    }

    // MARK: queues and state

    public var queueCount: Int { queues.count }

    /// Split or packed: packed when VIRTIO_F_RING_PACKED was offered and wanted.
    public var ringFormat: RingFormat { info.features & FeatureBits.ringPacked != 0 ? .packed : .split }

    /// Queue `i` for the hot path (one thread per queue).
    public func queue(_ i: Int) -> BlockQueue { queues[max(0, min(i, queues.count - 1))] }

    /// The sticky failure, if the device is broken.
    public var failure: VirtioError? {
        health.current
    }

    public var isBroken: Bool { health.isBroken }

    /// Marks the device broken (first failure wins) and reports it once.
    func fail(_ error: VirtioError) {
        let first = health.failure.withLock { state -> Bool in
            guard state == nil else { return false }
            state = error
            return true
        }
        health.failed.store(true, ordering: .releasing)
        guard first else { return }
        // Wake threads blocked on other queues: they fail their requests now, not at
        // their own deadlines (our own eventfds; the device cannot see this).
        for q in queues { q.callNotifier.signal() }
        options.onFailure?(error)
    }

    var controlDescriptor: Int32 { frontend.channel.channel.fileDescriptor }

    /// The control socket became readable: the back-end closed it (or spoke unasked,
    /// which it never may). With `reconnect`, in-flight requests survive.
    func controlChannelSignalled() {
        var byte: UInt8 = 0
        let n = recv(controlDescriptor, &byte, 1, Int32(MSG_PEEK | MSG_DONTWAIT))
        if n > 0 {
            fail(.deviceViolation(.controlProtocol("unsolicited message on the vhost-user socket")))
            return
        }
        if n < 0 && (errno == EAGAIN || errno == EINTR) { return }
        if options.reconnect {
            do {
                try reconnectAndResubmit()
                return
            } catch {
                fail(error)
                return
            }
        }
        fail(.disconnected("back-end closed the vhost-user socket"))
    }

    /// Reconnects to the same socket path, renegotiates (the back-end must offer what was
    /// acked before), re-announces memory and rings, and resubmits in-flight requests
    /// from the private list. A device broken by a violation drops its requests instead.
    public func reconnect() throws(VirtioError) {
        try reconnectAndResubmit()
    }

    func reconnectAndResubmit() throws(VirtioError) {
        guard !socketPath.isEmpty else { throw .disconnected("no socket path to reconnect to") }
        frontend.close()
        let deadline = Deadline.after(seconds: options.reconnectTimeout)
        var lastError = VirtioError.disconnected("reconnect timed out")
        while !deadline.hasPassed {
            do {
                let f = try Frontend.connect(
                    path: socketPath, replyTimeout: options.controlTimeout,
                    until: min(deadline, .after(seconds: options.controlTimeout)))
                let newInfo = try Self.negotiate(f, options: options)
                guard newInfo.features == info.features, newInfo.queueCount >= queues.count,
                    newInfo.capacityBytes == info.capacityBytes, newInfo.blockSize == info.blockSize
                else {
                    f.close()
                    throw VirtioError.disconnected("back-end came back with a different device")
                }
                frontend = f
                // Rings are rebuilt before the back-end sees them: a back-end that starts
                // on SET_VRING_KICK must never find the old ring's indices.
                let hadViolation =
                    failure.map { if case .disconnected = $0 { return false } else { return true } } ?? false
                for q in queues {
                    if hadViolation { q.discardAll() } else { try q.resubmitAfterReconnect() }
                }
                try attachRings(f)
                f.operationDeadline = .distantFuture
                health.failure.withLock { $0 = nil }
                health.failed.store(false, ordering: .releasing)
                for q in queues { q.kickNotifier.signal() }
                return
            } catch let error as VirtioError {
                lastError = error
                if case .disconnected = error {
                } else if case .system = error {
                } else {
                    // A malformed back-end is not waited for.
                    if error.violationCause != nil { throw error }
                }
            } catch {
                lastError = .system("\(error)")
            }
            usleep(50_000)
        }
        throw lastError
    }

    /// Stops the rings (GET_VRING_BASE) and closes the connection.
    public func close() {
        guard !closed else { return }
        closed = true
        if !isBroken {
            // One bound for the whole close, not one per queue: a silent back-end costs
            // controlTimeout once, and the queues after the first timeout are not asked.
            frontend.bounded(by: .after(seconds: options.controlTimeout)) {
                for q in queues {
                    do { _ = try frontend.getVringBase(index: q.index) } catch { break }
                }
            }
        }
        frontend.close()
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

/// Whether a device is broken, and why: the one piece of device state its queues read on
/// the hot path (a plain load while healthy).
final class DeviceHealth: Sendable {
    let failed = Atomic<Bool>(false)
    let failure = Mutex<VirtioError?>(nil)

    /// One plain load while healthy.
    @inline(__always)
    var isBroken: Bool { failed.load(ordering: .acquiring) }

    /// The sticky failure, if any (the lock is taken only once broken).
    @inline(__always)
    var current: VirtioError? {
        guard isBroken else { return nil }
        return failure.withLock { $0 }
    }
}

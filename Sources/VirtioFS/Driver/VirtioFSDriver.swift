#if canImport(Glibc)
import Glibc
#endif
public import SharedMemory
public import Virtqueue
import VhostUser
import Synchronization

/// A virtio-fs file system behind a vhost-user back-end that is not trusted.
///
/// ```swift
/// let fs = try VirtioFSDriver.connect(socket: "/tmp/vfs.sock")
/// try fs.writeFile("notes.txt", bytes: Array("hello".utf8))
/// let back = try fs.readFile("notes.txt")
/// ```
///
/// FUSE_INIT runs first; every reply passes `FSReply`'s checks on a private copy. Node
/// calls (`lookup`, `open`, `read`, ...) are the FUSE operations; path calls (`stat`,
/// `readFile`, `listDirectory`, ...) walk from the root and forget what they looked up.
/// Calls are thread-safe: each takes a request queue (round robin) under its own lock.
/// The first violation or timeout breaks the driver (R6): every later call fails with it.
public final class VirtioFSDriver: @unchecked Sendable {
    public struct Options: Sendable {
        /// Request queues wanted (clamped to what the device offers).
        public var queues = 1
        public var queueSize = 128
        /// Per-request deadline in seconds (R5).
        public var requestTimeout: Double = 10
        /// Bound on connecting with negotiation and ring set-up, and on closing.
        public var controlTimeout: Double = 5
        public var bounceBytesPerQueue = 4 << 20
        /// The tag to report when the back-end serves no config space (virtiofsd leaves
        /// the tag to the VMM).
        public var tag = "ringfence"
        /// Use packed virtqueues when the back-end offers VIRTIO_F_RING_PACKED.
        public var packedRing = true
        /// Polls of the used ring before blocking on the call eventfd.
        public var spinIterations = 256
        /// Forgets collected before one BATCH_FORGET goes out on the hiprio queue.
        public var forgetBatch = 64
        /// Called once with the first failure (R6).
        public var onFailure: (@Sendable (FSError) -> Void)?
        public init() {}
    }

    /// Synthetic addresses announced to the back-end (R7).
    public static let guestBase: UInt64 = 0x1_0000_0000
    public static let userBase: UInt64 = 0x5a5a_0000_0000
    /// VIRTIO_FS_F_NOTIFICATION is not asked for: no notification queue.
    public static let wantedFeatures: UInt64 =
        FeatureBits.version1 | FeatureBits.protocolFeatures | FeatureBits.ringEventIndex
    /// A directory listing longer than this is an endless one (R5).
    public static let maximumListing = 1 << 20

    public let options: Options
    /// Set once by INIT during `init`, never changed after.
    public private(set) var info: FSInfo
    let frontend: Frontend
    let region: SharedRegion
    let hiprio: Locked<FSQueue>
    let queues: [Locked<FSQueue>]
    let nextQueue = Atomic<Int>(0)
    let nextUnique = Atomic<UInt64>(0)
    let control: Int32

    struct State {
        var failure: FSError?
        var closed = false
        /// File type and lookup count of every nodeid we hold a reference to: a type that
        /// changes is a violation (R3).
        var known: [UInt64: (type: FuseProtocol.FileType, lookups: UInt64)] = [
            FuseProtocol.rootNodeID: (.directory, 1)
        ]
        var pendingForgets: [(nodeID: UInt64, count: UInt64)] = []
    }
    let state = Locked(State())
    /// The I/O thread behind the async calls (started by the first one).
    let asyncEngine = Locked<FSAsyncSlot>(.none)

    public static func connect(socket path: String, options: Options = Options()) throws(FSError) -> VirtioFSDriver {
        let frontend: Frontend
        do {
            frontend = try Frontend.connect(
                path: path, replyTimeout: options.controlTimeout, until: .after(seconds: options.controlTimeout))
        } catch {
            throw FSError(error, replyTimeoutMilliseconds: UInt64(options.controlTimeout * 1000))
        }
        return try VirtioFSDriver(frontend: frontend, options: options)
    }

    /// Uses an already connected channel (a socketpair with an in-process back-end).
    public static func connect(channel: UnixChannel, options: Options = Options()) throws(FSError) -> VirtioFSDriver {
        let frontend = Frontend(channel: channel, replyTimeout: options.controlTimeout)
        frontend.operationDeadline = .after(seconds: options.controlTimeout)
        return try VirtioFSDriver(frontend: frontend, options: options)
    }

    init(frontend: Frontend, options: Options) throws(FSError) {
        self.options = options
        self.frontend = frontend
        guard options.requestTimeout > 0, options.requestTimeout <= 86400, options.controlTimeout > 0,
            options.controlTimeout <= 86400
        else { throw .invalidRequest("timeouts must be in (0, 86400] seconds") }
        guard SplitLayout.isValidQueueSize(options.queueSize), options.queueSize >= 4 else {
            throw .invalidRequest("queue size \(options.queueSize) is not a power of two >= 4")
        }
        let timeoutMs = UInt64(options.controlTimeout * 1000)
        var tag = options.tag
        var requestQueues = 1
        let acked: UInt64
        do {
            try frontend.handshake()
            let backendQueues = frontend.queueCount
            guard backendQueues >= 2 else {
                throw FSError.deviceViolation(
                    .configInvalid(field: "queues", detail: "GET_QUEUE_NUM \(backendQueues) leaves no request queue"))
            }
            if frontend.protocolFeatures.contains(.config) {
                let raw = try frontend.getConfig(size: FSConfig.size)
                do {
                    (tag, requestQueues) = try FSInfo.validateConfig(
                        FSConfig.decode(raw), backendQueues: backendQueues, requestedQueues: max(1, options.queues))
                } catch {
                    throw FSError.deviceViolation(error)
                }
            } else {
                requestQueues = max(1, min(options.queues, backendQueues - 1))
            }
            acked = try frontend.setFeatures(
                options.packedRing ? Self.wantedFeatures | FeatureBits.ringPacked : Self.wantedFeatures)
        } catch let error as VhostUserError {
            throw FSError(error, replyTimeoutMilliseconds: timeoutMs)
        } catch let error as FSError {
            throw error
        } catch {
            throw .system("\(error)")
        }
        let queueCount = requestQueues + 1
        let layout = DriverRegionLayout(
            queueCount: queueCount, queueSize: options.queueSize, indirectEntries: 0,
            bounceBytesPerQueue: max(options.bounceBytesPerQueue, 2 * FSInfo.transferCap + 16384))
        do {
            region = try SharedRegion(name: "ringfence-fs", size: layout.totalSize)
        } catch {
            throw .system(error.description)
        }
        let features = RingFeatures(eventIndex: acked & FeatureBits.ringEventIndex != 0)
        let format: RingFormat = acked & FeatureBits.ringPacked != 0 ? .packed : .split
        var made: [FSQueue] = []
        for q in 0..<queueCount {
            let (ring, pool) = layout.makeDriverRing(
                queue: q, region: region, guestBase: Self.guestBase, features: features, format: format)
            do {
                made.append(
                    FSQueue(
                        index: q, ring: ring, pool: pool, kick: try Notifier(), call: try Notifier(),
                        spinIterations: options.spinIterations))
            } catch {
                throw .system(error.description)
            }
        }
        hiprio = Locked(made[0])
        queues = made.dropFirst().map { Locked($0) }
        control = frontend.channel.channel.fileDescriptor
        do {
            try frontend.setMemTable(
                [
                    MemoryRegionDescription(
                        guestAddress: Self.guestBase, size: UInt64(region.size), userAddress: Self.userBase,
                        mmapOffset: 0)
                ],
                descriptors: [region.fileDescriptor])
            for q in made {
                let r = layout.queues[q.index].ring
                try frontend.setUpQueue(
                    index: q.index, size: options.queueSize,
                    descriptor: Self.userBase + UInt64(r.descriptorOffset),
                    avail: Self.userBase + UInt64(r.availOffset), used: Self.userBase + UInt64(r.usedOffset),
                    kick: q.kick.fileDescriptor, call: q.call.fileDescriptor,
                    base: format == .packed
                        ? PackedLayout.encodeBase(avail: 0, availWrap: true, used: 0, usedWrap: true) : 0)
                try frontend.setQueueEnabled(index: q.index, true)
            }
            try frontend.sync()
        } catch {
            throw FSError(error, replyTimeoutMilliseconds: timeoutMs)
        }
        frontend.operationDeadline = .distantFuture
        // FUSE_INIT before anything else.
        info = FSInfo(
            tag: tag, requestQueues: requestQueues, features: acked, minor: FuseProtocol.minorVersion,
            maxWrite: 4096, maxPages: 1, initFlags: 0)
        var w = FuseWriter(capacity: FuseProtocol.initInSize)
        w.put(FuseProtocol.majorVersion)
        w.put(FuseProtocol.minorVersion)
        w.put(UInt32(FSInfo.transferCap))  // max_readahead
        w.put(FuseProtocol.InitFlag.bigWrites | FuseProtocol.InitFlag.maxPages | FuseProtocol.InitFlag.doReaddirplus)
        w.zeros(FuseProtocol.initInSize - 16)
        let body = try call(.initialize, nodeID: 0, args: w.bytes, replyLimit: FuseProtocol.initOutSize)
        var r = try deviceCheck { () throws(FSViolation) in
            try FSReply.exact(body, FuseProtocol.initOutSize, "INIT")
        }
        let out = FuseInitOut.decode(&r) ?? FuseInitOut()
        let negotiated = try deviceCheck { () throws(FSViolation) in try FSInfo.validateInit(out) }
        info = FSInfo(
            tag: tag, requestQueues: requestQueues, features: acked, minor: negotiated.minor,
            maxWrite: negotiated.maxWrite, maxPages: negotiated.maxPages, initFlags: negotiated.flags)
    }

    deinit { close() }

    /// Sends pending forgets and closes the connection (the back-end stops the rings).
    public func close() {
        let first = state.withLock { s -> Bool in
            defer { s.closed = true }
            return !s.closed
        }
        guard first else { return }
        stopAsyncEngine()
        if failure == nil { try? flushForgets() }
        frontend.close()
    }

    /// The sticky failure, if the driver is broken.
    public var failure: FSError? { state.withLock { $0.failure } }
    public var isBroken: Bool { failure != nil }

    /// Split or packed.
    public var ringFormat: RingFormat { info.features & FeatureBits.ringPacked != 0 ? .packed : .split }

    // MARK: the request path

    /// Records the first failure (R6) and reports it once.
    func fail(_ error: FSError) {
        let first = state.withLock { s -> Bool in
            guard s.failure == nil else { return false }
            s.failure = error
            return true
        }
        if first { options.onFailure?(error) }
    }

    /// Runs a device-side check; a violation breaks the driver.
    func deviceCheck<T>(_ body: () throws(FSViolation) -> T) throws(FSError) -> T {
        do {
            return try body()
        } catch {
            let e = FSError.deviceViolation(error)
            fail(e)
            throw e
        }
    }

    /// One FUSE request on a request queue: header + `args` (+ `data`), a reply of at
    /// most `replyLimit` body bytes. Returns the checked body; an errno answer throws
    /// `.errno`, a violation or timeout breaks the driver.
    func call(
        _ opcode: FuseProtocol.Opcode, nodeID: UInt64, args: [UInt8], data: UnsafeRawBufferPointer? = nil,
        replyLimit: Int
    ) throws(FSError) -> ArraySlice<UInt8> {
        try exchange(opcode, nodeID: nodeID, args: args, data: data, replyLimit: replyLimit, into: nil).body
    }

    /// A request whose reply body goes straight into `destination` (at least `replyLimit`
    /// bytes): only the reply header is copied privately and checked as every reply's
    /// is. Returns the body's length (0 ... `replyLimit`); the destination holds it.
    func call(
        _ opcode: FuseProtocol.Opcode, nodeID: UInt64, args: [UInt8], replyLimit: Int,
        into destination: UnsafeMutableRawBufferPointer
    ) throws(FSError) -> Int {
        precondition(destination.count >= replyLimit)
        return try exchange(opcode, nodeID: nodeID, args: args, data: nil, replyLimit: replyLimit, into: destination)
            .count
    }

    func exchange(
        _ opcode: FuseProtocol.Opcode, nodeID: UInt64, args: [UInt8], data: UnsafeRawBufferPointer?,
        replyLimit: Int, into destination: UnsafeMutableRawBufferPointer?
    ) throws(FSError) -> (body: ArraySlice<UInt8>, count: Int) {
        if let failure { throw failure }
        let unique = nextUnique.add(2, ordering: .relaxed).newValue
        var w = FuseWriter(capacity: FuseProtocol.inHeaderSize + args.count)
        let total = FuseProtocol.inHeaderSize + args.count + (data?.count ?? 0)
        FuseInHeader(
            length: UInt32(truncatingIfNeeded: total), opcode: opcode.rawValue, unique: unique, nodeID: nodeID,
            uid: getuid(), gid: getgid()
        ).encode(into: &w)
        w.append(args)
        let q = queues[nextQueue.add(1, ordering: .relaxed).oldValue % queues.count]
        let capacity = FuseProtocol.outHeaderSize + replyLimit
        let reply: FSQueue.Reply
        do {
            reply = try q.withLock { (queue: inout FSQueue) throws(FSError) in
                try queue.exchange(
                    request: w.bytes, data: data, replyCapacity: capacity,
                    deadline: .after(seconds: options.requestTimeout), control: control,
                    timeoutMilliseconds: UInt64(options.requestTimeout * 1000), dataDestination: destination)
            }
        } catch {
            if error.violationCause != nil || error.rule != nil || isDisconnect(error) { fail(error) }
            throw error
        }
        if destination != nil {
            let error = try deviceCheck { () throws(FSViolation) in
                try FSReply.checkHeader(prefix: reply.bytes, usedLength: reply.usedLength, unique: unique)
            }
            if error != 0 { throw .errno(-error) }
            return ([], Int(reply.usedLength) - FuseProtocol.outHeaderSize)
        }
        let checked = try deviceCheck { () throws(FSViolation) in
            try FSReply.checkHeader(reply.bytes, usedLength: reply.usedLength, unique: unique)
        }
        if checked.error != 0 { throw .errno(-checked.error) }
        return (checked.body, checked.body.count)
    }

    func isDisconnect(_ e: FSError) -> Bool {
        if case .disconnected = e { return true }
        return false
    }

    /// A request without reply on the hiprio queue (FORGET, BATCH_FORGET): the device
    /// must complete it with used length 0.
    func post(_ opcode: FuseProtocol.Opcode, nodeID: UInt64, args: [UInt8]) throws(FSError) {
        if let failure { throw failure }
        let unique = nextUnique.add(2, ordering: .relaxed).newValue
        var w = FuseWriter(capacity: FuseProtocol.inHeaderSize + args.count)
        FuseInHeader(
            length: UInt32(truncatingIfNeeded: FuseProtocol.inHeaderSize + args.count), opcode: opcode.rawValue,
            unique: unique, nodeID: nodeID
        ).encode(into: &w)
        w.append(args)
        let reply: FSQueue.Reply
        do {
            reply = try hiprio.withLock { (queue: inout FSQueue) throws(FSError) in
                try queue.exchange(
                    request: w.bytes, data: nil, replyCapacity: 0, deadline: .after(seconds: options.requestTimeout),
                    control: control, timeoutMilliseconds: UInt64(options.requestTimeout * 1000))
            }
        } catch {
            fail(error)
            throw error
        }
        if reply.usedLength != 0 {
            let e = FSError.deviceViolation(.unexpectedReply(queue: 0, length: reply.usedLength))
            fail(e)
            throw e
        }
    }

    // MARK: node bookkeeping

    /// Records one more lookup reference of `entry` (type checked against what we know).
    func remember(_ entry: FSEntry) throws(FSError) -> FSEntry {
        try note(entry.attributes, addingLookup: true)
        return entry
    }

    /// Checks attributes against the type we know for their nodeid.
    func note(_ a: FileAttributes, addingLookup: Bool) throws(FSError) {
        let violation = state.withLock { s -> FSViolation? in
            if let known = s.known[a.nodeID] {
                guard known.type == a.type else {
                    return .typeChanged(nodeID: a.nodeID, was: known.type.rawValue, now: a.type.rawValue)
                }
                if addingLookup { s.known[a.nodeID] = (known.type, known.lookups &+ 1) }
            } else if addingLookup {
                s.known[a.nodeID] = (a.type, 1)
            }
            return nil
        }
        if let violation { _ = try deviceCheck { () throws(FSViolation) in throw violation } }
    }

    static func checkName(_ name: String) throws(FSError) -> [UInt8] {
        let b = Array(name.utf8)
        guard !b.isEmpty, b.count <= FuseProtocol.maximumNameLength, !b.contains(0x2f), !b.contains(0),
            name != ".", name != ".."
        else { throw .invalidRequest("\(name.debugDescription) is not a file name") }
        return b
    }
}

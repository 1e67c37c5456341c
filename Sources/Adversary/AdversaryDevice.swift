#if canImport(Glibc)
import Glibc
#endif
import Foundation
import SharedMemory
import Synchronization
public import VhostUser
public import VirtioBlock
public import Virtqueue

/// The real blk device (`VirtioBlockDevice`) with one attack switched on. It reaches the
/// transport only through the back-end's hook points, so the attacks run against the same
/// code path `serve-blk` ships (and the same device can be aimed at any driver).
public final class AdversaryDevice: VhostUserDevice, ControlReplyHook, @unchecked Sendable {
    public let inner: VirtioBlockDevice
    public let attack: Attack?
    /// Requests served correctly before the attack starts.
    public let after: Int
    /// Where `leak-probe` writes its dumps (nil: keep them in memory only).
    public let dumpPath: String?
    /// Where to write the ring format the front-end acked ("split" or "packed"), so an
    /// auditor in another process can tell a packed attack that was not applicable.
    public let negotiationPath: String?

    /// What the adversary saw and did (evidence for the report).
    public struct Observations: Sendable {
        public var requests = 0
        public var attacked = 0
        public var configReads = 0
        public var truncateErrno: [Int32] = []
        public var memfdSize: Int64 = -1
        public var notificationsSent = 0
        public var dumps = 0
        /// The ring format of the last SET_FEATURES (nil: features never acked).
        public var negotiatedRing: RingFormat?
        /// `packed-toctou-used-descriptor`: used descriptors rewritten after the driver read them.
        public var rewrittenDescriptors = 0
        public var notes: [String] = []
    }

    struct State {
        var observations = Observations()
        var rings: [Int: VringAddress] = [:]
        var calls: [Int: Int32] = [:]
        var kicks: [Int: Int32] = [:]
        /// Bumped on every disconnect: attack threads of an old connection end.
        var connection = 0
        var memory: GuestMemory?
        var closeConnection: (@Sendable () -> Void)?
        var lastDump = Date.distantPast
        /// Set by `arm(after:)`: replaces `after` (a probe that sets the disk up first).
        var armedAfter: Int?
    }

    /// Starts the attack after `requests` more requests from now on (a probe's set-up done).
    public func arm(after requests: Int = 0) {
        state.withLock { $0.armedAfter = $0.observations.requests + requests }
    }

    let state = Mutex<State>(State())
    /// What the payload lies remember across requests (`PayloadLies.swift`).
    let payload = Mutex<PayloadMemory>(PayloadMemory())
    /// Lives as long as the device: its fd is what `reply-with-fd` attaches.
    let strayNotifier = try? Notifier()

    public init(
        inner: VirtioBlockDevice, attack: Attack?, after: Int? = nil, dumpPath: String? = nil,
        negotiationPath: String? = nil
    ) {
        self.inner = inner
        self.attack = attack
        self.after = after ?? attack?.defaultAfter ?? 0
        self.dumpPath = dumpPath
        self.negotiationPath = negotiationPath
    }

    /// Set by `release()` (the server stops): holds and attack threads end.
    let released = Atomic<Bool>(false)

    deinit {
        state.withLock { s in for fd in Array(s.calls.values) + Array(s.kicks.values) { closeDescriptor(fd) } }
    }

    /// Ends every hold and attack thread (the server is stopping).
    public func release() { released.store(true, ordering: .releasing) }
    var isReleased: Bool { released.load(ordering: .acquiring) }

    /// Sleeps up to `seconds`, less if released or the connection changes.
    func hold(seconds: Double, connection: Int) {
        let end = monotonicNanoseconds() &+ UInt64(seconds * 1e9)
        while monotonicNanoseconds() < end && !isReleased && currentConnection == connection { usleep(10_000) }
    }

    var currentConnection: Int { state.withLock { $0.connection } }

    var behaviour: Behaviour? { attack?.behaviour }

    public var observations: Observations { state.withLock { $0.observations } }

    /// Set by the server for each connection: how `close-mid-io` hangs up.
    public func setConnectionCloser(_ close: (@Sendable () -> Void)?) {
        state.withLock { $0.closeConnection = close }
    }

    func note(_ s: String) { state.withLock { $0.observations.notes.append(s) } }

    // MARK: VhostUserDevice

    /// Format-aware: a packed-ring attack offers VIRTIO_F_RING_PACKED (whatever the inner
    /// device's options), every other attack is written against the split layout and never
    /// offers it.
    public var features: UInt64 {
        let offered =
            attack?.ring == .packed ? inner.features | FeatureBits.ringPacked : inner.features & ~FeatureBits.ringPacked
        switch behaviour {
        case .withoutVersion1?: return offered & ~FeatureBits.version1
        default: return offered
        }
    }

    /// Whether the attack can run on what the driver acked: a packed attack needs the
    /// packed ring (otherwise the device serves honestly and the outcome is "not applicable").
    public var isApplicable: Bool {
        attack?.ring != .packed || observations.negotiatedRing == .packed
    }
    public var protocolFeatures: ProtocolFeatures { inner.protocolFeatures }
    public var queueCount: Int { inner.queueCount }
    public var maximumChainLength: Int { inner.maximumChainLength }

    public func readConfig(offset: UInt32, size: Int) -> [UInt8]? {
        let reads = state.withLock { s in
            s.observations.configReads += 1
            return s.observations.configReads
        }
        guard case .config(let lie)? = behaviour else { return inner.readConfig(offset: offset, size: size) }
        var c = inner.config
        switch lie {
        case .capacity(let v): c.capacity = v
        case .blockSize(let v): c.blockSize = v
        case .segMax(let v): c.segMax = v
        case .numQueues(let v): c.numQueues = v
        case .flapping:
            c.capacity = reads % 2 == 0 ? c.capacity / 2 : c.capacity
            c.blockSize = reads % 2 == 0 ? 4096 : 512
        }
        return c.read(offset: offset, size: size)
    }

    public func writeConfig(offset: UInt32, bytes: [UInt8]) -> Bool { inner.writeConfig(offset: offset, bytes: bytes) }

    public func makeQueueHandler(queue: Int, features: UInt64) -> any QueueHandler {
        let handler = inner.makeQueueHandler(queue: queue, features: features)
        guard let blk = handler as? BlockRequestHandler else { return handler }
        let applicable = attack?.ring != .packed || features & FeatureBits.ringPacked != 0
        if !applicable && queue == 0 {
            note(
                "not applicable: the driver acked the split ring (VIRTIO_F_RING_PACKED not negotiated); served honestly"
            )
        }
        return AdversaryQueueHandler(
            device: self, inner: blk, queue: queue, behaviour: applicable ? attack?.behaviour : nil)
    }

    public func frontendDisconnected() {
        inner.frontendDisconnected()
        state.withLock { s in
            for fd in Array(s.calls.values) + Array(s.kicks.values) { closeDescriptor(fd) }
            s.calls = [:]
            s.kicks = [:]
            s.rings = [:]
            s.connection += 1
        }
    }

    public func controlRequestReceived(_ request: Request, payload: [UInt8], descriptors: [Int32]) {
        switch request {
        case .setVringAddr:
            if let a = try? VringAddress.decode(payload) { state.withLock { $0.rings[Int(a.index)] = a } }
        case .setVringCall, .setVringKick:
            guard let f = try? VringFile.decode(payload), !f.noDescriptor, let fd = descriptors.first else { return }
            let copy = dup(fd)
            let call = request == .setVringCall
            state.withLock { s in
                if let old = call ? s.calls[Int(f.index)] : s.kicks[Int(f.index)] { closeDescriptor(old) }
                if call { s.calls[Int(f.index)] = copy } else { s.kicks[Int(f.index)] = copy }
            }
        case .setProtocolFeatures:
            // `requests-never-read`: the control thread stops reading the socket.
            if case .requestsNeverRead? = behaviour {
                note("stopped reading the control socket after SET_PROTOCOL_FEATURES")
                hold(seconds: 10, connection: currentConnection)
            }
        case .setFeatures:
            guard let acked = try? U64Payload.decode(payload).value else { return }
            let ring: RingFormat = acked & FeatureBits.ringPacked != 0 ? .packed : .split
            state.withLock { $0.observations.negotiatedRing = ring }
            if let negotiationPath {
                _ = FileManager.default.createFile(atPath: negotiationPath, contents: Data("\(ring.rawValue)\n".utf8))
            }
            if case .unofferedFeatures? = behaviour { note("driver acked 0x\(String(acked, radix: 16))") }
        case .setMemTable:
            guard let table = try? MemoryTable.decode(payload), let fd = descriptors.first,
                let region = table.regions.first
            else { return }
            attackMemfd(fd, region: region)
        default: break
        }
    }

    /// `memfd-resize` and `map-beyond-region`: what a device could do to the fd itself.
    func attackMemfd(_ fd: Int32, region: MemoryRegionDescription) {
        switch behaviour {
        case .resizeMemfd?:
            let shrink = ftruncate(fd, 0) == 0 ? 0 : errno
            let grow = ftruncate(fd, off_t(clamping: region.size &* 2)) == 0 ? 0 : errno
            state.withLock { $0.observations.truncateErrno = [shrink, grow] }
            note(
                "ftruncate(0): \(shrink == EPERM ? "EPERM" : "errno \(shrink)"), ftruncate(2x): \(grow == EPERM ? "EPERM" : "errno \(grow)")"
            )
        case .mapBeyondRegion?:
            var st = stat()
            let size: Int64 = fstat(fd, &st) == 0 ? Int64(st.st_size) : -1
            state.withLock { $0.observations.memfdSize = size }
            let end = region.mmapOffset &+ region.size
            // Pages past EOF would SIGBUS *us* on access: only bytes inside the file count.
            let beyond = size > Int64(clamping: end) ? size - Int64(clamping: end) : 0
            note("memfd is \(size) bytes, region ends at \(end): \(beyond) bytes beyond it to map")
        default: break
        }
    }

    // MARK: ControlReplyHook

    public func willSend(_ reply: Message, answering request: Request) -> Message? {
        switch behaviour {
        case .unofferedFeatures? where request == .getFeatures:
            // Bits no driver here implements: ACCESS_PLATFORM, undefined 50-63. (Not the packed
            // ring: our driver implements it, and split attacks are served on split rings only.)
            // A driver that acks any of them is refused by the real back-end.
            let extra = FeatureBits.accessPlatform | 0xfffc_0000_0000_0000
            let offered = (try? U64Payload.decode(reply.payload).value) ?? 0
            return Message(.getFeatures, flags: reply.header.flags, payload: U64Payload(offered | extra).encoded)
        case .reply(let lie, let target)? where target == request:
            var m = reply
            switch lie {
            case .wrongCode:
                m.header.request = request == .getQueueNum ? Request.getFeatures.rawValue : Request.getQueueNum.rawValue
            case .short:
                m.payload = Array(m.payload.dropLast(4))
                m.header.size = UInt32(m.payload.count)
            case .oversized:
                m.payload += [UInt8](repeating: 0, count: 8)
                m.header.size = UInt32(m.payload.count)
            case .hugeSize: m.header.size = 0xff_ffff
            case .withDescriptor:
                if let n = strayNotifier { m.descriptors.append(n.fileDescriptor) }
            case .withPipe:
                if let fd = strayPipeWriteEnd { m.descriptors.append(fd) }
            case .withMemfd:
                if let region = strayMemfd { m.descriptors.append(region.fileDescriptor) }
            case .nack: m.payload = U64Payload(1).encoded
            case .never: return nil
            }
            return m
        case .requestsNeverRead? where request == .getProtocolFeatures:
            let offered = ProtocolFeatures(rawValue: (try? U64Payload.decode(reply.payload).value) ?? 0)
            return Message(
                .getProtocolFeatures, flags: reply.header.flags,
                payload: U64Payload(offered.subtracting(.replyAck).rawValue).encoded)
        case .repliesJustInTime(let seconds)?:
            hold(seconds: seconds, connection: currentConnection)
            return reply
        default:
            return reply
        }
    }

    /// `reply-with-pipe`: a pipe's write end whose reader is closed (a write raises SIGPIPE).
    let strayPipeWriteEnd: Int32? = {
        var p: [Int32] = [-1, -1]
        guard pipe(&p) == 0 else { return nil }
        _ = fcntl(p[1], F_SETFD, FD_CLOEXEC)
        close(p[0])
        return p[1]
    }()
    /// `reply-with-memfd`: unsealed, always readable.
    let strayMemfd = try? SharedRegion(name: "stray", size: 4096)

    // MARK: shared memory, for the leak probe

    /// A copy of every byte the driver shares with this device, taken now.
    public func snapshotSharedMemory() -> [UInt8] {
        guard let memory = state.withLock({ $0.memory }) else { return [] }
        var bytes: [UInt8] = []
        for r in memory.regions { bytes += Array(UnsafeRawBufferPointer(r.mapping.bytes)) }
        return bytes
    }

    func remember(_ memory: GuestMemory) {
        state.withLock { $0.memory = memory }
    }

    /// Writes a dump to `dumpPath` at most every 2 s (guest memory is large).
    func dumpIfDue() {
        let due = state.withLock { s -> Bool in
            guard Date().timeIntervalSince(s.lastDump) >= 2 else { return false }
            s.lastDump = Date()
            s.observations.dumps += 1
            return true
        }
        guard due, let dumpPath, let memory = state.withLock({ $0.memory }) else { return }
        // Straight from the mapping to the file: a guest's RAM is hundreds of MiB.
        let fd = open(dumpPath, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { return }
        defer { close(fd) }
        for r in memory.regions {
            let bytes = UnsafeRawBufferPointer(r.mapping.bytes)
            var done = 0
            while done < bytes.count, let base = bytes.baseAddress {
                let n = write(fd, base + done, bytes.count - done)
                if n <= 0 { return }
                done += n
            }
        }
    }

    func callFD(_ queue: Int) -> Int32? { state.withLock { $0.calls[queue] } }
    func kickFD(_ queue: Int) -> Int32? { state.withLock { $0.kicks[queue] } }
    func ring(_ queue: Int) -> VringAddress? { state.withLock { $0.rings[queue] } }

    /// Counts a request; true when this one is attacked.
    func takeRequest() -> Bool {
        state.withLock { s in
            s.observations.requests += 1
            let attacked = s.observations.requests > (s.armedAfter ?? after)
            if attacked { s.observations.attacked += 1 }
            return attacked
        }
    }

    func closeConnection() {
        let close = state.withLock { $0.closeConnection }
        close?()
    }
}

/// A raw range of the mapped shared memory, handed to a racing thread. The mapping stays
/// alive because the box also holds the `GuestMemory` that owns it.
struct RaceTarget: @unchecked Sendable {
    let memory: GuestMemory
    let bytes: UnsafeMutableRawBufferPointer
}

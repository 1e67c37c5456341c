#if canImport(Glibc)
import Glibc
#endif
public import SharedMemory
import Synchronization
import Virtqueue

/// The vhost-user back-end (device side): listens on a Unix socket, serves one front-end
/// at a time, and keeps listening after it leaves or crashes.
///
/// The front-end is not trusted (docs/design.md §1, the vhost discipline): every message is
/// size-checked before its body is read, decoded with its exact size, checked against the
/// descriptor rules (every descriptor not kept is closed), and its values validated
/// before use. A request that is well-formed but refused is answered with a failure when
/// the front-end asked for REPLY_ACK, and otherwise drops the connection (the front-end
/// would go on believing it succeeded). A malformed message drops the connection.
/// Device semantics live behind `VhostUserDevice`.
public final class Backend: Sendable {
    public struct Configuration: Sendable {
        /// Time allowed for the rest of a message once its first byte arrived (R5).
        public var messageDeadline: Double = 5
        /// A front-end that connects and says nothing would hold the one serving slot
        /// forever: it is dropped if its first message does not start within this (R5).
        public var firstMessageDeadline: Double = 10
        /// How often the idle loops look at the stop flag.
        public var pollInterval: Double = 0.2
        /// Largest ring accepted (SET_VRING_NUM).
        public var maximumQueueSize: Int = SplitLayout.maximumQueueSize
        public var queueTiming = QueueTiming()

        public init() {}
    }

    public let device: any VhostUserDevice
    public let configuration: Configuration
    let report: @Sendable (BackendEvent) -> Void
    let replyHook: (any ControlReplyHook)?
    private let stopping = Atomic<Bool>(false)
    private let connections = Atomic<Int>(0)
    let refusalCount = Atomic<UInt64>(0)

    /// Control messages refused so far, over all connections (logged rate-limited).
    public var refusals: UInt64 { refusalCount.load(ordering: .relaxed) }

    /// - Parameters:
    ///   - onEvent: called (from any thread) for connections, refusals and queue failures.
    ///   - replyHook: lets an adversary tamper with control replies; nil in production.
    public init(
        device: any VhostUserDevice, configuration: Configuration = Configuration(),
        replyHook: (any ControlReplyHook)? = nil,
        onEvent: @escaping @Sendable (BackendEvent) -> Void = { _ in }
    ) {
        self.device = device
        self.configuration = configuration
        self.replyHook = replyHook
        self.report = onEvent
    }

    /// Asks `run` and `serve` to return (within `pollInterval`).
    public func stop() { stopping.store(true, ordering: .releasing) }

    public var isStopping: Bool { stopping.load(ordering: .acquiring) }

    /// Listens at `socketPath` and serves front-ends one after another until `stop()`.
    /// The socket file is removed on return.
    public func run(socketPath: String) throws(UnixChannel.Error) {
        let listener = try UnixListener(path: socketPath)
        try run(listener: listener)
    }

    /// The same on a listener the caller created (so a test knows it is listening).
    public func run(listener: UnixListener) throws(UnixChannel.Error) {
        report(.listening(path: listener.path))
        while !isStopping {
            let channel: UnixChannel
            do {
                channel = try listener.accept(until: .after(seconds: configuration.pollInterval))
            } catch .timedOut {
                continue
            }
            _ = serve(channel)
        }
    }

    /// Serves one connected front-end until it leaves, breaks the protocol, or `stop()`.
    /// Returns why the connection ended (nil for an orderly close or a stop).
    @discardableResult
    public func serve(_ channel: UnixChannel) -> VhostUserError? {
        let number = connections.add(1, ordering: .relaxed).newValue
        report(.connected(connection: number))
        let session = BackendSession(backend: self, connection: number)
        // Every send and receive on the channel is non-blocking per call (MSG_DONTWAIT,
        // then poll with the deadline): a front-end that stops reading, or never finishes
        // a message, cannot block the session past a deadline (R5), whatever the
        // socket's own mode, so it is left as accepted (two fcntl calls fewer).
        let reason = session.run(MessageChannel(channel))
        session.tearDown()
        channel.shutdown()
        report(.disconnected(connection: number, reason: reason))
        return reason
    }

    /// Serves the messages already queued on `channel` as one session, then returns as
    /// if the front-end had closed, leaving the channel open. The fuzzer runs one session
    /// per input this way over a single connection (a socket pair per input cost more
    /// than the session itself). Every check is `serve`'s; only the ends differ: a
    /// channel with nothing left to read, or `messageLimit` messages handled, ends the
    /// session (nil; what is left stays queued), and a message cut short times out at
    /// once instead of after `messageDeadline`.
    package func serveQueued(_ channel: UnixChannel, messageLimit: Int = .max) -> VhostUserError? {
        let number = connections.add(1, ordering: .relaxed).newValue
        report(.connected(connection: number))
        let session = BackendSession(backend: self, connection: number)
        let reason = session.run(MessageChannel(channel), untilDrained: true, messageLimit: messageLimit)
        session.tearDown()
        report(.disconnected(connection: number, reason: reason))
        return reason
    }
}

/// Why a request was not carried out.
enum Refusal: Error, CustomStringConvertible {
    /// Well-formed but not acceptable: answered with a failure under REPLY_ACK, otherwise
    /// the connection is dropped.
    case refused(String)
    /// Malformed: the connection is dropped.
    case malformed(VhostUserError)

    var description: String {
        switch self {
        case .refused(let why): return why
        case .malformed(let e): return e.description
        }
    }
}

/// State of one vring, as the control messages set it.
final class Vring {
    var size: Int?
    /// SET_VRING_BASE as received: the avail index (split), or with wrap counters (packed).
    var base: UInt32 = 0
    var address: VringAddress?
    var kickReceived = false
    var kick: Notifier?
    let call = CallSlot()
    var err: Notifier?
    var enabled = false
    var worker: QueueWorker?
}

/// One connection's state. Lives on the control thread only.
final class BackendSession {
    unowned let backend: Backend
    let connection: Int
    var device: any VhostUserDevice { backend.device }
    var ackedFeatures: UInt64 = 0
    var ackedProtocol = ProtocolFeatures()
    var memory = GuestMemory()
    var vrings: [Vring]
    /// Refusals are logged rate-limited: a front-end looping on an invalid message with
    /// NEED_REPLY must not grow the log without bound (R6). `Backend.refusals` counts all.
    var refusalLog = LogThrottle()

    /// Protocol features the transport implements; the device may add `.config`.
    static let transportProtocolFeatures: ProtocolFeatures = [
        .multiQueue, .replyAck, .configureMemSlots, .resetDevice,
    ]

    init(backend: Backend, connection: Int) {
        self.backend = backend
        self.connection = connection
        let count = max(0, min(backend.device.queueCount, 256))
        vrings = (0..<count).map { _ in Vring() }
    }

    var offeredFeatures: UInt64 { device.features | FeatureBits.protocolFeatures }
    var offeredProtocol: ProtocolFeatures {
        Self.transportProtocolFeatures.union(device.protocolFeatures)
    }

    /// Runs the session until the front-end leaves or breaks the protocol. With
    /// `untilDrained` (see `Backend.serveQueued`) it waits for nothing: an empty channel
    /// or `messageLimit` handled messages end it, and a message must already be whole.
    func run(_ channel: MessageChannel, untilDrained: Bool = false, messageLimit: Int = .max) -> VhostUserError? {
        let config = backend.configuration
        let firstMessage = Deadline.after(seconds: config.firstMessageDeadline)
        var spoken = false
        var handled = 0
        while !backend.isStopping && handled < messageLimit {
            do {
                try channel.channel.waitReadable(until: untilDrained ? .now : .after(seconds: config.pollInterval))
                spoken = true
            } catch .timedOut {
                if untilDrained { return nil }
                if !spoken && firstMessage.hasPassed {
                    backend.report(
                        .rejected(
                            connection: connection, request: 0,
                            reason: "no message within \(config.firstMessageDeadline) s"))
                    return .channel(.timedOut)
                }
                continue
            } catch {
                return .channel(error)
            }
            let message: Message
            do {
                message = try channel.receive(
                    until: untilDrained ? .now : .after(seconds: config.messageDeadline),
                    maxDescriptors: MemoryTable.maximumRegions)
            } catch .channel(.closed) {
                return nil
            } catch {
                reportRefusal(0, error.description)
                return error
            }
            if let error = handle(message, on: channel) { return error }
            handled += 1
        }
        return nil
    }

    /// Handles one message; returns an error when the connection must be dropped.
    func handle(_ message: Message, on channel: MessageChannel) -> VhostUserError? {
        var fds = message.descriptors
        defer { for fd in fds where fd >= 0 { closeDescriptor(fd) } }
        let code = message.header.request
        backend.report(
            .message(connection: connection, request: code, size: message.header.size, descriptors: fds.count))
        guard let request = Request(rawValue: code) else {
            return refuse(code, needsReply: message.header.needsReply, "unknown request", channel)
        }
        guard !message.header.isReply else {
            let e = VhostUserError.replyFlag(request: code, flags: message.header.flags)
            reportRefusal(code, e.description)
            return e
        }
        device.controlRequestReceived(request, payload: message.payload, descriptors: fds)
        let reply: [UInt8]?
        do throws(Refusal) {
            reply = try perform(request, message.payload, &fds)
        } catch {
            switch error {
            case .malformed(let e):
                reportRefusal(code, e.description)
                return e
            case .refused(let why):
                if Self.hasOwnReply(request) {
                    reportRefusal(code, why)
                    return .invalidPayload("\(request) refused: \(why)")
                }
                return refuse(code, needsReply: message.header.needsReply, why, channel)
            }
        }
        if let reply {
            return send(
                Message(request, flags: HeaderFlags.version | HeaderFlags.reply, payload: reply), for: request, channel)
        }
        if message.header.needsReply && ackedProtocol.contains(.replyAck) {
            return send(ack(request, 0), for: request, channel)
        }
        return nil
    }

    /// Reports a refusal: the first few of a connection, then only the 2^k-th, each with
    /// its running count.
    func reportRefusal(_ request: UInt32, _ reason: String) {
        backend.refusalCount.add(1, ordering: .relaxed)
        guard refusalLog.admit() else { return }
        let n = refusalLog.count
        let suffix = n > LogThrottle.burst ? " (refusal \(n) on this connection; the ones between are not logged)" : ""
        backend.report(.rejected(connection: connection, request: request, reason: reason + suffix))
    }

    /// A refusal: honest failure under REPLY_ACK, otherwise drop the connection.
    private func refuse(_ code: UInt32, needsReply: Bool, _ why: String, _ channel: MessageChannel)
        -> VhostUserError?
    {
        reportRefusal(code, why)
        guard needsReply, ackedProtocol.contains(.replyAck) else {
            return Request(rawValue: code) == nil ? .unknownRequest(code) : .invalidPayload(why)
        }
        var w = PayloadWriter()
        w.write(UInt64(1))
        let reply = Message(
            header: MessageHeader(request: code, flags: HeaderFlags.version | HeaderFlags.reply, size: 8),
            payload: w.bytes)
        do { try channel.send(reply, until: replyDeadline) } catch { return error }
        return nil
    }

    private var replyDeadline: Deadline { .after(seconds: backend.configuration.messageDeadline) }

    private func ack(_ request: Request, _ status: UInt64) -> Message {
        Message(request, flags: HeaderFlags.version | HeaderFlags.reply, payload: U64Payload(status).encoded)
    }

    private func send(_ reply: Message, for request: Request, _ channel: MessageChannel) -> VhostUserError? {
        var outgoing: Message? = reply
        if let hook = backend.replyHook { outgoing = hook.willSend(reply, answering: request) }
        guard let outgoing else { return nil }
        do { try channel.send(outgoing, until: replyDeadline) } catch { return error }
        return nil
    }

    /// Requests whose reply is their payload (REPLY_ACK does not apply to them).
    static func hasOwnReply(_ r: Request) -> Bool {
        switch r {
        case .getFeatures, .getProtocolFeatures, .getQueueNum, .getVringBase, .getConfig,
            .getMaxMemSlots, .getInflightFD, .getStatus:
            return true
        default: return false
        }
    }

    // MARK: requests

    /// Carries out one request. Returns the reply payload for requests that have one.
    /// Descriptors it keeps are taken out of `fds` (set to -1); the caller closes the rest.
    func perform(_ request: Request, _ payload: [UInt8], _ fds: inout [Int32]) throws(Refusal) -> [UInt8]? {
        try checkDescriptorCount(request, payload, fds.count)
        switch request {
        case .getFeatures:
            try expectEmpty(payload)
            return U64Payload(offeredFeatures).encoded
        case .setFeatures:
            let value = try decode(U64Payload.self, payload).value
            guard value & ~offeredFeatures == 0 else {
                throw .refused("features 0x\(String(value & ~offeredFeatures, radix: 16)) were not offered")
            }
            ackedFeatures = value
            backend.report(.featuresAcked(connection: connection, features: value))
            return nil
        case .setOwner:
            try expectEmpty(payload)
            return nil
        case .resetOwner, .resetDevice:
            try expectEmpty(payload)
            resetRings()
            return nil
        case .getProtocolFeatures:
            try expectEmpty(payload)
            return U64Payload(offeredProtocol.rawValue).encoded
        case .setProtocolFeatures:
            let value = ProtocolFeatures(rawValue: try decode(U64Payload.self, payload).value)
            guard offeredProtocol.isSuperset(of: value) else {
                throw .refused(
                    "protocol features 0x\(String(value.subtracting(offeredProtocol).rawValue, radix: 16)) were not offered"
                )
            }
            ackedProtocol = value
            return nil
        case .getQueueNum:
            try expectEmpty(payload)
            return U64Payload(UInt64(vrings.count)).encoded
        case .getMaxMemSlots:
            try expectEmpty(payload)
            return U64Payload(UInt64(GuestMemory.maximumRegions)).encoded
        case .setMemTable:
            let table = try decode(MemoryTable.self, payload)
            var regions: [GuestRegion] = []
            for (i, r) in table.regions.enumerated() {
                regions.append(try map(r, fd: take(&fds, i)))
            }
            let new: GuestMemory
            do { new = try GuestMemory(regions) } catch { throw .refused(error.description) }
            replaceMemory(with: new)
            return nil
        case .addMemReg:
            let r = try decode(SingleMemoryRegion.self, payload).region
            let region = try map(r, fd: take(&fds, 0))
            var new = memory
            do { try new.add(region) } catch { throw .refused(error.description) }
            replaceMemory(with: new)
            return nil
        case .remMemReg:
            let r = try decode(SingleMemoryRegion.self, payload).region
            var new = memory
            guard new.remove(guestAddress: r.guestAddress, size: r.size) else {
                throw .refused("no region 0x\(String(r.guestAddress, radix: 16))+\(r.size) to remove")
            }
            replaceMemory(with: new)
            return nil
        case .setVringNum:
            let s = try decode(VringState.self, payload)
            let ring = try vring(s.index, stopped: true)
            let n = Int(s.num)
            let validSize = packed ? PackedLayout.isValidQueueSize(n) : SplitLayout.isValidQueueSize(n)
            guard validSize, n <= backend.configuration.maximumQueueSize else {
                throw .refused(
                    "queue size \(s.num) is not a power of two in 1...\(backend.configuration.maximumQueueSize)")
            }
            ring.size = n
            return nil
        case .setVringBase:
            let s = try decode(VringState.self, payload)
            let ring = try vring(s.index, stopped: true)
            guard packed || s.num <= UInt32(UInt16.max) else {
                throw .refused("vring base \(s.num) does not fit a split ring index")
            }
            ring.base = s.num
            return nil
        case .setVringAddr:
            let a = try decode(VringAddress.self, payload)
            let ring = try vring(a.index, stopped: true)
            guard a.flags == 0 else {
                throw .refused("vring flags 0x\(String(a.flags, radix: 16)) (logging) not supported")
            }
            guard let size = ring.size else { throw .refused("SET_VRING_ADDR before SET_VRING_NUM") }
            // Validate now (inside mapped memory, aligned), so the front-end hears about it.
            _ = try makeQueue(address: a, size: size, base: ring.base)
            ring.address = a
            return nil
        case .getVringBase:
            let s = try decode(VringState.self, payload)
            let ring = try vring(s.index, stopped: false)
            stopWorker(Int(s.index))
            ring.kick = nil
            ring.kickReceived = false
            return VringState(index: s.index, num: ring.base).encoded
        case .setVringKick:
            let f = try decode(VringFile.self, payload)
            let ring = try vring(UInt32(f.index), stopped: false)
            let notifier = f.noDescriptor ? nil : try adopt(take(&fds, 0))
            stopWorker(Int(f.index))
            ring.kick = notifier
            ring.kickReceived = true
            // Without protocol features a ring is enabled as soon as it is kicked.
            if ackedFeatures & FeatureBits.protocolFeatures == 0 { ring.enabled = true }
            try startIfReady(Int(f.index))
            return nil
        case .setVringCall:
            let f = try decode(VringFile.self, payload)
            let ring = try vring(UInt32(f.index), stopped: false)
            ring.call.replace(with: f.noDescriptor ? nil : try adopt(take(&fds, 0)))
            return nil
        case .setVringErr:
            let f = try decode(VringFile.self, payload)
            let ring = try vring(UInt32(f.index), stopped: false)
            ring.err = f.noDescriptor ? nil : try adopt(take(&fds, 0))
            return nil
        case .setVringEnable:
            let s = try decode(VringState.self, payload)
            let ring = try vring(s.index, stopped: false)
            guard s.num <= 1 else { throw .refused("SET_VRING_ENABLE with \(s.num)") }
            ring.enabled = s.num == 1
            if ring.enabled { try startIfReady(Int(s.index)) } else { stopWorker(Int(s.index)) }
            return nil
        case .getConfig:
            let c = try decode(ConfigSpace.self, payload)
            guard !c.payload.isEmpty else { throw .refused("GET_CONFIG of 0 bytes") }
            guard let bytes = device.readConfig(offset: c.offset, size: c.payload.count) else {
                throw .refused("config read \(c.offset)+\(c.payload.count) refused by the device")
            }
            return ConfigSpace(offset: c.offset, flags: c.flags, payload: bytes).encoded
        case .setConfig:
            let c = try decode(ConfigSpace.self, payload)
            guard device.writeConfig(offset: c.offset, bytes: c.payload) else {
                throw .refused("config write \(c.offset)+\(c.payload.count) refused by the device")
            }
            return nil
        case .setLogBase, .setLogFD, .sendRARP, .netSetMTU, .setBackendReqFD, .iotlbMessage,
            .setVringEndian, .getInflightFD, .setInflightFD, .vringKick, .setStatus, .getStatus:
            throw .refused("\(request) was not negotiated")
        }
    }

    // MARK: helpers

    private func checkDescriptorCount(_ request: Request, _ payload: [UInt8], _ count: Int) throws(Refusal) {
        let expected: Int
        switch MessageRules.descriptors(request) {
        case .none:
            // QEMU attaches the region's fd to REM_MEM_REG, libvhost-user insists on it:
            // accept one and close it.
            if request == .remMemReg && count <= 1 { return }
            expected = 0
        case .one: expected = 1
        case .vringFile:
            let f = try decode(VringFile.self, payload)
            expected = f.noDescriptor ? 0 : 1
        case .perRegion:
            expected = try decode(MemoryTable.self, payload).regions.count
        }
        guard count == expected else {
            throw .malformed(.descriptorCount(request: request, expected: "\(expected)", got: count))
        }
    }

    private func decode<T: WirePayload>(_: T.Type, _ payload: [UInt8]) throws(Refusal) -> T {
        do { return try T.decode(payload) } catch { throw .malformed(error) }
    }

    /// Requests without a body: 0 bytes, or the 8 zero bytes some front-ends send.
    private func expectEmpty(_ payload: [UInt8]) throws(Refusal) {
        guard payload.isEmpty || payload.count == 8 else {
            throw .malformed(.payloadSize(expected: 0, got: payload.count))
        }
    }

    /// Takes the `i`th descriptor out of the message: from here on it has one owner.
    private func take(_ fds: inout [Int32], _ i: Int) throws(Refusal) -> OwnedDescriptor {
        guard i < fds.count, fds[i] >= 0 else {
            throw .malformed(.descriptorCount(request: .setMemTable, expected: "\(i + 1)", got: fds.count))
        }
        let fd = fds[i]
        fds[i] = -1
        return OwnedDescriptor(fd)
    }

    /// Kick, call and err must be eventfds: a pipe or regular file that is always
    /// readable would turn the queue thread into a busy loop (R5).
    private func adopt(_ fd: consuming OwnedDescriptor) throws(Refusal) -> Notifier {
        do { return try Notifier(adopting: fd) } catch { throw .refused(error.description) }
    }

    /// Maps exactly the announced range, after the seal and size checks in `SharedRegion`.
    private func map(_ r: MemoryRegionDescription, fd: consuming OwnedDescriptor) throws(Refusal) -> GuestRegion {
        let mapping: SharedRegion
        do {
            mapping = try SharedRegion(mapping: fd, offset: r.mmapOffset, size: r.size)
        } catch {
            throw .refused("region 0x\(String(r.guestAddress, radix: 16))+\(r.size): \(error)")
        }
        return GuestRegion(guestAddress: r.guestAddress, userAddress: r.userAddress, mapping: mapping)
    }

    private func vring(_ index: UInt32, stopped: Bool) throws(Refusal) -> Vring {
        guard index < UInt32(vrings.count) else {
            throw .refused("queue index \(index) (device has \(vrings.count))")
        }
        let ring = vrings[Int(index)]
        if stopped && ring.worker != nil { throw .refused("queue \(index) is running") }
        return ring
    }

    /// VIRTIO_F_RING_PACKED acked: rings are packed (desc = ring, avail = driver area,
    /// used = device area; the base carries the wrap counters).
    var packed: Bool { ackedFeatures & FeatureBits.ringPacked != 0 }

    private func makeQueue(address a: VringAddress, size: Int, base: UInt32) throws(Refusal) -> any DeviceRing {
        let features = RingFeatures(
            eventIndex: ackedFeatures & FeatureBits.ringEventIndex != 0,
            indirectDescriptors: ackedFeatures & FeatureBits.ringIndirectDescriptors != 0)
        do {
            if packed {
                return try PackedDeviceQueue(
                    queueSize: size, userRingAddress: a.descriptor, userDriverAreaAddress: a.avail,
                    userDeviceAreaAddress: a.used, features: features, memory: memory, base: base,
                    indirectLimit: device.maximumChainLength)
            }
            return try DeviceQueue(
                queueSize: size, userDescriptorAddress: a.descriptor, userAvailAddress: a.avail,
                userUsedAddress: a.used, features: features, memory: memory,
                startIndex: UInt16(truncatingIfNeeded: base),
                indirectLimit: device.maximumChainLength)
        } catch {
            throw .refused("ring \(a.index): \(error)")
        }
    }

    /// Starts the ring's thread once it has memory, size, addresses, a kick and is enabled.
    private func startIfReady(_ index: Int) throws(Refusal) {
        let ring = vrings[index]
        guard ring.worker == nil, ring.enabled, ring.kickReceived, let size = ring.size,
            let address = ring.address
        else { return }
        let queue = try makeQueue(address: address, size: size, base: ring.base)
        let handler = device.makeQueueHandler(queue: index, features: ackedFeatures)
        do {
            let worker = try QueueWorker(
                index: index, queue: queue, memory: memory, handler: handler, kick: ring.kick,
                call: ring.call, err: ring.err, timing: backend.configuration.queueTiming,
                report: backend.report)
            try worker.start()
            ring.worker = worker
        } catch {
            throw .refused("queue \(index): \(error)")
        }
        backend.report(.queueStarted(queue: index, size: size))
    }

    private func stopWorker(_ index: Int) {
        let ring = vrings[index]
        guard let worker = ring.worker else { return }
        ring.base = worker.stop()
        ring.worker = nil
        backend.report(.queueStopped(queue: index, index: UInt16(truncatingIfNeeded: ring.base)))
    }

    /// Rings point into memory: stop them, swap the table, restart them on the new one.
    /// The table change itself succeeds (it is what the front-end asked for); a ring
    /// whose memory went away stays stopped, reported and signalled on its err fd (R6),
    /// and the other rings go on.
    private func replaceMemory(with new: GuestMemory) {
        let running = vrings.indices.filter { vrings[$0].worker != nil }
        for i in running { stopWorker(i) }
        memory = new
        for i in running {
            do throws(Refusal) { try startIfReady(i) } catch {
                backend.report(.queueNotRestarted(queue: i, reason: error.description))
                vrings[i].err?.signal()
            }
        }
    }

    private func resetRings() {
        for i in vrings.indices { stopWorker(i) }
        vrings = vrings.map { _ in Vring() }
        ackedFeatures = 0
    }

    func tearDown() {
        for i in vrings.indices { stopWorker(i) }
        vrings = []
        memory = GuestMemory()
        device.frontendDisconnected()
    }
}

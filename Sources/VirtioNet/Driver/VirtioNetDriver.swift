#if canImport(Glibc)
import Glibc
#endif
public import SharedMemory
public import Virtqueue
import VhostUser
import Synchronization

/// A virtio-net device behind a vhost-user back-end that is not trusted.
///
/// ```swift
/// let net = try VirtioNetDriver.connect(socket: "/tmp/net.sock")
/// let pair = net.pair(0)
/// let batch = NetFrameBatch(capacity: 32, frameCapacity: net.info.maximumFrame)
/// batch.append(frame)
/// _ = try pair.transmit(batch)
/// ```
///
/// The hot path is `pair(i)`: one `NetQueuePair` per thread, with batch `transmit` /
/// `receive`. The control queue (when negotiated) is used under a lock, each command
/// with a deadline (R5) and only the ack OK counts as success. The first violation or
/// timeout breaks the whole device (R6). There is no reconnect: a new driver connects.
public final class VirtioNetDriver: @unchecked Sendable {
    public struct Options: Sendable {
        /// Queue pairs wanted, 1...16 (clamped to what the device offers: GET_QUEUE_NUM
        /// and max_virtqueue_pairs; more than 1 needs VIRTIO_NET_F_MQ).
        public var queuePairs = 1
        public var queueSize = 256
        /// Deadline of each vhost-user control-plane operation (connect with negotiation
        /// and ring set-up, close) as a whole.
        public var controlTimeout: Double = 5
        /// Deadline of each control-queue command (R5: a device that never acks breaks).
        public var commandTimeout: Double = 1
        /// Use mergeable receive buffers when offered (2 KiB buffers, frames merged).
        public var mergeableRxBuffers = true
        /// Give the control queue to the back-end when it offers CTRL_VQ. Off for a
        /// vhost-user back-end such as DPDK's, which offers CTRL_VQ but leaves that queue to
        /// QEMU: then no control queue is set up with it; with `queuePairs` > 1 and MQ
        /// offered, CTRL_VQ and MQ are acked and the control queue stays private to this
        /// driver (as QEMU keeps it), the pairs switched on with SET_VRING_ENABLE.
        public var controlQueue = true
        /// Accept NEEDS_CSUM frames (VIRTIO_NET_F_GUEST_CSUM): csum_start/offset are checked.
        public var partialChecksum = false
        /// Use packed virtqueues when the back-end offers VIRTIO_F_RING_PACKED.
        public var packedRing = true
        /// In `listen(socket:)`: seconds to wait for the back-end to connect (R5).
        public var acceptTimeout: Double = 30
        /// Called once with the first failure of the device (R6).
        public var onFailure: (@Sendable (NetError) -> Void)?
        public init() {}
    }

    /// Synthetic addresses announced to the back-end (R7): never our real pointers.
    public static let guestBase: UInt64 = 0x1_0000_0000
    public static let userBase: UInt64 = 0x5a5a_0000_0000
    /// Size of a mergeable receive buffer (header included), as DPDK's mbufs.
    public static let mergeableBufferSize = 2048

    public let socketPath: String
    public let options: Options
    public let info: NetInfo
    let frontend: Frontend
    let region: SharedRegion
    let layout: DriverRegionLayout
    let pairs: [NetQueuePair]
    let supervisor: NetSupervisor
    let control: NetControlQueue?
    let controlLock = Mutex<Int>(0)
    let closed = Atomic<Bool>(false)

    /// Connects, negotiates, validates the config and sets up the queues.
    public static func connect(socket path: String, options: Options = Options()) throws(NetError) -> VirtioNetDriver {
        let frontend: Frontend
        do {
            frontend = try Frontend.connect(
                path: path, replyTimeout: options.controlTimeout, until: .after(seconds: options.controlTimeout))
        } catch {
            throw NetError(error, replyTimeoutMilliseconds: UInt64(options.controlTimeout * 1000))
        }
        return try VirtioNetDriver(path: path, frontend: frontend, options: options)
    }

    /// Server mode (DPDK's `net_vhost` with `client=1`, QEMU's `server=off` back-ends):
    /// listens at `path`, accepts one back-end within `options.acceptTimeout` seconds,
    /// then the same negotiation as `connect(socket:)`, bounded by `controlTimeout`. The
    /// socket is removed once a back-end is accepted (or the wait ends): a second peer
    /// cannot connect. No back-end in time is `.timeout`; one that connects and goes away
    /// or misbehaves fails as it would with `connect(socket:)`, its descriptor closed.
    public static func listen(socket path: String, options: Options = Options()) throws(NetError) -> VirtioNetDriver {
        guard options.acceptTimeout > 0, options.acceptTimeout <= 86400 else {
            throw .invalidRequest("accept timeout must be in (0, 86400] seconds")
        }
        let channel: UnixChannel
        do {
            let listener = try UnixListener(path: path, backlog: 1)
            // The listener (and its path) goes away after this accept: one back-end only.
            channel = try listener.accept(until: .after(seconds: options.acceptTimeout))
        } catch .timedOut {
            throw .timeout(milliseconds: UInt64(options.acceptTimeout * 1000))
        } catch .pathTooLong(let p) {
            throw .invalidRequest("socket path too long: \(p)")
        } catch {
            throw .system(error.description)
        }
        let frontend = Frontend(channel: channel, replyTimeout: options.controlTimeout)
        frontend.operationDeadline = .after(seconds: options.controlTimeout)
        return try VirtioNetDriver(path: path, frontend: frontend, options: options)
    }

    /// Uses an already connected channel (a socketpair with an in-process back-end).
    public static func connect(channel: UnixChannel, options: Options = Options()) throws(NetError) -> VirtioNetDriver {
        let frontend = Frontend(channel: channel, replyTimeout: options.controlTimeout)
        frontend.operationDeadline = .after(seconds: options.controlTimeout)
        return try VirtioNetDriver(path: "", frontend: frontend, options: options)
    }

    /// The features we ask for (before the dependency rules and the options).
    public static let wantedFeatures: UInt64 = {
        typealias F = NetProtocol.Feature
        return FeatureBits.version1 | FeatureBits.protocolFeatures | FeatureBits.ringEventIndex | F.mac | F.mtu
            | F.status | F.mergeableRxBuffers | F.ctrlVQ | F.ctrlRx | F.mq | F.ctrlMACAddr | F.guestAnnounce
            | F.guestCsum
    }()

    init(path: String, frontend: Frontend, options: Options) throws(NetError) {
        self.socketPath = path
        self.options = options
        self.frontend = frontend
        guard options.controlTimeout > 0, options.controlTimeout <= 86400, options.commandTimeout > 0,
            options.commandTimeout <= 86400
        else {
            throw .invalidRequest("control and command timeouts must be in (0, 86400] seconds")
        }
        guard SplitLayout.isValidQueueSize(options.queueSize), options.queueSize >= 4 else {
            throw .invalidRequest("queue size \(options.queueSize) is not a power of two >= 4")
        }
        guard options.queuePairs >= 1, options.queuePairs <= 16 else {
            throw .invalidRequest("queue pairs \(options.queuePairs) not in 1...16")
        }
        let supervisor = NetSupervisor(onFailure: options.onFailure)
        self.supervisor = supervisor
        let info = try Self.negotiate(frontend, options: options)
        self.info = info
        let rxBuffer =
            info.mergeableRxBuffers ? Self.mergeableBufferSize : NetProtocol.headerSize + info.maximumFrame
        let txBuffer = NetProtocol.headerSize + info.maximumFrame
        let granules = BouncePool.granules(for: max(rxBuffer, txBuffer))
        let queueCount = 2 * info.queuePairs + (info.hasControlQueue ? 1 : 0)
        let layout = DriverRegionLayout(
            queueCount: queueCount, queueSize: options.queueSize, indirectEntries: 0,
            bounceBytesPerQueue: (options.queueSize + 1) * granules * BouncePool.granule)
        self.layout = layout
        let region: SharedRegion
        do {
            region = try SharedRegion(name: "ringfence-net", size: layout.totalSize)
        } catch {
            throw .system(error.description)
        }
        self.region = region
        let ringFeatures = RingFeatures(eventIndex: info.features & FeatureBits.ringEventIndex != 0)
        let format: RingFormat = info.features & FeatureBits.ringPacked != 0 ? .packed : .split
        var made: [NetQueuePair] = []
        var notifiers: [[Notifier]] = []
        for p in 0..<info.queuePairs {
            var four: [Notifier] = []
            for _ in 0..<4 {
                do { four.append(try Notifier()) } catch { throw .system(error.description) }
            }
            notifiers.append(four)
            let rx = layout.makeDriverRing(
                queue: 2 * p, region: region, guestBase: Self.guestBase, features: ringFeatures, format: format)
            let tx = layout.makeDriverRing(
                queue: 2 * p + 1, region: region, guestBase: Self.guestBase, features: ringFeatures, format: format)
            made.append(
                try NetQueuePair(
                    index: p, supervisor: supervisor, info: info, rx: rx, tx: tx, notifiers: four,
                    rxBufferSize: rxBuffer))
        }
        pairs = made
        if info.hasControlQueue {
            let ring = layout.makeDriverRing(
                queue: 2 * info.queuePairs, region: region, guestBase: Self.guestBase, features: ringFeatures,
                format: format)
            do {
                control = NetControlQueue(
                    ring: ring.0, pool: ring.1, kick: try Notifier(), call: try Notifier(), supervisor: supervisor,
                    timeout: options.commandTimeout)
            } catch {
                throw .system(error.description)
            }
        } else {
            control = nil
        }
        do {
            try frontend.setMemTable(
                [
                    MemoryRegionDescription(
                        guestAddress: Self.guestBase, size: UInt64(region.size), userAddress: Self.userBase,
                        mmapOffset: 0)
                ],
                descriptors: [region.fileDescriptor])
            // Every ring is set up first, then enabled (as QEMU's vhost_net_start does):
            // with PROTOCOL_FEATURES acked rings start disabled, and DPDK's vhost starts
            // the device once the first pair is enabled, with every ring already known.
            var indices: [Int] = []
            for p in 0..<info.queuePairs {
                try attach(queue: 2 * p, as: 2 * p, kick: notifiers[p][0], call: notifiers[p][1], format: format)
                try attach(
                    queue: 2 * p + 1, as: 2 * p + 1, kick: notifiers[p][2], call: notifiers[p][3], format: format)
                indices += [2 * p, 2 * p + 1]
            }
            if let control {
                // The control queue's index is 2 * max_virtqueue_pairs; its ring is the one
                // laid out after the pairs we use.
                let index = NetProtocol.controlQueue(pairs: info.maximumQueuePairs)
                try attach(
                    queue: 2 * info.queuePairs, as: index, kick: control.kick, call: control.call, format: format)
                indices.append(index)
            }
            // Only the pairs we use are enabled; with a private control queue this is what
            // VQ_PAIRS_SET would have asked for (rings beyond them are never announced).
            for index in indices { try frontend.setQueueEnabled(index: index, true) }
            try frontend.sync()
        } catch {
            throw NetError(error, replyTimeoutMilliseconds: UInt64(options.controlTimeout * 1000))
        }
        frontend.operationDeadline = .distantFuture
        for p in pairs { p.refill() }
        if info.queuePairs > 1 && control != nil {
            var pairsLE = [UInt8](repeating: 0, count: 2)
            NetProtocol.put(UInt16(info.queuePairs), into: &pairsLE, at: 0)
            try command(
                NetProtocol.Control.classMQ, NetProtocol.Control.mqPairsSet, payload: pairsLE, what: "VQ_PAIRS_SET")
        }
    }

    deinit { close() }

    /// Negotiation up to a validated `NetInfo` (no rings yet).
    static func negotiate(_ frontend: Frontend, options: Options) throws(NetError) -> NetInfo {
        typealias F = NetProtocol.Feature
        let timeoutMs = UInt64(options.controlTimeout * 1000)
        do {
            let offered: UInt64
            do {
                offered = try frontend.handshake()
            } catch {
                if frontend.reportedQueueCount == 0 { throw NetError.deviceViolation(.queueCountInvalid(reported: 0)) }
                throw error
            }
            // GET_QUEUE_NUM is the back-end's word: bounded like max_virtqueue_pairs (R3).
            if let n = frontend.reportedQueueCount, n > UInt64(NetProtocol.maximumQueuePairs) {
                throw NetError.deviceViolation(.queueCountInvalid(reported: n))
            }
            var raw: NetConfig?
            if frontend.protocolFeatures.contains(.config) {
                raw = NetConfig.decode(try frontend.getConfig(size: NetConfig.size))
            }
            var wanted = wantedFeatures
            if options.packedRing { wanted |= FeatureBits.ringPacked }
            if !options.mergeableRxBuffers { wanted &= ~F.mergeableRxBuffers }
            // A control queue kept from the back-end: CTRL_VQ is acked only for MQ (the
            // spec's dependency), so every other feature that needs it stays unasked.
            let privateControl =
                !options.controlQueue && options.queuePairs > 1 && frontend.queueCount > 1
                && offered & (F.ctrlVQ | F.mq) == F.ctrlVQ | F.mq
            if privateControl {
                wanted &= ~(F.needingControlQueue & ~F.mq)
            } else if !options.controlQueue {
                wanted &= ~F.ctrlVQ
            }
            if !options.partialChecksum { wanted &= ~F.guestCsum }
            if options.queuePairs == 1 { wanted &= ~F.mq }
            // Config fields without a config space cannot be used; max_virtqueue_pairs is
            // then GET_QUEUE_NUM, but only with the control queue ours (the back-end's
            // control queue index would be 2 * a value it never told us).
            if raw == nil { wanted &= ~(F.mac | F.mtu | F.status | F.guestAnnounce | (privateControl ? 0 : F.mq)) }
            let selected = NetFeatures.select(offered: offered, wanted: wanted)
            let acked = try frontend.setFeatures(selected)
            let info: NetInfo
            do {
                // GET_QUEUE_NUM as answered (bounded above), not the front-end's clamp: DPDK
                // 22.11 answers 128 whatever its queues= says.
                let backendQueues = frontend.reportedQueueCount.map { Int(clamping: $0) } ?? frontend.queueCount
                info = try NetInfo.validate(
                    raw, features: acked, backendQueues: backendQueues,
                    requestedPairs: options.queuePairs, privateControlQueue: privateControl)
            } catch {
                throw NetError.deviceViolation(error)
            }
            // The control queue's index is 2 * max_virtqueue_pairs; vhost-user addresses 256 rings.
            if info.hasControlQueue && NetProtocol.controlQueue(pairs: info.maximumQueuePairs) > 255 {
                throw NetError.unsupported(
                    "a control queue at index \(2 * info.maximumQueuePairs) (vhost-user: 0...255)")
            }
            return info
        } catch let error as VhostUserError {
            throw NetError(error, replyTimeoutMilliseconds: timeoutMs)
        } catch let error as NetError {
            throw error
        } catch {
            throw .system("\(error)")
        }
    }

    func attach(queue area: Int, as index: Int, kick: Notifier, call: Notifier, format: RingFormat)
        throws(VhostUserError)
    {
        let r = layout.queues[area].ring
        try frontend.setUpQueue(
            index: index, size: options.queueSize,
            descriptor: Self.userBase + UInt64(r.descriptorOffset),
            avail: Self.userBase + UInt64(r.availOffset), used: Self.userBase + UInt64(r.usedOffset),
            kick: kick.fileDescriptor, call: call.fileDescriptor,
            base: format == .packed ? PackedLayout.encodeBase(avail: 0, availWrap: true, used: 0, usedWrap: true) : 0)
    }

    // MARK: state

    public var queuePairCount: Int { pairs.count }

    public var ringFormat: RingFormat { info.features & FeatureBits.ringPacked != 0 ? .packed : .split }

    /// Queue pair `i` for the hot path (one thread per pair).
    public func pair(_ i: Int) -> NetQueuePair { pairs[max(0, min(i, pairs.count - 1))] }

    public var failure: NetError? { supervisor.failure }

    public var isBroken: Bool { supervisor.isBroken }

    /// Reads the config space again and checks it against what was validated (MTU, MAC
    /// and max_virtqueue_pairs may not change: R2, read once). Returns LINK_UP.
    public func recheckConfig() throws(NetError) -> Bool {
        guard frontend.protocolFeatures.contains(.config) else { return info.linkUp }
        let raw: [UInt8]
        do {
            raw = try controlLock.withLock { (_: inout Int) throws(VhostUserError) in
                try frontend.getConfig(size: NetConfig.size)
            }
        } catch {
            throw supervisor.fail(NetError(error, replyTimeoutMilliseconds: UInt64(options.controlTimeout * 1000)))
        }
        do {
            return try info.recheck(NetConfig.decode(raw))
        } catch {
            throw supervisor.fail(.deviceViolation(error))
        }
    }

    // MARK: control-socket watch

    /// The vhost-user control socket, for an I/O thread that blocks on it
    /// (`AsyncNetQueuePair`): the back-end may only answer there, so readable means it
    /// hung up or spoke unasked. Valid while this driver lives (`close()` shuts the socket
    /// down; the descriptor is closed only when the driver goes away).
    var controlDescriptor: Int32 { frontend.channel.channel.fileDescriptor }

    /// The control socket became readable while a thread waited on it. Looks (a peek,
    /// never a read) under the control lock, so an answer to our own request, which is
    /// read there, is not taken for the back-end's doing. A hang-up breaks the device with
    /// `.disconnected`, an unasked message with a control-protocol violation (R3, R6).
    /// Returns the failure the waiter must act on: the device's, or `.disconnected` when
    /// this driver was closed; nil when nothing is there after all.
    func controlSocketSignalled() -> NetError? {
        let state = controlLock.withLock { _ -> UnixChannel.PeerState? in
            closed.load(ordering: .acquiring) ? nil : UnixChannel.peerState(of: controlDescriptor)
        }
        switch state {
        case nil: return .disconnected("the driver was closed")
        case .quiet?: return nil
        case .spoke?:
            return supervisor.fail(.deviceViolation(.controlProtocol("unsolicited message on the vhost-user socket")))
        case .hungUp?: return supervisor.fail(.disconnected("back-end closed the vhost-user socket"))
        }
    }

    // MARK: control queue

    /// VIRTIO_NET_CTRL_RX_PROMISC.
    public func setPromiscuous(_ on: Bool) throws(NetError) {
        try command(
            NetProtocol.Control.classRx, NetProtocol.Control.rxPromisc, payload: [on ? 1 : 0], what: "RX_PROMISC")
    }

    /// VIRTIO_NET_CTRL_MAC_ADDR_SET (needs CTRL_MAC_ADDR).
    public func setMAC(_ mac: [UInt8]) throws(NetError) {
        guard NetInfo.isUsableMAC(mac) else { throw .invalidRequest("\(formatMAC(mac)) is not a unicast address") }
        guard info.features & NetProtocol.Feature.ctrlMACAddr != 0 else {
            throw .unsupported("VIRTIO_NET_F_CTRL_MAC_ADDR")
        }
        try command(NetProtocol.Control.classMAC, NetProtocol.Control.macAddrSet, payload: mac, what: "MAC_ADDR_SET")
    }

    /// Sends one control command and waits for its ack within `controlTimeout` (R5).
    public func command(_ cls: UInt8, _ cmd: UInt8, payload: [UInt8], what: String) throws(NetError) {
        guard let control else {
            throw .unsupported(
                info.controlQueueIsPrivate
                    ? "control commands (the control queue is kept from this back-end)" : "VIRTIO_NET_F_CTRL_VQ")
        }
        try controlLock.withLock { (_: inout Int) throws(NetError) in
            try control.run(cls, cmd, payload: payload, what: what)
        }
    }

    /// Stops the rings (GET_VRING_BASE, one bound for all) and closes the connection.
    public func close() {
        guard !closed.exchange(true, ordering: .acquiringAndReleasing) else { return }
        controlLock.withLock { _ in
            frontend.bounded(by: .after(seconds: options.controlTimeout)) {
                var indices: [Int] = []
                for p in 0..<pairs.count { indices += [2 * p, 2 * p + 1] }
                if control != nil { indices.append(NetProtocol.controlQueue(pairs: info.maximumQueuePairs)) }
                for q in indices {
                    do { _ = try frontend.getVringBase(index: q) } catch { break }
                }
            }
            frontend.close()
        }
    }
}

/// The control virtqueue: one command at a time, each with a deadline (R5); the ack must
/// be OK (0) or ERR (1), anything else (including a byte never written) is a violation.
final class NetControlQueue {
    static let sentinel: UInt8 = 0xff
    let ring: any DriverRing
    let pool: BouncePool
    let kick: Notifier
    let call: Notifier
    let supervisor: NetSupervisor
    let timeout: Double

    init(
        ring: any DriverRing, pool: BouncePool, kick: Notifier, call: Notifier, supervisor: NetSupervisor,
        timeout: Double
    ) {
        self.ring = ring
        self.pool = pool
        self.kick = kick
        self.call = call
        self.supervisor = supervisor
        self.timeout = timeout
    }

    func run(_ cls: UInt8, _ cmd: UInt8, payload: [UInt8], what: String) throws(NetError) {
        if supervisor.isBroken { throw supervisor.failure ?? .disconnected("device broken") }
        guard payload.count <= NetProtocol.Control.maximumPayload else {
            throw .invalidRequest("control payload of \(payload.count) bytes")
        }
        let length = 2 + payload.count + 1
        guard let slice = pool.allocate(length) else { throw .system("control bounce pool exhausted") }
        pool.store(cls, in: slice, at: 0)
        pool.store(cmd, in: slice, at: 1)
        payload.withUnsafeBytes { pool.copyIn(slice, at: 2, from: $0) }
        pool.store(Self.sentinel, in: slice, at: 2 + payload.count)
        let segments = [
            pool.segment(slice, offset: 0, length: 2 + payload.count, deviceWritable: false),
            pool.segment(slice, offset: 2 + payload.count, length: 1, deviceWritable: true),
        ]
        do {
            try ring.add(segments, token: 1)
        } catch {
            pool.free(slice)
            if case .broken(let v) = error { throw supervisor.fail(.violation(v)) }
            throw .system(error.description)
        }
        if ring.publish() && !kick.signal() {
            throw supervisor.fail(.violation(.notifierBlocked(role: "kick")))
        }
        let deadline = Deadline.after(seconds: timeout)
        var backoff = WakeBackoff()
        while true {
            let completion: Completion?
            do {
                completion = try ring.nextCompletion()
            } catch {
                throw supervisor.fail(.violation(error))  // the slice stays quarantined
            }
            if completion != nil { break }
            if deadline.hasPassed {
                // Never answered: the device is broken; the slice stays with the ring (R6).
                let ms = UInt64(timeout * 1000)
                ring.breakQueue(.deadlineExceeded(milliseconds: ms))
                throw supervisor.fail(.timeout(milliseconds: ms))
            }
            if ring.enableInterrupts() { continue }
            if case .notified = EventWaiter.wait(for: call, until: deadline) {
                backoff.note(productive: false)
                backoff.pause(until: deadline)
            }
        }
        let ack = pool.loadByte(slice, at: 2 + payload.count) ?? Self.sentinel
        pool.free(slice)
        switch ack {
        case NetProtocol.Control.ok: return
        case NetProtocol.Control.err: throw .commandRefused(what)
        default:
            ring.breakQueue(.brokenAbove(rule: .r3, reason: NetViolation.controlAckInvalid(ack: ack).detail))
            throw supervisor.fail(.deviceViolation(.controlAckInvalid(ack: ack)))
        }
    }
}

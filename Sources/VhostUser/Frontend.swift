#if canImport(Glibc)
import Glibc
#endif
public import SharedMemory

/// The driver side of a vhost-user connection: negotiates, shares memory, sets up rings.
///
/// Every reply is read with a deadline, its size bounded before the body is read, and
/// checked exactly (code echoed, REPLY flag, version, size); descriptors that arrive with
/// a reply are closed and reported (R3, R5). With REPLY_ACK every message that has no
/// reply of its own asks for an ack; because libvhost-user may answer 0 and then close
/// the socket, `sync()` proves the peer is still there after the setup.
///
/// Not thread-safe: one owner (the device's control path).
public final class Frontend: @unchecked Sendable {
    // @unchecked Sendable: handed between threads, used by one at a time. The blk driver
    // calls it only under its supervisor's lock or as the reconnect's single owner; its
    // mutable state (features, deadlines) is never touched by two threads at once.
    /// Protocol features we accept; BACKEND_REQ, PAGEFAULT, HOST_NOTIFIER and the rest
    /// add attack surface we do not need.
    public static let acceptedProtocolFeatures: ProtocolFeatures = [.replyAck, .config, .multiQueue]
    /// The most queues we will ever set up, whatever GET_QUEUE_NUM says.
    public static let maximumQueues = 64

    /// The control socket.
    public let channel: MessageChannel
    /// Seconds every message (send, then its reply) may take.
    public var replyTimeout: Double
    /// A bound on the whole operation in progress (connect plus negotiation, a close):
    /// every send and receive ends by it, so a back-end that answers each message just
    /// inside `replyTimeout` cannot stretch the operation to N times that (R5).
    public var operationDeadline: Deadline = .distantFuture
    /// What the back-end offered in GET_FEATURES.
    public private(set) var offeredFeatures: UInt64 = 0
    /// What we acknowledged with SET_FEATURES.
    public private(set) var ackedFeatures: UInt64 = 0
    /// Protocol features acked (only REPLY_ACK, CONFIG and MQ are ever asked for).
    public private(set) var protocolFeatures: ProtocolFeatures = []
    /// GET_QUEUE_NUM, clamped to 1...maximumQueues (1 without MQ).
    public private(set) var queueCount = 1
    /// GET_QUEUE_NUM exactly as the back-end answered it (nil without MQ), for a device
    /// class that bounds it further (virtio-net: 1...0x8000 queue pairs). Recorded before
    /// `handshake()` refuses a 0.
    public private(set) var reportedQueueCount: UInt64?

    /// A front-end on a connected `channel`; each reply must come within `replyTimeout` seconds.
    public init(channel: UnixChannel, replyTimeout: Double = 5) {
        self.channel = MessageChannel(channel)
        self.replyTimeout = replyTimeout
    }

    /// Connects to a back-end listening at `path`; `deadline` bounds the connect and
    /// becomes the operation deadline (the caller resets it once set-up is done).
    public static func connect(
        path: String, replyTimeout: Double = 5, until deadline: Deadline = .distantFuture
    ) throws(VhostUserError) -> Frontend {
        do {
            let connectBound = min(deadline, .after(seconds: replyTimeout))
            let f = Frontend(
                channel: try UnixChannel.connect(path: path, until: connectBound), replyTimeout: replyTimeout)
            f.operationDeadline = deadline
            return f
        } catch {
            throw .channel(error)
        }
    }

    /// Runs `body` with every message bounded by `deadline` too, then restores the bound.
    public func bounded<T, E: Error>(by deadline: Deadline, _ body: () throws(E) -> T) throws(E) -> T {
        let saved = operationDeadline
        operationDeadline = min(saved, deadline)
        defer { operationDeadline = saved }
        return try body()
    }

    /// The deadline of the next send or receive: the per-message one, or the operation's.
    var messageDeadline: Deadline { min(.after(seconds: replyTimeout), operationDeadline) }

    // MARK: negotiation

    /// SET_OWNER, GET_FEATURES (VERSION_1 and PROTOCOL_FEATURES required), protocol
    /// features (only the accepted ones), GET_QUEUE_NUM. Returns the offered features.
    @discardableResult
    public func handshake() throws(VhostUserError) -> UInt64 {
        try send(.setOwner)
        let offered = try u64Request(.getFeatures)
        guard offered & FeatureBits.version1 != 0 else { throw .unsupported("VIRTIO_F_VERSION_1") }
        guard offered & FeatureBits.protocolFeatures != 0 else {
            throw .unsupported("VHOST_USER_F_PROTOCOL_FEATURES (bit 30)")
        }
        offeredFeatures = offered
        let offeredProtocol = ProtocolFeatures(rawValue: try u64Request(.getProtocolFeatures))
        let chosen = offeredProtocol.intersection(Self.acceptedProtocolFeatures)
        try send(.setProtocolFeatures, payload: U64Payload(chosen.rawValue).encoded)
        protocolFeatures = chosen  // acks are requested from here on
        if chosen.contains(.multiQueue) {
            let n = try u64Request(.getQueueNum)
            reportedQueueCount = n
            guard n >= 1 else { throw .invalidPayload("GET_QUEUE_NUM returned 0") }
            queueCount = Int(min(n, UInt64(Self.maximumQueues)))
        } else {
            queueCount = 1
        }
        return offered
    }

    /// GET_CONFIG from offset 0 for exactly `size` bytes (qsd ignores the offset and serves
    /// at most 60). A reply of any other size is refused.
    public func getConfig(size: Int) throws(VhostUserError) -> [UInt8] {
        guard protocolFeatures.contains(.config) else { throw .unsupported("VHOST_USER_PROTOCOL_F_CONFIG") }
        guard size > 0, size <= ConfigSpace.maximumSize else { throw .invalidPayload("config size \(size)") }
        let request = ConfigSpace(offset: 0, flags: 0, payload: [UInt8](repeating: 0, count: size))
        let reply = try exchange(.getConfig, payload: request.encoded, replySize: ConfigSpace.headerSize + size)
        let config = try ConfigSpace.decode(reply)
        guard config.payload.count == size else { throw .payloadSize(expected: size, got: config.payload.count) }
        return config.payload
    }

    /// SET_FEATURES with `wanted` restricted to what was offered, plus PROTOCOL_FEATURES.
    /// Returns the acknowledged set.
    @discardableResult
    public func setFeatures(_ wanted: UInt64) throws(VhostUserError) -> UInt64 {
        let acked = (wanted & offeredFeatures) | FeatureBits.protocolFeatures | FeatureBits.version1
        try send(.setFeatures, payload: U64Payload(acked).encoded)
        ackedFeatures = acked
        return acked
    }

    /// SET_MEM_TABLE with one descriptor per region. Addresses must be synthetic (R7).
    public func setMemTable(_ regions: [MemoryRegionDescription], descriptors: [Int32]) throws(VhostUserError) {
        guard !regions.isEmpty, regions.count == descriptors.count, regions.count <= MemoryTable.maximumRegions
        else { throw .invalidPayload("memory table of \(regions.count) regions, \(descriptors.count) fds") }
        try send(.setMemTable, payload: MemoryTable(regions: regions).encoded, descriptors: descriptors)
    }

    /// SET_VRING_NUM, BASE, ADDR, KICK, CALL for one queue (ring addresses are the
    /// synthetic user addresses of the memory table).
    public func setUpQueue(
        index: Int, size: Int, descriptor: UInt64, avail: UInt64, used: UInt64,
        kick: Int32, call: Int32, base: UInt32 = 0
    ) throws(VhostUserError) {
        let i = UInt32(truncatingIfNeeded: index)
        try send(.setVringNum, payload: VringState(index: i, num: UInt32(truncatingIfNeeded: size)).encoded)
        try send(.setVringBase, payload: VringState(index: i, num: base).encoded)
        try send(
            .setVringAddr,
            payload: VringAddress(index: i, descriptor: descriptor, used: used, avail: avail).encoded)
        let file = VringFile(index: UInt8(truncatingIfNeeded: index)).encoded
        try send(.setVringKick, payload: file, descriptors: [kick])
        try send(.setVringCall, payload: file, descriptors: [call])
    }

    /// SET_VRING_ENABLE (rings start disabled once PROTOCOL_FEATURES is acked; DPDK
    /// waits for it).
    public func setQueueEnabled(index: Int, _ enabled: Bool) throws(VhostUserError) {
        try send(
            .setVringEnable,
            payload: VringState(index: UInt32(truncatingIfNeeded: index), num: enabled ? 1 : 0).encoded)
    }

    /// GET_VRING_BASE: stops the ring and returns the back-end's next avail index.
    public func getVringBase(index: Int) throws(VhostUserError) -> UInt32 {
        let reply = try exchange(
            .getVringBase, payload: VringState(index: UInt32(truncatingIfNeeded: index), num: 0).encoded,
            replySize: VringState.size)
        let state = try VringState.decode(reply)
        guard state.index == UInt32(truncatingIfNeeded: index) else {
            throw .invalidPayload("GET_VRING_BASE answered for queue \(state.index), asked \(index)")
        }
        return state.num
    }

    /// A round trip (GET_FEATURES, which must not change) proving the back-end is still
    /// there: a REPLY_ACK of 0 is not proof, a closed socket shows only on the next read.
    public func sync() throws(VhostUserError) {
        let features = try u64Request(.getFeatures)
        guard features == offeredFeatures else {
            throw .invalidPayload(
                "features changed from 0x\(String(offeredFeatures, radix: 16)) to 0x\(String(features, radix: 16))")
        }
    }

    /// Closes the connection (the back-end stops the rings).
    public func close() { channel.channel.shutdown() }

    // MARK: messages

    /// Sends a message that has no reply of its own; with REPLY_ACK, asks for and checks
    /// the ack.
    func send(_ request: Request, payload: [UInt8] = [], descriptors: [Int32] = []) throws(VhostUserError) {
        let ack = protocolFeatures.contains(.replyAck)
        var flags = HeaderFlags.version
        if ack { flags |= HeaderFlags.needReply }
        try channel.send(
            Message(request, flags: flags, payload: payload, descriptors: descriptors), until: messageDeadline)
        guard ack else { return }
        let reply = try receiveReply(to: request, size: U64Payload.size)
        let status = try U64Payload.decode(reply).value
        guard status == 0 else { throw .nack(request: request, status: status) }
    }

    func u64Request(_ request: Request) throws(VhostUserError) -> UInt64 {
        try U64Payload.decode(try exchange(request, payload: [], replySize: U64Payload.size)).value
    }

    /// Sends a request that always has a reply and returns the validated reply payload.
    func exchange(_ request: Request, payload: [UInt8], replySize: Int) throws(VhostUserError) -> [UInt8] {
        try channel.send(Message(request, payload: payload), until: messageDeadline)
        return try receiveReply(to: request, size: replySize)
    }

    /// Reads one reply and checks it exactly; descriptors attached to it are closed and
    /// make it an error (a reply never carries any we asked for).
    func receiveReply(to request: Request, size: Int) throws(VhostUserError) -> [UInt8] {
        let message = try channel.receive(until: messageDeadline, maxDescriptors: UnixChannel.maximumDescriptors)
        if !message.descriptors.isEmpty {
            message.closeDescriptors()
            throw .descriptorCount(request: request, expected: "0", got: message.descriptors.count)
        }
        guard message.header.request == request.rawValue else {
            throw .unexpectedReply(expected: request, got: message.header.request)
        }
        guard message.header.isReply, !message.header.needsReply else {
            throw .replyFlag(request: message.header.request, flags: message.header.flags)
        }
        guard message.payload.count == size else { throw .payloadSize(expected: size, got: message.payload.count) }
        return message.payload
    }
}

public import SharedMemory

/// Everything that can be wrong with a vhost-user message or exchange. The peer's mistakes
/// are values, never traps (R4).
public enum VhostUserError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The socket failed or the peer went away.
    case channel(UnixChannel.Error)
    /// Header version bits are not 1.
    case badVersion(flags: UInt32)
    /// The size field exceeds what any message of that type may carry.
    case sizeTooLarge(request: UInt32, size: UInt32, limit: Int)
    /// A payload of the wrong size for its request.
    case payloadSize(expected: Int, got: Int)
    /// A payload shorter than its fields.
    case payloadTooShort(need: Int, have: Int)
    /// A payload whose values are not acceptable.
    case invalidPayload(String)
    /// A request code we do not implement.
    case unknownRequest(UInt32)
    /// A reply that does not echo the request it answers.
    case unexpectedReply(expected: Request, got: UInt32)
    /// A reply without the REPLY flag, or a request with it.
    case replyFlag(request: UInt32, flags: UInt32)
    /// Descriptors where none are allowed, or the wrong number.
    case descriptorCount(request: Request, expected: String, got: Int)
    /// The back-end answered REPLY_ACK with a non-zero status.
    case nack(request: Request, status: UInt64)
    /// The back-end lacks something we require.
    case unsupported(String)

    /// One line naming what is wrong.
    public var description: String {
        switch self {
        case .channel(let e): return "vhost-user channel: \(e)"
        case .badVersion(let f): return "message header flags 0x\(String(f, radix: 16)) do not carry version 1"
        case .sizeTooLarge(let r, let s, let l): return "request \(r) announces \(s) payload bytes (limit \(l))"
        case .payloadSize(let e, let g): return "payload is \(g) bytes, expected \(e)"
        case .payloadTooShort(let n, let h): return "payload of \(h) bytes is shorter than \(n)"
        case .invalidPayload(let s): return s
        case .unknownRequest(let r): return "unknown request \(r)"
        case .unexpectedReply(let e, let g): return "reply code \(g) does not echo \(e)"
        case .replyFlag(let r, let f): return "request \(r): REPLY flag wrong in flags 0x\(String(f, radix: 16))"
        case .descriptorCount(let r, let e, let g): return "\(r) carries \(g) descriptors, expected \(e)"
        case .nack(let r, let s): return "back-end refused \(r) (status \(s))"
        case .unsupported(let s): return "back-end does not support \(s)"
        }
    }
}

/// The 12-byte header: `u32 request; u32 flags; u32 size`.
public struct MessageHeader: Sendable, Equatable {
    /// Bytes of the header.
    public static let size = 12
    /// The request code.
    public var request: UInt32
    /// Version and reply bits.
    public var flags: UInt32
    /// Bytes of payload that follow.
    public var size: UInt32

    /// A header.
    public init(request: UInt32, flags: UInt32, size: UInt32) {
        self.request = request
        self.flags = flags
        self.size = size
    }

    /// The message is a reply.
    public var isReply: Bool { flags & HeaderFlags.reply != 0 }
    /// The sender asked for a REPLY_ACK.
    public var needsReply: Bool { flags & HeaderFlags.needReply != 0 }

    /// Little-endian bytes.
    public var encoded: [UInt8] {
        var w = PayloadWriter(capacity: Self.size)
        w.write(request)
        w.write(flags)
        w.write(size)
        return w.bytes
    }

    /// Decodes and checks the version bits. Does not judge `size` (see `MessageRules`).
    public static func decode(_ bytes: [UInt8]) throws(VhostUserError) -> MessageHeader {
        guard bytes.count == size else { throw .payloadSize(expected: size, got: bytes.count) }
        var r = PayloadReader(bytes)
        let h = MessageHeader(
            request: try r.read(UInt32.self), flags: try r.read(UInt32.self), size: try r.read(UInt32.self))
        guard h.flags & HeaderFlags.versionMask == HeaderFlags.version else { throw .badVersion(flags: h.flags) }
        return h
    }
}

/// A whole message: header, payload, and the descriptors that came with it (owned by
/// whoever holds the message; `closeDescriptors()` when not kept).
public struct Message: Sendable {
    /// The header.
    public var header: MessageHeader
    /// The payload bytes.
    public var payload: [UInt8]
    /// Descriptors that came with the message (owned by it until adopted or closed).
    public var descriptors: [Int32]

    /// A message with `payload` and `descriptors`.
    public init(header: MessageHeader, payload: [UInt8], descriptors: [Int32] = []) {
        self.header = header
        self.payload = payload
        self.descriptors = descriptors
    }

    /// A message for `request` with an encoded payload.
    public init(
        _ request: Request, flags: UInt32 = HeaderFlags.version, payload: [UInt8] = [], descriptors: [Int32] = []
    ) {
        self.header = MessageHeader(request: request.rawValue, flags: flags, size: UInt32(payload.count))
        self.payload = payload
        self.descriptors = descriptors
    }

    /// The request, if the code is known.
    public var request: Request? { Request(rawValue: header.request) }

    /// Closes every descriptor still attached (what is not adopted is closed, R4).
    public func closeDescriptors() {
        for fd in descriptors { closeDescriptor(fd) }
    }

    /// Header and payload.
    public var encoded: [UInt8] { header.encoded + payload }
}

/// What each request may carry: the payload size bound checked before reading the body,
/// and how many descriptors. One table serves both sides.
public enum MessageRules {
    /// No message RingFence accepts is larger; checked before the body is read.
    public static let maximumPayload = 4096

    /// How many descriptors a request carries.
    public enum Descriptors: Sendable, Equatable {
        /// No descriptor.
        case none
        /// Exactly one descriptor.
        case one
        /// One unless the payload's bit 8 (no-descriptor) is set.
        case vringFile
        /// One per memory region in the payload.
        case perRegion
    }

    /// Largest payload a request may announce (exact sizes are checked when decoding).
    public static func payloadLimit(_ request: Request) -> Int {
        switch request {
        case .getFeatures, .setOwner, .resetOwner, .getProtocolFeatures, .getQueueNum,
            .resetDevice, .getMaxMemSlots, .getStatus:
            return 8  // no payload expected; tolerate a zero u64 some front-ends send
        case .setFeatures, .setProtocolFeatures, .setVringKick, .setVringCall, .setVringErr,
            .setLogBase, .setLogFD, .sendRARP, .netSetMTU, .setBackendReqFD, .setStatus:
            return 8
        case .setVringNum, .setVringBase, .getVringBase, .setVringEnable, .setVringEndian, .vringKick:
            return VringState.size
        case .setVringAddr: return VringAddress.size
        case .setMemTable: return 8 + MemoryTable.maximumRegions * MemoryRegionDescription.size
        case .addMemReg, .remMemReg: return SingleMemoryRegion.size
        case .getConfig, .setConfig: return ConfigSpace.headerSize + ConfigSpace.maximumSize
        case .iotlbMessage: return 64
        case .getInflightFD, .setInflightFD: return 32
        }
    }

    /// Requests whose reply is their payload: REPLY_ACK does not apply to them, so a
    /// refusal cannot be answered and drops the connection.
    public static func hasReplyPayload(_ request: Request) -> Bool {
        switch request {
        case .getFeatures, .getProtocolFeatures, .getQueueNum, .getVringBase, .getConfig,
            .getMaxMemSlots, .getInflightFD, .getStatus:
            return true
        default: return false
        }
    }

    /// The descriptors `request` must carry; any other count is refused (R3).
    public static func descriptors(_ request: Request) -> Descriptors {
        switch request {
        case .setMemTable: return .perRegion
        case .addMemReg, .setLogFD, .setBackendReqFD, .setInflightFD: return .one
        case .setVringKick, .setVringCall, .setVringErr: return .vringFile
        default: return .none
        }
    }
}

/// Reads and writes whole messages on a `UnixChannel`, with a deadline on every read and
/// the size bounded before the body is read.
public struct MessageChannel: Sendable {
    /// The socket.
    public let channel: UnixChannel

    /// A message channel over `channel`.
    public init(_ channel: UnixChannel) { self.channel = channel }

    /// Sends `message` with its descriptors, within `deadline` (R5).
    public func send(
        _ message: Message, until deadline: Deadline = .after(seconds: UnixChannel.defaultSendTimeout)
    ) throws(VhostUserError) {
        do {
            try channel.send(message.encoded, descriptors: message.descriptors, until: deadline)
        } catch {
            throw .channel(error)
        }
    }

    /// Receives one message. The announced size is checked against `MessageRules` before
    /// the body is read (an unknown code is still bounded by `maximumPayload`). Descriptors
    /// beyond `maxDescriptors` are closed on arrival; all are closed if the message is bad.
    public func receive(
        until deadline: Deadline, maxDescriptors: Int = MemoryTable.maximumRegions
    ) throws(VhostUserError) -> Message {
        var headerBytes = [UInt8](repeating: 0, count: MessageHeader.size)
        let fds: [Int32]
        do {
            let result = headerBytes.withUnsafeMutableBytes { buf in
                Result { () throws(UnixChannel.Error) in
                    try channel.receive(exactly: buf, maxDescriptors: maxDescriptors, until: deadline)
                }
            }
            fds = try result.get()
        } catch {
            throw .channel(error)
        }
        var message = Message(header: MessageHeader(request: 0, flags: 0, size: 0), payload: [], descriptors: fds)
        do throws(VhostUserError) {
            message.header = try MessageHeader.decode(headerBytes)
            let limit =
                Request(rawValue: message.header.request).map(MessageRules.payloadLimit) ?? MessageRules.maximumPayload
            guard message.header.size <= UInt32(limit) else {
                throw .sizeTooLarge(request: message.header.request, size: message.header.size, limit: limit)
            }
            if message.header.size > 0 {
                var body = [UInt8](repeating: 0, count: Int(message.header.size))
                let result = body.withUnsafeMutableBytes { buf in
                    Result { () throws(UnixChannel.Error) in
                        try channel.receive(exactly: buf, maxDescriptors: 0, until: deadline)
                    }
                }
                do { _ = try result.get() } catch { throw VhostUserError.channel(error) }
                message.payload = body
            }
        } catch {
            message.closeDescriptors()
            throw error
        }
        return message
    }
}

import SharedMemory

/// What the connection does after one request. `RequestDispatcher` decides; the session,
/// which owns the socket, its deadlines and the refusal log, carries it out.
public enum DispatchOutcome {
    /// Nothing to send: the request has no reply and none was asked for.
    case done
    /// The request's own reply, or REPLY_ACK's status 0 (what `ControlReplyHook` sees).
    case reply(Message, answering: Request)
    /// Refused under REPLY_ACK: send this failure status; the connection goes on.
    case nack(Message, reason: String)
    /// Malformed, or refused with no way to say so: drop the connection.
    case drop(VhostUserError, reason: String)
}

/// The back-end side of the protocol without a socket (rust-vmm's `vhost` request
/// handler): decodes one message at its exact size, checks the descriptors it carries
/// (count per `MessageRules`, eventfd kind, memfd seals and size), calls the handler's
/// method, and turns the result into a reply or a typed refusal. Every descriptor not
/// handed on is closed (§4.1).
public struct RequestDispatcher {
    /// REPLY_ACK negotiated: refusals are answered, successes acked when asked.
    public private(set) var replyAck = false

    /// A dispatcher with no state yet.
    public init() {}

    /// Checks `message` (size, descriptors, state) and calls `handler`, or refuses it (R3).
    public mutating func dispatch(_ message: Message, to handler: any VhostUserBackendHandler) -> DispatchOutcome {
        let descriptors = ReceivedDescriptors(message.descriptors)
        let code = message.header.request
        let needsReply = message.header.needsReply
        guard let request = Request(rawValue: code) else {
            return refuse(code, needsReply: needsReply, "unknown request", dropping: .unknownRequest(code))
        }
        guard !message.header.isReply else {
            let e = VhostUserError.replyFlag(request: code, flags: message.header.flags)
            return .drop(e, reason: e.description)
        }
        let reply: [UInt8]?
        do throws(Refusal) {
            try handler.requestReceived(request, payload: message.payload, descriptors: descriptors.rawValues)
            reply = try perform(request, message.payload, descriptors, on: handler)
        } catch {
            switch error {
            case .malformed(let e):
                return .drop(e, reason: e.description)
            case .refused(let why):
                if MessageRules.hasReplyPayload(request) {
                    return .drop(.invalidPayload("\(request) refused: \(why)"), reason: why)
                }
                return refuse(code, needsReply: needsReply, why, dropping: .invalidPayload(why))
            }
        }
        if let reply {
            return .reply(
                Message(request, flags: HeaderFlags.version | HeaderFlags.reply, payload: reply), answering: request)
        }
        if needsReply && replyAck {
            let ack = Message(request, flags: HeaderFlags.version | HeaderFlags.reply, payload: U64Payload(0).encoded)
            return .reply(ack, answering: request)
        }
        return .done
    }

    /// An honest failure under REPLY_ACK; without it the front-end would go on believing
    /// the request worked, so the connection is dropped.
    private func refuse(_ code: UInt32, needsReply: Bool, _ why: String, dropping error: VhostUserError)
        -> DispatchOutcome
    {
        guard needsReply, replyAck else { return .drop(error, reason: why) }
        let failure = Message(
            header: MessageHeader(request: code, flags: HeaderFlags.version | HeaderFlags.reply, size: 8),
            payload: U64Payload(1).encoded)
        return .nack(failure, reason: why)
    }

    /// Decodes the payload, checks and hands on the descriptors, calls the handler.
    /// Returns the reply payload for requests that have one.
    private mutating func perform(
        _ request: Request, _ payload: [UInt8], _ descriptors: ReceivedDescriptors,
        on handler: any VhostUserBackendHandler
    ) throws(Refusal) -> [UInt8]? {
        try checkDescriptorCount(request, payload, descriptors.count)
        switch request {
        case .getFeatures:
            try expectEmpty(payload)
            return U64Payload(try handler.getFeatures()).encoded
        case .setFeatures:
            try handler.setFeatures(try decode(U64Payload.self, payload).value)
        case .setOwner:
            try expectEmpty(payload)
            try handler.setOwner()
        case .resetOwner:
            try expectEmpty(payload)
            try handler.resetOwner()
        case .resetDevice:
            try expectEmpty(payload)
            try handler.resetDevice()
        case .getProtocolFeatures:
            try expectEmpty(payload)
            return U64Payload(try handler.getProtocolFeatures().rawValue).encoded
        case .setProtocolFeatures:
            let value = ProtocolFeatures(rawValue: try decode(U64Payload.self, payload).value)
            try handler.setProtocolFeatures(value)
            replyAck = value.contains(.replyAck)
        case .getQueueNum:
            try expectEmpty(payload)
            return U64Payload(try handler.getQueueNum()).encoded
        case .getMaxMemSlots:
            try expectEmpty(payload)
            return U64Payload(try handler.getMaxMemSlots()).encoded
        case .setMemTable:
            let table = try decode(MemoryTable.self, payload)
            var regions: [GuestRegion] = []
            for (i, r) in table.regions.enumerated() {
                regions.append(try map(r, fd: take(descriptors, i, for: request)))
            }
            try handler.setMemTable(regions)
        case .addMemReg:
            let r = try decode(SingleMemoryRegion.self, payload).region
            try handler.addMemReg(try map(r, fd: take(descriptors, 0, for: request)))
        case .remMemReg:
            try handler.remMemReg(try decode(SingleMemoryRegion.self, payload).region)
        case .setVringNum:
            try handler.setVringNum(try decode(VringState.self, payload))
        case .setVringBase:
            try handler.setVringBase(try decode(VringState.self, payload))
        case .setVringAddr:
            try handler.setVringAddr(try decode(VringAddress.self, payload))
        case .getVringBase:
            return try handler.getVringBase(try decode(VringState.self, payload)).encoded
        case .setVringKick:
            let f = try decode(VringFile.self, payload)
            try handler.setVringKick(f, try notifier(f, descriptors, for: request))
        case .setVringCall:
            let f = try decode(VringFile.self, payload)
            try handler.setVringCall(f, try notifier(f, descriptors, for: request))
        case .setVringErr:
            let f = try decode(VringFile.self, payload)
            try handler.setVringErr(f, try notifier(f, descriptors, for: request))
        case .setVringEnable:
            try handler.setVringEnable(try decode(VringState.self, payload))
        case .getConfig:
            let c = try decode(ConfigSpace.self, payload)
            guard !c.payload.isEmpty else { throw .refused("GET_CONFIG of 0 bytes") }
            let bytes = try handler.getConfig(offset: c.offset, size: c.payload.count, flags: c.flags)
            return ConfigSpace(offset: c.offset, flags: c.flags, payload: bytes).encoded
        case .setConfig:
            let c = try decode(ConfigSpace.self, payload)
            try handler.setConfig(offset: c.offset, bytes: c.payload, flags: c.flags)
        case .setLogBase, .setLogFD, .sendRARP, .netSetMTU, .setBackendReqFD, .iotlbMessage,
            .setVringEndian, .getInflightFD, .setInflightFD, .vringKick, .setStatus, .getStatus:
            // Never offered; a device class that negotiates one adds a handler method.
            throw .refused("\(request) was not negotiated")
        }
        return nil
    }

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
    private func take(_ descriptors: ReceivedDescriptors, _ i: Int, for request: Request) throws(Refusal)
        -> OwnedDescriptor
    {
        guard let fd = descriptors.take(i) else {
            throw .malformed(.descriptorCount(request: request, expected: "\(i + 1)", got: descriptors.count))
        }
        return fd
    }

    /// Kick, call and err must be eventfds: a pipe or regular file that is always
    /// readable would turn the queue thread into a busy loop (R5).
    private func notifier(_ file: VringFile, _ descriptors: ReceivedDescriptors, for request: Request)
        throws(Refusal) -> Notifier?
    {
        if file.noDescriptor { return nil }
        let fd = try take(descriptors, 0, for: request)
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
}

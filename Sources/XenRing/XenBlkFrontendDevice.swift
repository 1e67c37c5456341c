public import SharedMemory
public import Virtqueue

/// Why a block request failed.
public enum XenBlkError: Error, Equatable, CustomStringConvertible {
    /// The device is disabled for further use (R6); every in-flight request fails so.
    case broken(Violation)
    case submit(BlkSubmitError)
    /// The backend answered ERROR or EOPNOTSUPP.
    case status(BlkStatus)

    public var description: String {
        switch self {
        case .broken(let v): return "device disabled: \(v)"
        case .submit(let e): return e.description
        case .status(let s): return "backend answered \(s)"
        }
    }
}

/// A connected blkif frontend: handshake, shared memory, event channel, and the
/// hardened ring, with blocking read/write/flush/discard that always have a deadline.
///
/// Owns its grant table and frames (two sealed memfds, R7) and its eventfds. One owner
/// at a time.
public final class XenBlkFrontendDevice {
    public let info: XenBlkInfo
    public let front: BlkFrontend
    public let events: EventChannel
    let channel: UnixChannel
    let table: SharedRegion
    let frames: SharedRegion
    /// Seconds a request may take before the device is declared dead (R5); values
    /// outside (0, 3600] (or NaN) fall back to 5 so no conversion of it can trap.
    public var timeout: Double = 5 {
        didSet { if !(timeout > 0 && timeout <= 3600) { timeout = 5 } }
    }
    private var nextToken: UInt64 = 1
    /// Tokens failed by `failAll` after a violation, for callers that keep their own.
    public private(set) var failedTokens: [UInt64] = []

    /// Grant entries (one page of v1 entries) and frames (ring + 11 pages per slot).
    public static let grantEntries = 512
    public static let frameCount = 1 + BlkifLayout.ringSize * BlkifLayout.maxSegments

    /// Runs the frontend half of the handshake on `channel`: reads the backend's node
    /// (values clamped), shares the grant table, frames and eventfds, waits for Connected.
    public static func connect(channel: UnixChannel, until deadline: Deadline = .after(seconds: 10))
        throws(XenConnectError) -> XenBlkFrontendDevice
    {
        let (node, _) = try channel.receiveNode(maxDescriptors: 0, until: deadline)
        let info: XenBlkInfo
        do { info = try XenBlkInfo.validate(node) } catch { throw .violation(error) }
        let table: SharedRegion
        let frames: SharedRegion
        let toBack: Notifier
        let fromBack: Notifier
        do {
            table = try SharedRegion(name: "xen-grant-table", size: grantEntries * GrantLayout.entrySize)
            frames = try SharedRegion(name: "xen-frames", size: frameCount * SharedRingLayout.pageSize)
            toBack = try Notifier()
            fromBack = try Notifier()
        } catch { throw .setup("\(error)") }
        let memory = GrantTableMemory(
            entries: table.base, entryCount: grantEntries, frames: frames.base, frameCount: frameCount)
        let issuer = GrantIssuer(memory: memory)
        let front = BlkFrontend(
            memory: BlkFrontendMemory(grants: memory), grants: issuer, capacitySectors: info.sectors)
        guard let ringRef = issuer.grant(frame: 0, readOnly: false) else { throw .setup("no grant ref for the ring") }
        let mine = XenStoreNode([
            "state": "\(XenbusState.initialised.rawValue)", "ring-ref": "\(ringRef)", "event-channel": "1",
            "protocol": "x86_64-abi", "grant-entries": "\(grantEntries)", "grant-frames": "\(frameCount)",
        ])
        try channel.sendNode(
            mine,
            descriptors: [table.fileDescriptor, frames.fileDescriptor, toBack.fileDescriptor, fromBack.fileDescriptor],
            until: deadline)
        let (reply, _) = try channel.receiveNode(maxDescriptors: 0, until: deadline)
        let state: XenbusState
        do { state = try reply.state() } catch { throw .violation(error) }
        guard state == .connected else {
            throw .violation(.xenHandshakeState(expected: XenbusState.connected.rawValue, got: state.rawValue))
        }
        return XenBlkFrontendDevice(
            info: info, front: front, events: EventChannel(incoming: fromBack, outgoing: toBack),
            channel: channel, table: table, frames: frames)
    }

    init(
        info: XenBlkInfo, front: BlkFrontend, events: EventChannel, channel: UnixChannel, table: SharedRegion,
        frames: SharedRegion
    ) {
        self.info = info
        self.front = front
        self.events = events
        self.channel = channel
        self.table = table
        self.frames = frames
    }

    public var violation: Violation? { front.violation }

    // MARK: blocking requests

    public func read(sector: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(XenBlkError) {
        let token = takeToken()
        do { try front.submitRead(sector: sector, into: buffer, token: token) } catch { throw submitError(error) }
        try complete(token)
    }

    public func write(sector: UInt64, from data: UnsafeRawBufferPointer) throws(XenBlkError) {
        let token = takeToken()
        do { try front.submitWrite(sector: sector, from: data, token: token) } catch { throw submitError(error) }
        try complete(token)
    }

    public func flush() throws(XenBlkError) {
        let token = takeToken()
        do { try front.submitFlush(token: token) } catch { throw submitError(error) }
        try complete(token)
    }

    public func discard(sector: UInt64, sectors: UInt64) throws(XenBlkError) {
        let token = takeToken()
        do { try front.submitDiscard(sector: sector, sectors: sectors, token: token) } catch {
            throw submitError(error)
        }
        try complete(token)
    }

    func takeToken() -> UInt64 {
        defer { nextToken &+= 1 }
        return nextToken
    }

    func submitError(_ e: BlkSubmitError) -> XenBlkError {
        if case .broken(let v) = e { return .broken(v) }
        return .submit(e)
    }

    func complete(_ token: UInt64) throws(XenBlkError) {
        kick()
        let deadline = Deadline.after(seconds: timeout)  // clamps NaN/negative/huge values
        while true {
            let batch = try waitForCompletions(until: deadline)
            for c in batch where c.token == token {
                guard c.status == .okay else { throw .status(c.status) }
                return
            }
        }
    }

    /// Publishes posted requests and notifies the backend if it asked (R1: decided from
    /// private state).
    public func kick() {
        if front.publish() && !events.notify() { _ = disable(.notifierBlocked(role: "event channel")) }
    }

    /// Waits for at least one completion until `deadline`. On a violation or a timeout
    /// the device is disabled (R6): the event channel is masked and every in-flight
    /// request is failed (`failedTokens`).
    public func waitForCompletions(until deadline: Deadline) throws(XenBlkError) -> [BlkCompletion] {
        var woke = false
        while true {
            var batch: [BlkCompletion] = []
            while let c = try nextCompletionOrDisable() { batch.append(c) }
            if woke {
                events.noteWake(productive: !batch.isEmpty)
                woke = false
            }
            if !batch.isEmpty { return batch }
            if front.enableNotifications() { continue }
            try checkDeadline(deadline)
            woke = events.wait(until: deadline)
        }
    }

    /// `front.nextCompletion()`, disabling the device on a violation.
    @inline(__always)
    func nextCompletionOrDisable() throws(XenBlkError) -> BlkCompletion? {
        do { return try front.nextCompletion() } catch { throw .broken(disable(error)) }
    }

    /// A wait past its deadline disables the device (R5: the backend stopped answering).
    func checkDeadline(_ deadline: Deadline) throws(XenBlkError) {
        if deadline.hasPassed {
            throw .broken(disable(.deadlineExceeded(milliseconds: UInt64(timeout * 1000))))
        }
    }

    func disable(_ v: Violation) -> Violation {
        let first = front.disable(v)
        events.mask()
        failedTokens += front.failAll()
        return first
    }

    /// Closing → Closed, then drops the channel.
    public func disconnect() {
        let deadline = Deadline.after(seconds: 2)
        do {
            try channel.sendNode(XenStoreNode(["state": "\(XenbusState.closing.rawValue)"]), until: deadline)
            _ = try channel.receiveNode(maxDescriptors: 0, until: deadline)
        } catch {}
        channel.shutdown()
    }
}

/// What a backend did with a malformed request (an audit of the backend).
public enum XenAuditOutcome: Equatable, Sendable, CustomStringConvertible {
    /// Failed the request (the expected answer to a bad request).
    case refused(BlkStatus)
    /// Answered OKAY: the backend accepted a request it must refuse.
    case accepted
    /// Dropped the connection (the expected answer to a corrupt ring).
    case dropped
    /// Neither answered nor dropped within the deadline.
    case silent

    public var description: String {
        switch self {
        case .refused(let s): return "refused (\(s))"
        case .accepted: return "ACCEPTED"
        case .dropped: return "connection dropped"
        case .silent: return "no answer"
        }
    }
}

extension XenBlkFrontendDevice {
    /// Sends one frontend attack (`XenFrontendAttack`) and reports how the backend
    /// reacted. Audit tool: the device is unusable afterwards for a ring corruption.
    public func audit(_ attack: XenFrontendAttack) -> XenAuditOutcome {
        let token = takeToken()
        do { try front.postMalformed(attack, token: token) } catch { return .silent }
        if attack == .requestProducerJump {
            events.notify()
            // The backend must drop the connection: the channel becomes readable (EOF).
            do { try channel.waitReadable(until: .after(seconds: timeout)) } catch { return .silent }
            return .dropped
        }
        kick()
        do {
            for c in try waitForCompletions(until: .after(seconds: timeout)) where c.token == token {
                return c.status == .okay ? .accepted : .refused(c.status)
            }
        } catch {
            return .silent
        }
        return .silent
    }
}

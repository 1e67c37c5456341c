public import SharedMemory

/// Why a block request failed.
public enum XenBlkError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The device is disabled for further use (R6); every in-flight request fails so.
    case broken(XenViolation)
    /// The request could not be posted (refused locally, or no room).
    case submit(BlkSubmitError)
    /// The backend answered ERROR or EOPNOTSUPP.
    case status(BlkStatus)

    /// One line; a disabled device names the rule.
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
    /// The disk as the backend announced it (validated and clamped).
    public let info: XenBlkInfo
    /// The hardened ring end.
    public let front: BlkFrontend
    /// The event channel to and from the backend.
    public let events: EventChannel
    let channel: UnixChannel
    let table: SharedRegion
    let frames: SharedRegion
    /// Seconds a request may take before the device is declared dead (R5); values
    /// outside (0, 3600] (or NaN) fall back to 5 so no conversion of it can trap.
    public var timeout: Double = 5 {
        didSet { if !(timeout > 0 && timeout <= 3600) { timeout = 5 } }
    }
    /// How a wait for completions is spent (issue 19): `.adaptive` (default) polls the
    /// ring for a time that adapts, then blocks on the event channel; `.poll` never blocks
    /// (the deadline still holds); `.spin(nanoseconds:)` polls that long; `.interrupts`
    /// blocks at once.
    public var wait: WaitStrategy = .adaptive {
        didSet { spin = AdaptiveSpin(wait) }
    }
    @usableFromInline var spin = AdaptiveSpin(.adaptive)
    private var nextToken: UInt64 = 1
    /// Tokens failed by `failAll` after a violation, for callers that keep their own.
    public private(set) var failedTokens: [UInt64] = []

    /// Grant entries (one page of v1 entries) and frames (ring + 11 pages per slot).
    public static let grantEntries = 512
    /// Frames shared: the ring page plus 11 bounce pages per ring slot.
    public static let frameCount = 1 + BlkifLayout.ringSize * BlkifLayout.maxSegments

    /// Runs the frontend half of the handshake on `channel`: reads the backend's node
    /// (values clamped), shares the grant table, frames and eventfds, waits for Connected.
    public static func connect(channel: UnixChannel, until deadline: Deadline = .after(seconds: 10))
        throws(XenConnectError) -> XenBlkFrontendDevice
    {
        let (node, _) = try channel.receiveNode(maxDescriptors: 0, until: deadline)
        let info: XenBlkInfo
        do { info = try XenBlkInfo.validate(node) } catch { throw .violation(error) }
        let shares = try FrontendShares(label: "xen", grantEntries: grantEntries, frameCount: frameCount)
        let memory = shares.memory
        let issuer = GrantIssuer(memory: memory)
        let front = BlkFrontend(
            memory: BlkFrontendMemory(grants: memory), grants: issuer, capacitySectors: info.sectors)
        guard let ringRef = issuer.grant(frame: 0, readOnly: false) else { throw .setup("no grant ref for the ring") }
        let mine = XenStoreNode([
            "state": "\(XenbusState.initialised.rawValue)", "ring-ref": "\(ringRef)", "event-channel": "1",
            "protocol": "x86_64-abi", "grant-entries": "\(grantEntries)", "grant-frames": "\(frameCount)",
        ])
        try shares.announce(mine, on: channel, until: deadline)
        return XenBlkFrontendDevice(
            info: info, front: front, events: shares.events,
            channel: channel, table: shares.table, frames: shares.frames)
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

    /// The backend's first violation, if the device is disabled.
    public var violation: XenViolation? { front.violation }

    // MARK: blocking requests

    /// Reads `buffer.count` bytes (a multiple of 512, at most 11 pages) at `sector`, blocking until the deadline.
    public func read(sector: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(XenBlkError) {
        let token = takeToken()
        do { try front.submitRead(sector: sector, into: buffer, token: token) } catch { throw submitError(error) }
        try complete(token)
    }

    /// Writes `data` (a multiple of 512, at most 11 pages) at `sector`, blocking until the deadline.
    public func write(sector: UInt64, from data: UnsafeRawBufferPointer) throws(XenBlkError) {
        let token = takeToken()
        do { try front.submitWrite(sector: sector, from: data, token: token) } catch { throw submitError(error) }
        try complete(token)
    }

    /// BLKIF_OP_FLUSH_DISKCACHE, blocking until the deadline.
    public func flush() throws(XenBlkError) {
        let token = takeToken()
        do { try front.submitFlush(token: token) } catch { throw submitError(error) }
        try complete(token)
    }

    /// Discards `sectors` sectors at `sector` (blkif_request_discard), blocking until the deadline.
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

    @usableFromInline
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
            if let c = try spinForCompletion(until: deadline) { return [c] }
            if front.enableNotifications() { continue }
            try checkDeadline(deadline)
            woke = blockForEvent(until: deadline)
        }
    }

    /// `front.nextCompletion()`, disabling the device on a violation.
    @inlinable @inline(__always)
    func nextCompletionOrDisable() throws(XenBlkError) -> BlkCompletion? {
        do { return try front.nextCompletion() } catch { throw .broken(disable(error)) }
    }

    /// Polls the ring for the current spin (`wait`); nil when the spin ended without a
    /// completion. Under `.poll` it returns only with a completion or a passed deadline.
    func spinForCompletion(until deadline: Deadline) throws(XenBlkError) -> BlkCompletion? {
        let limit = spin.limit
        if limit == 0 { return nil }
        let start = monotonicNanoseconds()
        while true {
            if let c = try nextCompletionOrDisable() { return c }
            let now = monotonicNanoseconds()
            if now &- start >= limit { return nil }
            if deadline.hasPassed { try checkDeadline(deadline) }
        }
    }

    /// Blocks on the event channel until `deadline`; tells the adaptive spin how long it took.
    func blockForEvent(until deadline: Deadline) -> Bool {
        let start = monotonicNanoseconds()
        let woke = events.wait(until: deadline)
        spin.noteBlock(nanoseconds: monotonicNanoseconds() &- start, productive: woke)
        return woke
    }

    /// A wait past its deadline disables the device (R5: the backend stopped answering).
    func checkDeadline(_ deadline: Deadline) throws(XenBlkError) {
        if deadline.hasPassed {
            throw .broken(disable(.deadlineExceeded(milliseconds: UInt64(timeout * 1000))))
        }
    }

    @usableFromInline
    func disable(_ v: XenViolation) -> XenViolation {
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

// MARK: requests in flight

extension XenBlkFrontendDevice {
    /// Posts a read of `buffer.count` bytes at `sector` without waiting; its completion
    /// carries `token`. `kick()` publishes it. For callers that keep several requests in
    /// flight (the benchmark); `read` is the blocking form. Inlinable, like `poll`: the
    /// benchmark loop calls them from another module once per request.
    @inlinable
    public func submitRead(sector: UInt64, into buffer: UnsafeMutableRawBufferPointer, token: UInt64)
        throws(XenBlkError)
    {
        do { try front.submitRead(sector: sector, into: buffer, token: token) } catch { throw submitError(error) }
    }

    /// Posts a write of `data` at `sector` without waiting (see `submitRead`).
    @inlinable
    public func submitWrite(sector: UInt64, from data: UnsafeRawBufferPointer, token: UInt64) throws(XenBlkError) {
        do { try front.submitWrite(sector: sector, from: data, token: token) } catch { throw submitError(error) }
    }

    /// Posts a flush without waiting (see `submitRead`).
    public func submitFlush(token: UInt64) throws(XenBlkError) {
        do { try front.submitFlush(token: token) } catch { throw submitError(error) }
    }

    /// The next validated completion if one is ready; never blocks. A violation disables
    /// the device (R6) and is thrown.
    @inlinable
    public func poll() throws(XenBlkError) -> BlkCompletion? {
        try nextCompletionOrDisable()
    }

    /// Waits for the next completion, at most `timeout` seconds (then the device is
    /// disabled, R5); nil when nothing is in flight. Wake-ups without a response are
    /// counted and backed off (R5).
    public func waitForCompletion() throws(XenBlkError) -> BlkCompletion? {
        var deadline: Deadline?
        var woke = false
        while true {
            let completion = try nextCompletionOrDisable()
            if woke {
                events.noteWake(productive: completion != nil)
                woke = false
            }
            if let completion { return completion }
            if front.inFlightCount == 0 { return nil }
            // Read the clock only once waiting starts: per completion it would cost more
            // than the checks themselves.
            let until = deadline ?? .after(seconds: timeout)
            deadline = until
            if let c = try spinForCompletion(until: until) { return c }
            if front.enableNotifications() { continue }
            try checkDeadline(until)
            woke = blockForEvent(until: until)
        }
    }

    /// True once the backend closed the connection before `deadline` (what it must do
    /// after a corrupt ring).
    public func waitForDisconnect(until deadline: Deadline) -> Bool {
        do { try channel.waitReadable(until: deadline) } catch { return false }
        return true
    }
}

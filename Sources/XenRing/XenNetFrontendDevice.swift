public import SharedMemory

/// Why a netif operation failed.
public enum XenNetError: Error, Equatable, CustomStringConvertible {
    /// The device is disabled for further use (R6).
    case broken(XenViolation)
    case submit(NetSubmitError)

    public var description: String {
        switch self {
        case .broken(let v): return "device disabled: \(v)"
        case .submit(let e): return e.description
        }
    }
}

/// What one `XenNetFrontendDevice.exchange` pass did.
public struct NetExchange: Sendable, Equatable {
    /// Tx completions reaped (counted in `txCompleted`, failed ones in `txFailed`).
    public let reaped: Int
    /// Frames posted: the first `sent` of the ones given, with tokens `firstToken ..<
    /// firstToken + sent`.
    public let sent: Int
    /// Frames received: `results[0..<received]`.
    public let received: Int

    public init(reaped: Int, sent: Int, received: Int) {
        self.reaped = reaped
        self.sent = sent
        self.received = received
    }

    /// Something was reaped, sent or received: call again before waiting.
    public var progressed: Bool { reaped > 0 || sent > 0 || received > 0 }
}

/// A connected netif frontend: handshake, shared memory, one event channel for both
/// rings, and the hardened `NetFrontend`, with sends and deadline-bounded receives.
///
/// Owns its grant table and frames (two sealed memfds, R7) and its eventfds. One owner at
/// a time.
public final class XenNetFrontendDevice {
    public let info: XenNetInfo
    public let front: NetFrontend
    public let events: EventChannel
    let channel: UnixChannel
    let table: SharedRegion
    let frames: SharedRegion
    /// Seconds a wait may take before the device is declared dead (R5); values outside
    /// (0, 3600] fall back to 5.
    public var timeout: Double = 5 {
        didSet { if !(timeout > 0 && timeout <= 3600) { timeout = 5 } }
    }
    /// Tokens failed by `failAll` after a violation.
    public private(set) var failedTokens: [UInt64] = []
    /// Tx completions reaped while waiting for something else.
    @exclusivity(unchecked) public private(set) var txCompleted = 0
    @exclusivity(unchecked) public private(set) var txFailed = 0

    /// Grant entries (one page) and frames: the two rings, 128 rx and 128 tx pages.
    public static let grantEntries = 512
    public static let frameCount = 2 + 128 + 128

    /// Runs the frontend half of the handshake on `channel`: validates the backend's
    /// node, shares the grant table, frames and eventfds, waits for Connected.
    public static func connect(channel: UnixChannel, until deadline: Deadline = .after(seconds: 10))
        throws(XenConnectError) -> XenNetFrontendDevice
    {
        let (node, _) = try channel.receiveNode(maxDescriptors: 0, until: deadline)
        let info: XenNetInfo
        do { info = try XenNetInfo.validate(node) } catch { throw .violation(error) }
        let shares = try FrontendShares(label: "xen-net", grantEntries: grantEntries, frameCount: frameCount)
        let memory = shares.memory
        let issuer = GrantIssuer(memory: memory)
        let front = NetFrontend(memory: NetFrontendMemory(grants: memory), grants: issuer, rxPages: 128)
        guard let txRef = issuer.grant(frame: 0, readOnly: false), let rxRef = issuer.grant(frame: 1, readOnly: false)
        else { throw .setup("no grant refs for the rings") }
        let mine = XenStoreNode([
            "state": "\(XenbusState.initialised.rawValue)", "tx-ring-ref": "\(txRef)", "rx-ring-ref": "\(rxRef)",
            "event-channel": "1", "request-rx-copy": "1", "feature-rx-notify": "1", "feature-sg": "1",
            "feature-gso-tcpv4": info.gsoTCPv4 ? "1" : "0", "multi-queue-num-queues": "1", "protocol": "x86_64-abi",
            "grant-entries": "\(grantEntries)", "grant-frames": "\(frameCount)",
        ])
        try shares.announce(mine, on: channel, until: deadline)
        let device = XenNetFrontendDevice(
            info: info, front: front, events: shares.events,
            channel: channel, table: shares.table, frames: shares.frames)
        device.front.refillRx()
        device.kick()
        return device
    }

    /// Private room for one batch of tx completions (`reapTx`).
    let txBatch = UnsafeMutableBufferPointer<NetTxCompletion>.allocate(capacity: NetifLayout.txRingSize)

    init(
        info: XenNetInfo, front: NetFrontend, events: EventChannel, channel: UnixChannel, table: SharedRegion,
        frames: SharedRegion
    ) {
        self.info = info
        self.front = front
        self.events = events
        self.channel = channel
        self.table = table
        self.frames = frames
    }

    deinit { txBatch.deallocate() }

    public var violation: XenViolation? { front.violation }

    /// Posts one frame (bounced now); `kick()` publishes it. GSO only if the backend
    /// offered it.
    public func submit(_ frame: UnsafeRawBufferPointer, token: UInt64, gso: NetGSO? = nil) throws(XenNetError) {
        do { try front.submit(frame: frame, token: token, gso: info.gsoTCPv4 ? gso : nil) } catch {
            if case .broken(let v) = error { throw .broken(v) }
            throw .submit(error)
        }
    }

    /// Posts up to `frames.count` frames (bounced now, frame `i` with token
    /// `firstToken &+ i`; `NetFrontend.submitBatch`); returns how many, 0 when the ring or
    /// the bounce pages are full. `kick()` publishes them.
    public func submitBatch(_ frames: UnsafeBufferPointer<UnsafeRawBufferPointer>, firstToken: UInt64)
        throws(XenNetError) -> Int
    {
        do { return try front.submitBatch(frames, firstToken: firstToken) } catch {
            if case .broken(let v) = error { throw .broken(v) }
            throw .submit(error)
        }
    }

    /// Sends one frame, reaping completions (waiting, within the deadline) while the ring
    /// or the bounce pages are full.
    public func send(_ frame: UnsafeRawBufferPointer, token: UInt64 = 0) throws(XenNetError) {
        let deadline = Deadline.after(seconds: timeout)
        while true {
            do {
                try submit(frame, token: token)
                kick()
                return
            } catch .submit(.full), .submit(.noBounceSpace) {
                try waitForTx(until: deadline)
            }
        }
    }

    /// Publishes both rings (tx frames, refilled rx pages), notifying once if asked.
    public func kick() {
        var notify = front.publishTx()
        front.refillRx()
        notify = front.publishRx() || notify
        if notify && !events.notify() { _ = disable(.notifierBlocked(role: "event channel")) }
    }

    /// Reaps every tx completion published so far (in batches, `NetFrontend.reapTxBatch`);
    /// returns how many. Completions before a bad response are counted, then it throws.
    @discardableResult
    public func reapTx() throws(XenNetError) -> Int {
        var n = 0
        while true {
            let got = try call({ () throws(XenViolation) in try front.reapTxBatch(into: txBatch) })
            if got == 0 { return n }
            for i in 0..<got where txBatch[i].status != .okay { txFailed += 1 }
            n += got
            txCompleted += got
            if front.isBroken {
                _ = try call({ () throws(XenViolation) in try front.reapTxBatch(into: txBatch) })  // throws
            }
        }
    }

    /// Waits until at least one tx completion arrives (R5: deadline, storms backed off).
    public func waitForTx(until deadline: Deadline) throws(XenNetError) {
        var woke = false
        while true {
            let n = try reapTx()
            if woke {
                events.noteWake(productive: n > 0)
                woke = false
            }
            if n > 0 { return }
            if front.enableNotifications() { continue }
            try checkDeadline(deadline)
            woke = events.wait(until: deadline)
        }
    }

    /// The next received frame (copied into `buffer`), waiting until `deadline`; tx
    /// completions are reaped meanwhile and rx pages re-posted. A timeout here is the
    /// caller's (nil): a quiet network is not a fault.
    public func receive(into buffer: UnsafeMutableRawBufferPointer, until deadline: Deadline) throws(XenNetError)
        -> NetReceivedFrame?
    {
        var woke = false
        while true {
            let reaped = try reapTx()
            let frame = try call({ () throws(XenViolation) in try front.nextReceived(into: buffer) })
            if woke {
                events.noteWake(productive: reaped > 0 || frame != nil)
                woke = false
            }
            if let frame {
                kick()  // re-post the pages just freed
                return frame
            }
            if reaped > 0 { continue }
            if front.enableNotifications() { continue }
            if deadline.hasPassed { return nil }
            woke = events.wait(until: deadline)
        }
    }

    /// The next received frame if one is ready; never blocks. (`kick()` re-posts pages.)
    public func poll(into buffer: UnsafeMutableRawBufferPointer) throws(XenNetError) -> NetReceivedFrame? {
        try call({ () throws(XenViolation) in try front.nextReceived(into: buffer) })
    }

    /// The received frames ready now, up to `results.count`, in one call
    /// (`NetFrontend.receiveBatch`: frame `i` into `buffer` at `i * stride`, `stride` 0
    /// for all into the whole buffer); never blocks, returns how many (`kick()` re-posts
    /// pages). After a bad response the frames before it are returned and the device is
    /// disabled (R6, its in-flight tokens failed): the next call throws.
    public func pollBatch(
        into buffer: UnsafeMutableRawBufferPointer, stride: Int, results: UnsafeMutableBufferPointer<NetReceivedFrame>
    ) throws(XenNetError) -> Int {
        let n = try call({ () throws(XenViolation) in
            try front.receiveBatch(into: buffer, stride: stride, results: results)
        })
        if front.isBroken, let v = front.violation { _ = disable(v) }
        return n
    }

    /// One pass of a send-and-receive loop in the order that keeps the backend busy (as
    /// Linux's netfront under NAPI: the backend is never left waiting for the frontend's
    /// copy-out): the tx completions published so far are reaped (`reapTx`), up to
    /// `frames.count` frames are posted while fewer than `inFlightLimit` are in flight
    /// (`submitBatch`, frame `i` with token `firstToken &+ i`), both rings are published and
    /// the backend notified (`kick`: the rx pages copied out by earlier calls are posted
    /// again), and only then are the received frames copied out (`pollBatch`: up to
    /// `results.count`, frame `i` into `buffer` at `i * stride`), while the backend works on
    /// what was just posted. Never blocks: when nothing was reaped, sent or received
    /// (`NetExchange.progressed` false), wait with `waitForWork` before the next call.
    ///
    /// Every check of the calls it is made of holds. An rx page is posted again only after
    /// its frame was copied out: the pages whose responses arrived but are not copied yet
    /// are not in the pool the kick posts from (R7), so the backend never gets a page that
    /// is still being read. A bad tx completion throws before anything is posted (the
    /// frames of this call stay the caller's: `sent` is 0); a bad rx response in the receive
    /// phase disables the device with every frame in flight failed (`failedTokens`, this
    /// call's among them) and, in the middle of a batch, returns the frames before it
    /// (copied, `received`) so that the next call throws the violation, or throws it now
    /// when it is the first. A frame of invalid length throws `.submit(.invalidLength)` if
    /// it is the first to post, as `submitBatch` does.
    public func exchange(
        sending frames: UnsafeBufferPointer<UnsafeRawBufferPointer>, firstToken: UInt64, inFlightLimit: Int,
        into buffer: UnsafeMutableRawBufferPointer, stride: Int, results: UnsafeMutableBufferPointer<NetReceivedFrame>
    ) throws(XenNetError) -> NetExchange {
        let reaped = try reapTx()
        let room = min(frames.count, inFlightLimit &- front.txFramesInFlight)
        var sent = 0
        if room > 0 { sent = try submitBatch(UnsafeBufferPointer(rebasing: frames[0..<room]), firstToken: firstToken) }
        kick()
        let received = try pollBatch(into: buffer, stride: stride, results: results)
        return NetExchange(reaped: reaped, sent: sent, received: received)
    }

    /// Waits until the backend publishes a response on either ring, at most until
    /// `deadline` (then the device is disabled, R5); a wake-up without one is counted and
    /// backed off.
    public func waitForWork(until deadline: Deadline) throws(XenNetError) {
        while true {
            if front.enableNotifications() { return }
            try checkDeadline(deadline)
            if events.wait(until: deadline) {
                let productive = front.enableNotifications()
                events.noteWake(productive: productive)
                if productive { return }
            }
        }
    }

    /// A ring call, disabling the device on a violation (R6).
    func call<T>(_ body: () throws(XenViolation) -> T) throws(XenNetError) -> T {
        do { return try body() } catch { throw .broken(disable(error)) }
    }

    func checkDeadline(_ deadline: Deadline) throws(XenNetError) {
        if deadline.hasPassed {
            throw .broken(disable(.deadlineExceeded(milliseconds: UInt64(timeout * 1000))))
        }
    }

    func disable(_ v: XenViolation) -> XenViolation {
        let first = front.disable(v)
        events.mask()
        failedTokens += front.failAll()
        return first
    }

    /// True once the backend closed the connection before `deadline` (what it does after
    /// a corrupt ring).
    public func waitForDisconnect(until deadline: Deadline) -> Bool {
        do { try channel.waitReadable(until: deadline) } catch { return false }
        return true
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

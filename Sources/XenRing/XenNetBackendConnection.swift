#if canImport(Glibc)
import Glibc
#endif
public import SharedMemory
import Synchronization

/// Where the frames a netback takes off a frontend's tx ring go.
public enum XenNetMode: String, Sendable, CaseIterable {
    /// Back to the same frontend (its rx ring).
    case loopback
    /// To the other frontends of the same `XenNetSwitch` (learning the source MACs).
    case `switch`
    /// Nowhere (counted).
    case sink
}

/// Frames waiting for a frontend's rx ring: bounded (R5), the oldest kept, the newest
/// dropped when full. Shared between connection threads in switch mode.
public final class XenNetPort: Sendable {
    public static let capacity = 256
    let queue = Mutex<[[UInt8]]>([])
    /// Frames queued, readable without the lock (the loopback hot path checks it per frame).
    let queued = Atomic<Int>(0)
    let droppedCount = Atomic<Int>(0)

    public init() {}

    public var dropped: Int { droppedCount.load(ordering: .relaxed) }

    func enqueue(_ frame: [UInt8]) {
        let accepted = queue.withLock { q in
            guard q.count < Self.capacity else { return false }
            q.append(frame)
            queued.store(q.count, ordering: .relaxed)
            return true
        }
        if !accepted { droppedCount.add(1, ordering: .relaxed) }
    }

    func takeAll() -> [[UInt8]] {
        queue.withLock { q in
            defer {
                q = []
                queued.store(0, ordering: .relaxed)
            }
            return q
        }
    }

    func putBack(_ frames: [[UInt8]]) {
        queue.withLock { q in
            q.insert(contentsOf: frames, at: 0)
            queued.store(q.count, ordering: .relaxed)
        }
    }

    var isEmpty: Bool { queued.load(ordering: .relaxed) == 0 }
}

/// A learning switch between the frontends served in switch mode: a frame goes to the
/// port that last sent from its destination MAC, or to every other port.
public final class XenNetSwitch: Sendable {
    let state = Mutex<(ports: [ObjectIdentifier: XenNetPort], macs: [[UInt8]: ObjectIdentifier])>(([:], [:]))

    public init() {}

    func attach(_ port: XenNetPort) { state.withLock { $0.ports[ObjectIdentifier(port)] = port } }

    func detach(_ port: XenNetPort) {
        let id = ObjectIdentifier(port)
        state.withLock { s in
            s.ports[id] = nil
            s.macs = s.macs.filter { $0.value != id }
        }
    }

    func forward(_ frame: [UInt8], from port: XenNetPort) {
        guard frame.count >= 12 else { return }
        let source = ObjectIdentifier(port)
        let targets: [XenNetPort] = state.withLock { s in
            let src = Array(frame[6..<12])
            if src[0] & 1 == 0, s.macs.count < 4096 || s.macs[src] != nil { s.macs[src] = source }
            if let id = s.macs[Array(frame[0..<6])], id != source, let p = s.ports[id] { return [p] }
            return s.ports.filter { $0.key != source }.map(\.value)
        }
        for t in targets { t.enqueue(frame) }
    }
}

/// One netif frontend served by the hardened backend: the backend half of the handshake
/// (the frontend's values and memfds are checked), then the frame loop until the frontend
/// closes, goes quiet, or corrupts a ring (this connection dropped, R6; others go on).
public final class XenNetBackendConnection {
    public let backend: NetBackend
    public let events: EventChannel
    public let mode: XenNetMode
    public let port = XenNetPort()
    let hub: XenNetSwitch?
    let channel: UnixChannel
    let table: SharedRegion
    let frames: SharedRegion
    let ringRefs: (UInt32, UInt32)
    /// Frames taken off tx per round before rx and the event channel get a turn (R5: a
    /// frontend flooding tx cannot starve the rest of the loop).
    public static let txBudget = 64

    public static func accept(
        channel: UnixChannel, mode: XenNetMode = .loopback, hub: XenNetSwitch? = nil,
        info: XenNetInfo = XenNetInfo(), hooks: (any XenNetBackendHooks)? = nil,
        until deadline: Deadline = .after(seconds: 10)
    ) throws(XenConnectError) -> XenNetBackendConnection {
        var node = info.node
        hooks?.willAnnounce(&node)
        try channel.sendNode(node, until: deadline)
        let (theirs, fds) = try channel.receiveNode(maxDescriptors: 4, until: deadline)
        guard fds.count == 4 else { throw .setup("expected 4 descriptors, got \(fds.count)") }
        let request: XenNetFrontendRequest
        do { request = try XenNetFrontendRequest.validate(theirs) } catch { throw .violation(error) }
        let table: SharedRegion
        let frames: SharedRegion
        let events: EventChannel
        do {
            // Adopted once each; sizes and seals checked by SharedRegion, eventfds by
            // Notifier (R3, R4, R5), as for blkif.
            guard let t = fds.take(0), let f = fds.take(1), let incoming = fds.take(2), let outgoing = fds.take(3)
            else { throw XenConnectError.setup("descriptors missing") }
            table = try SharedRegion(mapping: t, offset: 0, size: request.entries * UInt64(GrantLayout.entrySize))
            frames = try SharedRegion(
                mapping: f, offset: 0, size: request.frames * UInt64(SharedRingLayout.pageSize))
            events = EventChannel(
                incoming: try Notifier(adopting: incoming), outgoing: try Notifier(adopting: outgoing))
        } catch let e as XenConnectError {
            throw e
        } catch { throw .setup("\(error)") }
        let memory = GrantTableMemory(
            entries: table.base, entryCount: Int(request.entries), frames: frames.base,
            frameCount: Int(request.frames))
        let mapper = GrantMapper(memory: memory)
        let txRing: UnsafeMutableRawPointer
        let rxRing: UnsafeMutableRawPointer
        do throws(XenViolation) { txRing = try mapper.map(request.txRingRef, write: true) } catch {
            throw .violation(error)
        }
        do throws(XenViolation) { rxRing = try mapper.map(request.rxRingRef, write: true) } catch {
            mapper.unmap(request.txRingRef, write: true)
            throw .violation(error)
        }
        guard txRing != rxRing else {
            mapper.unmap(request.txRingRef, write: true)
            mapper.unmap(request.rxRingRef, write: true)
            throw .violation(.xenHandshakeValue(key: "rx-ring-ref", value: "same page as tx-ring-ref"))
        }
        let backend = NetBackend(txRing: txRing, rxRing: rxRing, mapper: mapper)
        backend.hooks = hooks
        // Attached to the switch before the frontend hears Connected, so a frame sent to
        // it right after its handshake is not flooded past it.
        let connection = XenNetBackendConnection(
            backend: backend, events: events, mode: mode, hub: mode == .switch ? (hub ?? XenNetSwitch()) : nil,
            channel: channel, table: table, frames: frames, ringRefs: (request.txRingRef, request.rxRingRef))
        try channel.sendNode(XenStoreNode(["state": "\(XenbusState.connected.rawValue)"]), until: deadline)
        return connection
    }

    init(
        backend: NetBackend, events: EventChannel, mode: XenNetMode, hub: XenNetSwitch?, channel: UnixChannel,
        table: SharedRegion, frames: SharedRegion, ringRefs: (UInt32, UInt32)
    ) {
        self.backend = backend
        self.events = events
        self.mode = mode
        self.hub = hub
        self.channel = channel
        self.table = table
        self.frames = frames
        self.ringRefs = ringRefs
        hub?.attach(port)
    }

    deinit {
        hub?.detach(port)
        backend.mapper.unmap(ringRefs.0, write: true)
        backend.mapper.unmap(ringRefs.1, write: true)
    }

    /// How a connection ended.
    public enum End: Equatable, Sendable {
        case closed
        case idle
        case dropped(XenViolation)
    }

    /// Frames delivered by the frontend, by mode.
    @exclusivity(unchecked) public private(set) var framesReceived = 0
    @exclusivity(unchecked) public private(set) var bytesReceived = 0

    /// Serves until the frontend closes, hangs up, does no work for `idleTimeout` seconds,
    /// or corrupts a ring (dropped). Wake-ups without work are backed off with the shared
    /// `WakeBackoff` policy (R5), as for blkif. `observe` runs on this thread after every
    /// productive pass (`idle` false) and once each time the rings go quiet (`idle` true):
    /// live counters, with `backend`'s and this connection's counts settled then.
    public func run(idleTimeout: Double = 30, observe: ((XenNetBackendConnection, _ idle: Bool) -> Void)? = nil) -> End
    {
        var observedIdle = true
        let idleNanoseconds = UInt64(max(0.001, min(idleTimeout.isNaN ? 30 : idleTimeout, 3600)) * 1e9)
        var lastWork = monotonicNanoseconds()
        var spins = 0
        var woke = false
        while true {
            let n: Int
            let sent: Int
            var sendFailure: XenViolation?
            do throws(XenViolation) {
                n = try backend.serveTx(budget: Self.txBudget) { frame in
                    framesReceived += 1
                    bytesReceived += frame.bytes.count
                    switch mode {
                    case .loopback:
                        // Straight back into a posted rx page when nothing is queued (no copy
                        // of our own); queued otherwise, in order.
                        if port.isEmpty && sendFailure == nil {
                            do throws(XenViolation) {
                                if try backend.send(frame.bytes, gso: frame.gso) != .noBuffers { return }
                            } catch {
                                sendFailure = error
                                return
                            }
                        }
                        port.enqueue(Array(frame.bytes))
                    case .switch: hub?.forward(Array(frame.bytes), from: port)
                    case .sink: break
                    }
                }
                if let sendFailure { throw sendFailure }
                sent = try flushPort()
            } catch { return drop(error) }
            if woke {
                events.noteWake(productive: n > 0 || sent > 0)
                woke = false
            }
            if n > 0 || sent > 0 {
                spins = 0
                lastWork = monotonicNanoseconds()
                backend.hooks?.didServe(self, frames: n + sent)
                if backend.publishResponses() && !events.notify() {
                    return drop(.notifierBlocked(role: "event channel"))
                }
                observe?(self, false)
                observedIdle = false
                continue
            }
            spins += 1
            if spins < 64 { continue }
            if !observedIdle {
                observe?(self, true)
                observedIdle = true
            }
            if backend.enableNotifications() { continue }
            let idleDeadline = Deadline(uptimeNanoseconds: lastWork &+ idleNanoseconds)
            if idleDeadline.hasPassed { return .idle }
            events.backoff.pause(until: idleDeadline)
            // In switch mode frames from other ports arrive without an event of ours: look
            // again within 2 ms.
            let until = mode == .switch ? min(idleDeadline, .after(nanoseconds: 2_000_000)) : idleDeadline
            switch EventWaiter.wait(for: events.incoming, orReadable: channel.fileDescriptor, until: until) {
            case .other: return close()
            case .notified: woke = true
            case .timedOut: break
            }
            spins = 0
        }
    }

    /// Sends queued frames into posted rx pages; the rest waits for more pages.
    func flushPort() throws(XenViolation) -> Int {
        if port.isEmpty { return 0 }
        var frames = port.takeAll()
        var sent = 0
        while let next = frames.first {
            var result = NetSendResult.noBuffers
            var failure: XenViolation?
            next.withUnsafeBytes { b in
                do throws(XenViolation) { result = try backend.send(b) } catch { failure = error }
            }
            if let failure { throw failure }
            if result == .noBuffers { break }
            frames.removeFirst()
            sent += 1
        }
        if !frames.isEmpty { port.putBack(frames) }
        return sent
    }

    /// R6 on the backend side: this connection ends, the process goes on.
    func drop(_ violation: XenViolation) -> End {
        events.mask()
        channel.shutdown()
        return .dropped(violation)
    }

    func close() -> End {
        let deadline = Deadline.after(seconds: 2)
        if let (node, _) = try? channel.receiveNode(maxDescriptors: 0, until: deadline) {
            if (try? node.state()) == .closing {
                try? channel.sendNode(XenStoreNode(["state": "\(XenbusState.closed.rawValue)"]), until: deadline)
            }
        }
        channel.shutdown()
        return .closed
    }
}

#if canImport(Glibc)
import Glibc
#endif
public import SharedMemory

/// One frontend served by the hardened backend: the backend half of the handshake (the
/// frontend's values and memfds are checked), then the request loop until the frontend
/// closes, goes quiet, or corrupts the ring (connection dropped, R6 on the backend side).
public final class XenBlkBackendConnection {
    /// The hardened ring end.
    public let backend: BlkBackend
    /// The event channel to and from the frontend.
    public let events: EventChannel
    let channel: UnixChannel
    let table: SharedRegion
    let frames: SharedRegion
    let ringRef: UInt32
    /// The Adversary's hook points, shared with `backend` (nil in service).
    public let hooks: (any XenBackendHooks)?

    /// Announces `info` (as `hooks` may rewrite it), then validates and maps what the
    /// frontend shares.
    public static func accept(
        channel: UnixChannel, storage: any BlockStorage, hooks: (any XenBackendHooks)? = nil,
        flushCache: Bool = true, discard: Bool = true, until deadline: Deadline = .after(seconds: 10)
    ) throws(XenConnectError) -> XenBlkBackendConnection {
        var node = XenBlkInfo(sectors: storage.sectorCount, flushCache: flushCache, discard: discard).node
        hooks?.willAnnounce(&node)
        try channel.sendNode(node, until: deadline)
        let (theirs, fds) = try channel.receiveNode(maxDescriptors: 4, until: deadline)
        guard fds.count == 4 else { throw .setup("expected 4 descriptors, got \(fds.count)") }
        let entries: UInt64
        let frameCount: UInt64
        let ref: UInt64
        do {
            let state = try theirs.state()
            guard state == .initialised else {
                throw XenViolation.xenHandshakeState(expected: XenbusState.initialised.rawValue, got: state.rawValue)
            }
            guard theirs["protocol"] == "x86_64-abi" else {
                throw XenViolation.xenHandshakeValue(key: "protocol", value: theirs["protocol"] ?? "(missing)")
            }
            entries = try theirs.number("grant-entries", in: UInt64(GrantLayout.reservedEntries + 1)...65536)
            frameCount = try theirs.number("grant-frames", in: 1...262_144)
            ref = try theirs.number("ring-ref", in: 0...(entries - 1))
        } catch let v as XenViolation {
            throw .violation(v)
        } catch {
            throw .setup("\(error)")
        }
        let table: SharedRegion
        let frames: SharedRegion
        let events: EventChannel
        do {
            // Each descriptor is taken out once and owned by what it becomes (or closed
            // with the batch). SharedRegion checks F_SEAL_SHRINK and the size: a frontend
            // cannot SIGBUS us. Notifier checks that the event fds are eventfds: a pipe
            // could raise SIGPIPE, a memfd is always readable (R3, R5).
            guard let t = fds.take(0), let f = fds.take(1), let incoming = fds.take(2), let outgoing = fds.take(3)
            else { throw XenConnectError.setup("descriptors missing") }
            table = try SharedRegion(mapping: t, offset: 0, size: entries * UInt64(GrantLayout.entrySize))
            frames = try SharedRegion(mapping: f, offset: 0, size: frameCount * UInt64(SharedRingLayout.pageSize))
            let fromFront = try Notifier(adopting: incoming)
            let toFront = try Notifier(adopting: outgoing)
            events = EventChannel(incoming: fromFront, outgoing: toFront)
        } catch let e as XenConnectError {
            throw e
        } catch { throw .setup("\(error)") }
        let memory = GrantTableMemory(
            entries: table.base, entryCount: Int(entries), frames: frames.base, frameCount: Int(frameCount))
        let mapper = GrantMapper(memory: memory)
        let ring: UnsafeMutableRawPointer
        do { ring = try mapper.map(UInt32(ref), write: true) } catch { throw .violation(error) }
        let backend = BlkBackend(ring: ring, mapper: mapper, storage: storage)
        backend.hooks = hooks
        try channel.sendNode(XenStoreNode(["state": "\(XenbusState.connected.rawValue)"]), until: deadline)
        return XenBlkBackendConnection(
            backend: backend, events: events, channel: channel, table: table, frames: frames, ringRef: UInt32(ref),
            hooks: hooks)
    }

    init(
        backend: BlkBackend, events: EventChannel, channel: UnixChannel, table: SharedRegion, frames: SharedRegion,
        ringRef: UInt32, hooks: (any XenBackendHooks)?
    ) {
        self.backend = backend
        self.events = events
        self.channel = channel
        self.table = table
        self.frames = frames
        self.ringRef = ringRef
        self.hooks = hooks
    }

    deinit { backend.mapper.unmap(ringRef, write: true) }

    /// How a connection ended.
    public enum End: Equatable, Sendable {
        /// The frontend closed the connection.
        case closed
        /// No request within the idle timeout.
        case idle
        /// The frontend broke a rule; the connection was dropped (R6).
        case dropped(XenViolation)
    }

    /// Serves until the frontend closes (Closing → Closed), hangs up, does no work for
    /// `idleTimeout` seconds, or corrupts the ring (the connection is dropped). Idleness is
    /// measured from the last request served, not from the last event: a frontend that
    /// keeps its event fd readable without posting work is still dropped on time, and its
    /// storm is backed off with the shared `WakeBackoff` policy like the frontend's (R5).
    ///
    /// `wait` is how an empty ring is waited on (issue 19): `.adaptive` polls for a time
    /// that adapts and then blocks on the event channel (idle costs next to no CPU),
    /// `.spin(nanoseconds:)` polls that long, `.poll` never blocks (it still notices a
    /// hang-up and the idle timeout, once a millisecond). `observe` runs on this thread
    /// after every batch served (live counters; `backend`'s counts are settled then).
    public func run(
        idleTimeout: Double = 30, wait: WaitStrategy = .adaptive, observe: ((XenBlkBackendConnection) -> Void)? = nil
    ) -> End {
        let idleNanoseconds = UInt64(max(0.001, min(idleTimeout.isNaN ? 30 : idleTimeout, 3600)) * 1e9)
        var lastWork = monotonicNanoseconds()
        var spin = AdaptiveSpin(wait)
        var spinStart: UInt64 = 0
        var lastCheck = lastWork
        var woke = false
        while true {
            let n: Int
            do { n = try backend.serve(budget: 32) } catch {
                observe?(self)
                return drop(error)
            }
            if woke {
                events.noteWake(productive: n > 0)
                woke = false
            }
            if n > 0 {
                spinStart = 0
                lastWork = monotonicNanoseconds()
                hooks?.didServe(self, requests: n)
                if backend.publishResponses() && !events.notify() {
                    observe?(self)
                    return drop(.notifierBlocked(role: "event channel"))
                }
                observe?(self)
                continue
            }
            let now = monotonicNanoseconds()
            if spinStart == 0 { spinStart = now }
            if now &- spinStart < spin.limit {
                // Polling: a hang-up or Closing, and the idle timeout, still end the
                // connection (looked at once a millisecond: a poll(2) costs more than a ring check).
                if now &- lastCheck >= 1_000_000 {
                    lastCheck = now
                    if now &- lastWork >= idleNanoseconds { return .idle }
                    if case .other = EventWaiter.wait(
                        for: nil, orReadable: channel.fileDescriptor, until: Deadline(uptimeNanoseconds: 0))
                    {
                        return close()
                    }
                }
                continue
            }
            if backend.enableNotifications() { continue }
            let idleDeadline = Deadline(uptimeNanoseconds: lastWork &+ idleNanoseconds)
            if idleDeadline.hasPassed { return .idle }
            events.backoff.pause(until: idleDeadline)
            let blockStart = monotonicNanoseconds()
            switch EventWaiter.wait(for: events.incoming, orReadable: channel.fileDescriptor, until: idleDeadline) {
            case .other: return close()
            case .notified: woke = true
            case .timedOut: break
            }
            spin.noteBlock(nanoseconds: monotonicNanoseconds() &- blockStart, productive: woke)
            spinStart = 0
        }
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

#if canImport(Glibc)
import Glibc
#endif
public import SharedMemory
public import Virtqueue

/// One frontend served by the hardened backend: the backend half of the handshake (the
/// frontend's values and memfds are checked), then the request loop until the frontend
/// closes, goes quiet, or corrupts the ring (connection dropped, R6 on the backend side).
public final class XenBlkBackendConnection {
    public let backend: BlkBackend
    public let events: EventChannel
    let channel: UnixChannel
    let table: SharedRegion
    let frames: SharedRegion
    let ringRef: UInt32
    public let attack: XenBackendAttack?

    /// Announces `info` (or absurd values under a handshake attack), then validates and
    /// maps what the frontend shares.
    public static func accept(
        channel: UnixChannel, storage: any BlockStorage, attack: XenBackendAttack? = nil,
        flushCache: Bool = true, discard: Bool = true, until deadline: Deadline = .after(seconds: 10)
    ) throws(XenConnectError) -> XenBlkBackendConnection {
        var node = XenBlkInfo(sectors: storage.sectorCount, flushCache: flushCache, discard: discard).node
        switch attack {
        case .sectorsZero?: node["sectors"] = "0"
        case .sectorsHuge?: node["sectors"] = "\(UInt64(1) << 63)"
        case .sectorSizeThree?: node["sector-size"] = "3"
        default: break
        }
        try channel.sendNode(node, until: deadline)
        let (theirs, fds) = try channel.receiveNode(maxDescriptors: 4, until: deadline)
        guard fds.count == 4 else {
            fds.forEach(closeDescriptor)
            throw .setup("expected 4 descriptors, got \(fds.count)")
        }
        var owned = fds
        defer { owned.forEach(closeDescriptor) }
        let entries: UInt64
        let frameCount: UInt64
        let ref: UInt64
        do {
            let state = try theirs.state()
            guard state == .initialised else {
                throw Violation.xenHandshakeState(expected: XenbusState.initialised.rawValue, got: state.rawValue)
            }
            guard theirs["protocol"] == "x86_64-abi" else {
                throw Violation.xenHandshakeValue(key: "protocol", value: theirs["protocol"] ?? "(missing)")
            }
            entries = try theirs.number("grant-entries", in: UInt64(GrantLayout.reservedEntries + 1)...65536)
            frameCount = try theirs.number("grant-frames", in: 1...262_144)
            ref = try theirs.number("ring-ref", in: 0...(entries - 1))
        } catch let v as Violation {
            throw .violation(v)
        } catch {
            throw .setup("\(error)")
        }
        let table: SharedRegion
        let frames: SharedRegion
        let events: EventChannel
        do {
            // SharedRegion checks F_SEAL_SHRINK and the size: a frontend cannot SIGBUS us.
            table = try SharedRegion(mapping: owned[0], offset: 0, size: entries * UInt64(GrantLayout.entrySize))
            owned[0] = -1
            frames = try SharedRegion(
                mapping: owned[1], offset: 0, size: frameCount * UInt64(SharedRingLayout.pageSize))
            owned[1] = -1
            let fromFront = try Notifier(adopting: owned[2])
            owned[2] = -1
            let toFront = try Notifier(adopting: owned[3])
            owned[3] = -1
            events = EventChannel(incoming: fromFront, outgoing: toFront)
        } catch { throw .setup("\(error)") }
        let memory = GrantTableMemory(
            entries: table.base, entryCount: Int(entries), frames: frames.base, frameCount: Int(frameCount))
        let mapper = GrantMapper(memory: memory)
        let ring: UnsafeMutableRawPointer
        do { ring = try mapper.map(UInt32(ref), write: true) } catch { throw .violation(error) }
        let backend = BlkBackend(ring: ring, mapper: mapper, storage: storage)
        backend.attack = attack
        try channel.sendNode(XenStoreNode(["state": "\(XenbusState.connected.rawValue)"]), until: deadline)
        return XenBlkBackendConnection(
            backend: backend, events: events, channel: channel, table: table, frames: frames, ringRef: UInt32(ref),
            attack: attack)
    }

    init(
        backend: BlkBackend, events: EventChannel, channel: UnixChannel, table: SharedRegion, frames: SharedRegion,
        ringRef: UInt32, attack: XenBackendAttack?
    ) {
        self.backend = backend
        self.events = events
        self.channel = channel
        self.table = table
        self.frames = frames
        self.ringRef = ringRef
        self.attack = attack
    }

    deinit { backend.mapper.unmap(ringRef, write: true) }

    /// How a connection ended.
    public enum End: Equatable, Sendable {
        case closed
        case idle
        case dropped(Violation)
    }

    /// Serves until the frontend closes (Closing → Closed), hangs up, stays idle for
    /// `idleTimeout` seconds, or corrupts the ring (the connection is dropped).
    public func run(idleTimeout: Double = 30) -> End {
        var spins = 0
        while true {
            let n: Int
            do { n = try backend.serve(budget: 32) } catch {
                events.mask()
                channel.shutdown()
                return .dropped(error)
            }
            if n > 0 {
                spins = 0
                if attack == .eventStorm { storm() }
                if backend.publishResponses() { events.notify() }
                continue
            }
            spins += 1
            if spins < 64 { continue }  // brief spin, then block (2 cores: never spin forever)
            if backend.enableNotifications() { continue }
            var pfds = [
                pollfd(fd: events.incoming.fileDescriptor, events: Int16(POLLIN), revents: 0),
                pollfd(fd: channel.fileDescriptor, events: Int16(POLLIN), revents: 0),
            ]
            let r = poll(&pfds, 2, Int32(max(1, min(idleTimeout.isNaN ? 30 : idleTimeout, 3600)) * 1000))
            if r == 0 { return .idle }
            if r < 0 { continue }
            if pfds[1].revents != 0 { return close() }
            events.incoming.drain()
            spins = 0
        }
    }

    /// Event storm: 300 ms of events with no response, then the answer.
    func storm() {
        let end = Deadline.after(seconds: 0.3)
        while !end.hasPassed {
            events.outgoing.signal()
            usleep(100)
        }
    }

    func close() -> End {
        let deadline = Deadline.after(seconds: 2)
        if let (node, fds) = try? channel.receiveNode(maxDescriptors: 0, until: deadline) {
            fds.forEach(closeDescriptor)
            if (try? node.state()) == .closing {
                try? channel.sendNode(XenStoreNode(["state": "\(XenbusState.closed.rawValue)"]), until: deadline)
            }
        }
        channel.shutdown()
        return .closed
    }
}

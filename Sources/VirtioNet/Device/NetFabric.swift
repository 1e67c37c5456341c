import SharedMemory
import VhostUser
import Synchronization

/// What `serve-net` does with the frames its front-ends transmit.
public enum NetFabricMode: String, Sendable, CaseIterable {
    /// An L2 learning switch between every port (front-end) of the fabric.
    case `switch`
    /// Every frame goes back to its sender, unchanged.
    case loopback
    /// Frames are counted and dropped (for benchmarks).
    case sink
}

/// Counters of a fabric, over all ports.
public struct NetFabricStatistics: Sendable, Equatable {
    public var framesIn: UInt64 = 0
    public var bytesIn: UInt64 = 0
    public var framesDelivered: UInt64 = 0
    /// Frames dropped because a destination's inbox was full or it has no port.
    public var framesDropped: UInt64 = 0
    /// Frames a driver sent that broke a rule (bad header, bad length, bad chain).
    public var framesRejected: UInt64 = 0
    public var flooded: UInt64 = 0
}

/// Frames waiting for one receive queue: a bounded ring of frame slots in private memory,
/// filled by any transmit queue's thread under the lock and drained by the receive
/// queue's thread. Full means drop (a driver that never posts receive buffers costs its
/// own frames, nobody else's memory: R5).
public final class NetInbox: @unchecked Sendable {
    struct Ring {
        var head = 0
        var count = 0
        var wake: QueueWake?
    }

    public let capacity: Int
    public let slotSize: Int
    let ring = Mutex(Ring())
    let storage: UnsafeMutableRawPointer
    let lengths: UnsafeMutablePointer<Int>

    init(capacity: Int, slotSize: Int) {
        self.capacity = capacity
        self.slotSize = slotSize
        storage = .allocate(byteCount: capacity * slotSize, alignment: 64)
        lengths = .allocate(capacity: capacity)
        lengths.initialize(repeating: 0, count: capacity)
    }

    deinit {
        storage.deallocate()
        lengths.deallocate()
    }

    func setWake(_ wake: QueueWake?) { ring.withLock { $0.wake = wake } }

    /// Copies frames in (all or as many as fit); returns how many were taken. Wakes the
    /// receive queue's thread once.
    func put(_ frames: UnsafePointer<FrameRef>, count n: Int) -> Int {
        let (taken, wake) = ring.withLock { r -> (Int, QueueWake?) in
            var taken = 0
            guard r.wake != nil else { return (0, nil) }  // no receive queue running: drop
            while taken < n && r.count < capacity {
                let slot = (r.head + r.count) % capacity
                let f = frames[taken]
                (storage + slot * slotSize).copyMemory(from: f.base, byteCount: min(f.length, slotSize))
                lengths[slot] = min(f.length, slotSize)
                r.count += 1
                taken += 1
            }
            return (taken, r.wake)
        }
        if taken > 0 { wake?.signal() }
        return taken
    }

    /// The frames waiting now: (first slot, count). Slots stay valid until `release`.
    func peek() -> (head: Int, count: Int) { ring.withLock { ($0.head, $0.count) } }

    func frame(at slot: Int) -> UnsafeRawBufferPointer {
        let s = slot % capacity
        return UnsafeRawBufferPointer(start: storage + s * slotSize, count: lengths[s])
    }

    func release(_ n: Int) {
        ring.withLock { r in
            let k = min(n, r.count)
            r.head = (r.head + k) % capacity
            r.count -= k
        }
    }

    func clear() {
        ring.withLock { r in
            r.head = 0
            r.count = 0
        }
    }

    public var waiting: Int { ring.withLock { $0.count } }
}

/// One frame in a transmit queue's private scratch.
struct FrameRef {
    var base: UnsafeRawPointer
    var length: Int
}

/// The frames of every front-end connected to one `serve-net`: each `VirtioNetDevice` is a
/// port; transmit queues hand validated frames (private copies) to `forward`, which puts
/// them in the destination ports' inboxes.
public final class NetFabric: Sendable {
    struct Table {
        var ports: [Int: NetPort] = [:]
        var macs: [UInt64: Int] = [:]
        var nextPort = 1
    }

    /// Most MAC addresses learnt; beyond that frames to unknown addresses are flooded
    /// (a driver sending from random source addresses cannot grow our memory: R5).
    public static let macTableLimit = 4096

    public let mode: NetFabricMode
    let table = Mutex(Table())
    let stats = Mutex(NetFabricStatistics())

    public init(mode: NetFabricMode) { self.mode = mode }

    public var statistics: NetFabricStatistics { stats.withLock { $0 } }

    /// A new port with these inboxes (or a TAP).
    func register(inboxes: [NetInbox], tap: NetTap? = nil) -> NetPort {
        table.withLock { t in
            let port = NetPort(id: t.nextPort, inboxes: inboxes, tap: tap)
            t.nextPort += 1
            t.ports[port.id] = port
            return port
        }
    }

    /// The front-end of port `id` left: its addresses are forgotten.
    func forgetAddresses(port id: Int) {
        table.withLock { t in
            t.macs = t.macs.filter { $0.value != id }
        }
    }

    /// Hands `count` validated frames from `port`'s transmit queue `pair` to their
    /// destinations. Called on that queue's thread.
    func forward(_ frames: UnsafePointer<FrameRef>, count: Int, from port: NetPort, pair: Int) {
        guard count > 0 else { return }
        var bytes = 0
        for i in 0..<count { bytes += frames[i].length }
        var delivered = 0
        var flooded = 0
        switch mode {
        case .sink:
            break
        case .loopback:
            delivered = port.deliver(frames, count: count, pair: pair)
        case .switch:
            for i in 0..<count {
                let (targets, flood) = destinations(of: frames[i], from: port)
                if flood { flooded += 1 }
                for t in targets {
                    delivered += t.deliver(frames + i, count: 1, pair: pair)
                }
            }
        }
        let dropped = mode == .sink ? 0 : max(0, count - delivered)
        stats.withLock { s in
            s.framesIn &+= UInt64(count)
            s.bytesIn &+= UInt64(bytes)
            s.framesDelivered &+= UInt64(delivered)
            s.framesDropped &+= UInt64(dropped)
            s.flooded &+= UInt64(flooded)
        }
    }

    func rejected(_ n: Int) {
        guard n > 0 else { return }
        stats.withLock { $0.framesRejected &+= UInt64(n) }
    }

    /// Learns the source, then looks up the destination: a known unicast address goes to
    /// its port, anything else floods to every other port.
    func destinations(of frame: FrameRef, from port: NetPort) -> ([NetPort], Bool) {
        let dst = Self.mac(frame.base)
        let src = Self.mac(frame.base + 6)
        return table.withLock { t -> ([NetPort], Bool) in
            if src & (1 << 40) == 0, src != 0 {
                if t.macs[src] != nil || t.macs.count < Self.macTableLimit { t.macs[src] = port.id }
            }
            if dst & (1 << 40) == 0, let id = t.macs[dst] {
                guard id != port.id, let target = t.ports[id] else { return ([], false) }
                return ([target], false)
            }
            return (t.ports.values.filter { $0 !== port }, true)
        }
    }

    /// The 6 bytes at `p` as a number (first byte highest; bit 40 is the group bit).
    static func mac(_ p: UnsafeRawPointer) -> UInt64 {
        var v: UInt64 = 0
        for i in 0..<6 { v = v << 8 | UInt64(p.load(fromByteOffset: i, as: UInt8.self)) }
        return v
    }
}

/// One front-end's place on the fabric: its inboxes (one per queue pair).
final class NetPort: Sendable {
    let id: Int
    let inboxes: [NetInbox]
    /// A TAP port has no inboxes: frames for it are written to the TAP.
    let tap: NetTap?

    init(id: Int, inboxes: [NetInbox], tap: NetTap? = nil) {
        self.id = id
        self.inboxes = inboxes
        self.tap = tap
    }

    func inbox(_ pair: Int) -> NetInbox { inboxes[pair % max(1, inboxes.count)] }

    /// Hands frames to this port's front-end (its inbox) or TAP; returns how many it took.
    func deliver(_ frames: UnsafePointer<FrameRef>, count: Int, pair: Int) -> Int {
        if let tap { return tap.write(frames, count: count) }
        guard !inboxes.isEmpty else { return 0 }
        return inbox(pair).put(frames, count: count)
    }
}

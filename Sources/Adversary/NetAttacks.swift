#if canImport(Glibc)
import Glibc
#endif
public import SharedMemory
public import VhostUser
import Synchronization
public import VirtioNet
import Virtqueue

/// How a net attack misbehaves, interpreted by `NetAdversaryDevice` at its hook point.
enum NetBehaviour: Sendable, Hashable {
    /// Receive queue 0: the first buffer posted is completed with this header, frame
    /// length and used length (nil: header + frame), `buffers` buffers in all.
    case receive(header: NetHeader, frameLength: Int, usedLength: UInt32?, buffers: Int)
    /// A valid 60-byte frame whose num_buffers a thread flips between 1 and 0 after it is
    /// published (TOCTOU on the header: the driver must read it once).
    case headerFlip
    /// Config space rewritten on each read (the argument counts reads from 0).
    case config(NetConfigLie)
    /// Control queue: no answer, a garbage ack, or OK after the driver's deadline.
    case controlNever
    case controlAck(UInt8)
    case controlLate(seconds: Double)
    /// The call eventfd of receive queue 0 signalled in a loop for `seconds`, no work.
    case receiveStorm(seconds: Double)
    /// Receive queue 0: a valid 60-byte frame whose completion lies about the ring.
    case ring(NetRingLie)
}

/// What a ring attack on receive queue 0 does with a valid frame.
enum NetRingLie: Sendable, Hashable {
    /// The used id is queue size + 7.
    case idOutOfRange
    /// Two buffers taken, the first completed twice (the second entry names an id the
    /// first has already returned), the second never.
    case idDuplicate
    /// Split ring: after the device has read the posted descriptor, its flags become
    /// NEXT | WRITE and its next points to itself; then it is completed normally.
    case descriptorRewritten
}

enum NetConfigLie: Sendable, Hashable {
    case mac([UInt8])
    case mtu(UInt16)
    case mtuFlapping
    case maxPairs(UInt16)
    case status(UInt16)
}

/// The families of the net section.
public enum NetAttackGroup: String, Sendable, CaseIterable {
    case receive = "net receive"
    case control = "net control queue"
    case config = "net config space"
    case liveness = "liveness"
    case toctou = "time of check / time of use"
    case ring = "net ring"
}

/// One named misbehaviour of a virtio-net device against a driver.
public struct NetAttack: Sendable, Hashable, Identifiable, CustomStringConvertible {
    public let name: String
    public let group: NetAttackGroup
    public let rule: Rule
    public let hook: HookPoint
    public let summary: String
    public let expectation: String
    public let expected: Set<Signature>
    let behaviour: NetBehaviour

    public var id: String { name }
    public var description: String { name }

    public static func == (a: NetAttack, b: NetAttack) -> Bool { a.name == b.name }
    public func hash(into h: inout Hasher) { h.combine(name) }
}

/// The virtio-net section of the catalogue (issue 15's list), each attack with what a
/// hardened driver must do. Kept apart from the blk `Catalogue.all`: the probes differ.
public enum NetCatalogue {
    static func v(_ name: String) -> Signature { .violation(name) }

    /// A used length of "the buffer's writable length + 1", whatever the driver posted.
    static let beyondPosted = UInt32.max

    static func receive(
        _ name: String, _ rule: Rule, _ summary: String, must: String, _ expected: [Signature],
        header: NetHeader = NetHeader(numBuffers: 1), frameLength: Int = 60, usedLength: UInt32? = nil,
        buffers: Int = 1
    ) -> NetAttack {
        NetAttack(
            name: name, group: .receive, rule: rule, hook: .completion, summary: summary, expectation: must,
            expected: Set(expected),
            behaviour: .receive(header: header, frameLength: frameLength, usedLength: usedLength, buffers: buffers))
    }

    static func header(_ change: (inout NetHeader) -> Void) -> NetHeader {
        var h = NetHeader(numBuffers: 1)
        change(&h)
        return h
    }

    static func config(_ name: String, _ summary: String, must: String, _ expected: [Signature], _ lie: NetConfigLie)
        -> NetAttack
    {
        NetAttack(
            name: name, group: .config, rule: .r3, hook: .config, summary: summary, expectation: must,
            expected: Set(expected), behaviour: .config(lie))
    }

    public static let all: [NetAttack] =
        [
            receive(
                "net-num-buffers-zero", .r3, "a received frame claims num_buffers 0", must: "refuse num_buffers 0",
                [v("numBuffersInvalid")], header: NetHeader(numBuffers: 0)),
            receive(
                "net-num-buffers-huge", .r3, "a received frame claims num_buffers 65535",
                must: "refuse more buffers than were posted", [v("numBuffersInvalid")],
                header: NetHeader(numBuffers: 65535)),
            receive(
                "net-num-buffers-beyond-posted", .r3, "num_buffers one more than the buffers posted",
                must: "refuse more buffers than were posted", [v("numBuffersInvalid")],
                header: NetHeader(numBuffers: 17)),
            receive(
                "net-used-len-below-header", .r3, "a receive buffer's used len is 11 (the header is 12)",
                must: "refuse a used len shorter than the header", [v("usedLengthShorterThanHeader")], usedLength: 11),
            receive(
                "net-used-len-beyond-posted", .r3, "a receive buffer's used len is one more than the buffer posted",
                must: "refuse a length above the posted size", [v("usedLengthTooLarge")], usedLength: beyondPosted),
            receive(
                "net-gso-garbage", .r3, "gso_type 0x7f on a frame (no GSO negotiated)",
                must: "refuse offloads that were not negotiated", [v("headerInvalid")],
                header: header { $0.gsoType = 0x7f }),
            receive(
                "net-gso-size-without-gso", .r3, "gso_size 1448 with gso_type NONE",
                must: "refuse a gso_size without GSO", [v("headerInvalid")], header: header { $0.gsoSize = 1448 }),
            receive(
                "net-csum-start-beyond-frame", .r3, "NEEDS_CSUM with csum_start + csum_offset past the frame",
                must: "refuse a checksum position outside the frame", [v("headerInvalid")],
                header: header {
                    $0.flags = NetProtocol.HeaderFlag.needsCsum
                    $0.csumStart = 50
                    $0.csumOffset = 16
                }),
            receive(
                "net-frame-beyond-mtu", .r3, "two merged 2 KiB buffers: a 4084-byte frame for MTU 1500",
                must: "refuse frames longer than MTU + 18", [v("frameLengthInvalid")],
                header: NetHeader(numBuffers: 2), frameLength: 2036, buffers: 2),
            receive(
                "net-frame-below-ethernet-header", .r3, "a 13-byte frame", must: "refuse frames shorter than 14 bytes",
                [v("frameLengthInvalid")], frameLength: 13),
            NetAttack(
                name: "net-header-toctou", group: .toctou, rule: .r2, hook: .thread,
                summary: "num_buffers flipped between 1 and 0 by a thread after the frame is published",
                expectation: "read the header once: either value, never a mix",
                expected: [.unaffected, v("numBuffersInvalid")], behaviour: .headerFlip),
            NetAttack(
                name: "net-control-ack-never", group: .liveness, rule: .r5, hook: .completion,
                summary: "control commands are never answered", expectation: "give up at the command's deadline",
                expected: [.timeout], behaviour: .controlNever),
            NetAttack(
                name: "net-control-ack-garbage", group: .control, rule: .r3, hook: .completion,
                summary: "control commands answered with ack 7",
                expectation: "accept only OK; anything but ERR is a fault",
                expected: [v("controlAckInvalid")], behaviour: .controlAck(7)),
            NetAttack(
                name: "net-control-ack-late", group: .liveness, rule: .r5, hook: .completion,
                summary: "control commands answered OK after 1 s (the driver waits 0.5 s)",
                expectation: "give up at the deadline; a late OK is not success", expected: [.timeout],
                behaviour: .controlLate(seconds: 1)),
            config(
                "net-mac-multicast", "config MAC 01:00:5e:00:00:01", must: "refuse it and use a random local MAC",
                [.unaffected], .mac([0x01, 0, 0x5e, 0, 0, 1])),
            config(
                "net-mac-zero", "config MAC 00:00:00:00:00:00", must: "refuse it and use a random local MAC",
                [.unaffected], .mac([0, 0, 0, 0, 0, 0])),
            config(
                "net-mtu-flapping", "MTU 1500 at negotiation, 9000 on every later read",
                must: "read once; a changed value on re-read is a fault", [v("configChanged")], .mtuFlapping),
            config(
                "net-mtu-below-minimum", "MTU 67", must: "refuse an MTU below 68", [v("configInvalid")], .mtu(67)),
            config(
                "net-max-pairs-zero", "max_virtqueue_pairs 0", must: "refuse 0", [v("configInvalid")], .maxPairs(0)),
            config(
                "net-max-pairs-huge", "max_virtqueue_pairs 65535", must: "refuse more than 0x8000",
                [v("configInvalid")], .maxPairs(65535)),
            config(
                "net-status-unknown-bits", "status 0x81", must: "refuse unknown status bits", [v("configInvalid")],
                .status(0x81)),
            NetAttack(
                name: "net-rx-storm", group: .liveness, rule: .r5, hook: .controlRequest,
                summary: "the receive call eventfd signalled in a loop for 1 s with nothing completed",
                expectation: "back off spurious wake-ups; traffic goes on", expected: [.unaffected],
                behaviour: .receiveStorm(seconds: 1)),
        ] + ringAttacks

    static func ring(_ name: String, _ summary: String, must: String, _ expected: [Signature], _ lie: NetRingLie)
        -> NetAttack
    {
        NetAttack(
            name: name, group: .ring, rule: .r3, hook: .completion, summary: summary, expectation: must,
            expected: Set(expected), behaviour: .ring(lie))
    }

    /// Ring-level lies on the receive queue (split and packed), the ones DPDK's
    /// virtio_user trusts: it indexes its per-descriptor state with the used id and walks
    /// a finished chain's flags/next in the shared descriptor table.
    public static let ringAttacks: [NetAttack] = [
        ring(
            "net-used-id-out-of-range",
            "a valid frame completed with used id queue size + 7, a second valid frame (right id) behind it",
            must: "refuse an id outside the ring", [v("usedIdOutOfRange")], .idOutOfRange),
        ring(
            "net-used-id-duplicate",
            "two receive buffers taken; the first completed twice (the second entry's id is no longer in flight)",
            must: "refuse an id that is not in flight", [v("usedIdNotInFlight")], .idDuplicate),
        ring(
            "net-descriptor-rewritten-after-post",
            "split ring: the posted receive descriptor's flags set to NEXT + WRITE and next to itself, then completed",
            must: "never read a posted descriptor back (a packed ring has no next: served normally)", [.unaffected],
            .descriptorRewritten),
    ]

    public static func attack(named name: String) -> NetAttack? { all.first { $0.name == name } }
}

/// The real `VirtioNetDevice` (loopback), misbehaving at its hook points: config reads,
/// receive queue 0's and the control queue's handlers, the call fd it was given.
public final class NetAdversaryDevice: VhostUserDevice, @unchecked Sendable {
    public let inner: VirtioNetDevice
    public let attack: NetAttack
    let reads = Atomic<Int>(0)
    let stormStarted = Atomic<Bool>(false)
    /// Receive queue 0's ring addresses as SET_VRING_ADDR announced them (ring attacks).
    let receiveRing = Mutex<VringAddress?>(nil)
    let rewrites = Atomic<Int>(0)
    /// Posted descriptors `net-descriptor-rewritten-after-post` rewrote (0 on a packed ring).
    public var rewrittenDescriptors: Int { rewrites.load(ordering: .relaxed) }

    /// Seconds after the receive queue first runs before a receive attack fires (a real
    /// driver such as testpmd flushes its queues when forwarding starts).
    public let delay: Double

    public init(inner: VirtioNetDevice, attack: NetAttack, delay: Double = 0) {
        self.inner = inner
        self.attack = attack
        self.delay = delay
    }

    public var features: UInt64 {
        if case .receive(let h, _, _, _) = attack.behaviour, h.flags & NetProtocol.HeaderFlag.needsCsum != 0 {
            return inner.features | NetProtocol.Feature.guestCsum
        }
        return inner.features
    }
    public var protocolFeatures: ProtocolFeatures { inner.protocolFeatures }
    public var queueCount: Int { inner.queueCount }

    public func readConfig(offset: UInt32, size: Int) -> [UInt8]? {
        guard case .config(let lie) = attack.behaviour else { return inner.readConfig(offset: offset, size: size) }
        let n = reads.add(1, ordering: .relaxed).oldValue
        var c = inner.config
        switch lie {
        case .mac(let mac): c.mac = mac
        case .mtu(let mtu): c.mtu = mtu
        case .mtuFlapping: c.mtu = n == 0 ? 1500 : 9000
        case .maxPairs(let p): c.maxVirtqueuePairs = p
        case .status(let s): c.status = s
        }
        return c.read(offset: offset, size: size)
    }

    public func writeConfig(offset: UInt32, bytes: [UInt8]) -> Bool { false }

    public func makeQueueHandler(queue: Int, features: UInt64) -> any QueueHandler {
        let real = inner.makeQueueHandler(queue: queue, features: features)
        switch attack.behaviour {
        case .receive, .headerFlip:
            if queue == 0 { return NetAdversaryReceive(attack.behaviour, real: real, delay: delay) }
        case .ring(let lie):
            if queue == 0 {
                return NetAdversaryRing(
                    lie, real: real, delay: delay, packed: features & FeatureBits.ringPacked != 0,
                    ring: { [weak self] in self?.receiveRing.withLock { $0 } },
                    rewrote: { [weak self] in _ = self?.rewrites.add(1, ordering: .relaxed) })
            }
        case .controlNever, .controlAck, .controlLate:
            if queue == NetProtocol.controlQueue(pairs: inner.options.queuePairs) {
                return NetAdversaryControl(attack.behaviour)
            }
        default: break
        }
        return real
    }

    public func frontendDisconnected() { inner.frontendDisconnected() }

    /// The storm's thread writes the call fd the driver gave for receive queue 0.
    public func controlRequestReceived(_ request: Request, payload: [UInt8], descriptors: [Int32]) {
        if request == .setVringAddr, let a = try? VringAddress.decode(payload), a.index == 0 {
            receiveRing.withLock { $0 = a }
        }
        guard case .receiveStorm(let seconds) = attack.behaviour, request == .setVringCall,
            payload.first == 0, let fd = descriptors.first, !stormStarted.exchange(true, ordering: .relaxed)
        else { return }
        let own = dup(fd)
        guard own >= 0 else { return }
        _ = try? spawnThread {
            let end = monotonicNanoseconds() + UInt64(seconds * 1e9)
            var one: UInt64 = 1
            while monotonicNanoseconds() < end {
                _ = write(own, &one, 8)
                sched_yield()
            }
            close(own)
        }
    }
}

/// Receive queue 0: the hostile completion once, then the real handler.
final class NetAdversaryReceive: QueueHandler {
    let behaviour: NetBehaviour
    let real: any QueueHandler
    var chain = DescriptorChain()
    var fired = false
    let delay: Double
    var firstServe: UInt64 = 0

    init(_ behaviour: NetBehaviour, real: any QueueHandler, delay: Double = 0) {
        self.behaviour = behaviour
        self.real = real
        self.delay = delay
    }

    func attach(wake: QueueWake) { real.attach(wake: wake) }

    func stopping(_ queue: any DeviceRing, memory: GuestMemory) -> Int { real.stopping(queue, memory: memory) }

    func serve(_ queue: any DeviceRing, memory: GuestMemory, budget: Int) throws(Violation) -> Int {
        guard !fired else { return try real.serve(queue, memory: memory, budget: budget) }
        if firstServe == 0 { firstServe = monotonicNanoseconds() }
        guard monotonicNanoseconds() - firstServe >= UInt64(delay * 1e9) else {
            return try real.serve(queue, memory: memory, budget: budget)
        }
        var header = NetHeader(numBuffers: 1)
        var frameLength = 60
        var usedLength: UInt32?
        var buffers = 1
        if case .receive(let h, let f, let u, let b) = behaviour {
            (header, frameLength, usedLength, buffers) = (h, f, u, b)
        }
        var done = 0
        while done < buffers {
            guard case .ready = try queue.nextChain(into: &chain, memory: memory) else { break }
            guard let buffer = chain.writable.first?.buffer, let base = buffer.baseAddress else { break }
            var bytes = done == 0 ? header.encoded : []
            bytes += (0..<frameLength).map { UInt8(truncatingIfNeeded: $0 | 0x02) }
            let n = min(bytes.count, buffer.count)
            bytes.withUnsafeBytes { src in
                if let s = src.baseAddress { base.copyMemory(from: s, byteCount: n) }
            }
            var length = usedLength ?? UInt32(n)
            if length == NetCatalogue.beyondPosted { length = UInt32(clamping: chain.writableLength + 1) }
            queue.complete(head: chain.head, length: length)
            if case .headerFlip = behaviour { flip(base + 10, keeping: memory) }
            done += 1
        }
        fired = done > 0
        return done
    }

    /// num_buffers toggled 1 <-> 0 for 200 ms from a thread of its own, which holds the
    /// memory table so the mapping outlives a disconnect or a table change meanwhile.
    func flip(_ p: UnsafeMutableRawPointer, keeping memory: GuestMemory) {
        let address = UInt(bitPattern: p)
        let held = MemoryHold(memory)
        _ = try? spawnThread {
            withExtendedLifetime(held) {}
            guard let q = UnsafeMutableRawPointer(bitPattern: address) else { return }
            let end = monotonicNanoseconds() + 200_000_000
            var v: UInt16 = 0
            while monotonicNanoseconds() < end {
                SharedAccess.store16(q, v)
                v ^= 1
            }
            SharedAccess.store16(q, 1)
            withExtendedLifetime(held) {}
        }
    }
}

/// Receive queue 0: one valid frame whose completion lies about the ring, then the real
/// handler.
final class NetAdversaryRing: QueueHandler {
    let lie: NetRingLie
    let real: any QueueHandler
    let delay: Double
    let packed: Bool
    let ring: () -> VringAddress?
    let rewrote: () -> Void
    var chain = DescriptorChain()
    var second = DescriptorChain()
    var fired = false
    var firstServe: UInt64 = 0

    init(
        _ lie: NetRingLie, real: any QueueHandler, delay: Double, packed: Bool,
        ring: @escaping () -> VringAddress?, rewrote: @escaping () -> Void
    ) {
        self.lie = lie
        self.rewrote = rewrote
        self.real = real
        self.delay = delay
        self.packed = packed
        self.ring = ring
    }

    func attach(wake: QueueWake) { real.attach(wake: wake) }

    func stopping(_ queue: any DeviceRing, memory: GuestMemory) -> Int { real.stopping(queue, memory: memory) }

    func serve(_ queue: any DeviceRing, memory: GuestMemory, budget: Int) throws(Violation) -> Int {
        guard !fired else { return try real.serve(queue, memory: memory, budget: budget) }
        if firstServe == 0 { firstServe = monotonicNanoseconds() }
        guard monotonicNanoseconds() - firstServe >= UInt64(delay * 1e9) else {
            return try real.serve(queue, memory: memory, budget: budget)
        }
        guard case .ready = try queue.nextChain(into: &chain, memory: memory),
            let length = Self.writeFrame(into: chain)
        else { return 0 }
        fired = true
        let size = Int(queue.queueSize)
        switch lie {
        case .idOutOfRange:
            queue.complete(head: UInt16(truncatingIfNeeded: size + 7), length: length)
            // A valid frame right behind it: a driver that stops at the bad entry never sees it.
            if case .ready = try queue.nextChain(into: &second, memory: memory),
                let valid = Self.writeFrame(into: second)
            {
                queue.complete(head: second.head, length: valid)
                return 2
            }
        case .idDuplicate:
            // Two taken, so the packed ring's used slots stay within what was made available.
            if case .ready = try queue.nextChain(into: &second, memory: memory) {
                queue.complete(head: chain.head, length: length)
                queue.complete(head: chain.head, length: length)
                return 2
            }
            queue.complete(head: chain.head, length: length)
        case .descriptorRewritten:
            if !packed, let a = ring(), Int(chain.head) < size,
                let table = try? memory.translateUser(a.descriptor, length: UInt64(16 * size)),
                let base = table.baseAddress
            {
                let d = base + 16 * Int(chain.head)
                SharedAccess.store16(d + 12, 0x0001 | 0x0002)  // NEXT | WRITE
                SharedAccess.store16(d + 14, chain.head)
                rewrote()
            }
            queue.complete(head: chain.head, length: length)
        }
        return 1
    }

    /// A header (num_buffers 1) and a 60-byte frame in the chain's first writable
    /// buffer; the used length that covers them (nil: no room).
    static func writeFrame(into chain: DescriptorChain) -> UInt32? {
        guard let buffer = chain.writable.first?.buffer, let base = buffer.baseAddress else { return nil }
        var bytes = NetHeader(numBuffers: 1).encoded
        bytes += [0x02, 0, 0, 0, 0, 0x0b, 0x02, 0, 0, 0, 0, 0x0c, 0x88, 0xb5]
        bytes += (0..<46).map { UInt8(truncatingIfNeeded: $0 | 0x02) }
        guard bytes.count <= buffer.count else { return nil }
        bytes.withUnsafeBytes { src in
            if let s = src.baseAddress { base.copyMemory(from: s, byteCount: bytes.count) }
        }
        return UInt32(bytes.count)
    }
}

/// The control queue answered badly.
final class NetAdversaryControl: QueueHandler {
    let behaviour: NetBehaviour
    var chain = DescriptorChain()

    init(_ behaviour: NetBehaviour) { self.behaviour = behaviour }

    func serve(_ queue: any DeviceRing, memory: GuestMemory, budget: Int) throws(Violation) -> Int {
        var ack: UInt8 = 0
        switch behaviour {
        case .controlNever: return 0
        case .controlAck(let value): ack = value
        case .controlLate: ack = 0
        default: return 0
        }
        guard case .ready = try queue.nextChain(into: &chain, memory: memory) else { return 0 }
        if case .controlLate(let seconds) = behaviour { usleep(UInt32(seconds * 1_000_000)) }
        chain.writable.first?.buffer.baseAddress?.storeBytes(of: ack, as: UInt8.self)
        queue.complete(head: chain.head, length: 1)
        return 1
    }
}

/// Runs our net driver against one attack and names what happened (the same script for
/// every attack): connect, re-read the config, one control command, receive for a while,
/// then five loopback frames verified byte for byte.
public enum NetDriverProbe {
    public struct Result: Sendable {
        public let attack: String
        public let signature: Signature
        public let evidence: String
        public let milliseconds: Double
    }

    public static func classify(_ error: NetError) -> Signature {
        switch error {
        case .violation(let v): return .violation(Signature.name(of: v))
        case .deviceViolation(let v): return .violation(Signature.name(of: v))
        case .timeout: return .timeout
        case .disconnected: return .disconnected
        case .unsupported: return .unsupported
        case .commandRefused: return .deviceError
        default: return .otherError
        }
    }

    /// Serves `attack` on a socket pair in this process and probes it, on a packed ring
    /// or a split one (the device offers both); by default packed, except for a lie only
    /// a split ring can carry (`net-descriptor-rewritten-after-post`).
    public static func run(_ attack: NetAttack, packed: Bool? = nil) -> Result {
        let packed = packed ?? (attack.behaviour != .ring(.descriptorRewritten))
        let start = monotonicNanoseconds()
        func done(_ s: Signature, _ evidence: String) -> Result {
            Result(
                attack: attack.name, signature: s, evidence: evidence,
                milliseconds: Double(monotonicNanoseconds() - start) / 1e6)
        }
        // Two queue pairs, so MQ and max_virtqueue_pairs are negotiated and used.
        var deviceOptions = VirtioNetDeviceOptions()
        deviceOptions.queueSize = 16
        deviceOptions.queuePairs = 2
        let device = NetAdversaryDevice(
            inner: VirtioNetDevice(fabric: NetFabric(mode: .loopback), options: deviceOptions), attack: attack)
        var configuration = Backend.Configuration()
        configuration.pollInterval = 0.05
        configuration.queueTiming.idleTick = 0.1
        let backend = Backend(device: device, configuration: configuration)
        let channels: (UnixChannel, UnixChannel)
        do { channels = try UnixChannel.pair() } catch { return done(.otherError, "socketpair: \(error)") }
        let served: SpawnedThread
        do {
            let backendSide = ChannelBox(channels.1)
            served = try spawnThread { backend.serve(backendSide.channel) }
        } catch {
            return done(.otherError, "thread: \(error)")
        }
        defer {
            backend.stop()
            channels.0.shutdown()
            served.join()
        }
        var options = VirtioNetDriver.Options()
        options.queueSize = 16
        options.queuePairs = 2
        options.controlTimeout = 5
        options.commandTimeout = 0.5
        options.partialChecksum = true
        options.packedRing = packed
        let net: VirtioNetDriver
        do {
            net = try VirtioNetDriver.connect(channel: channels.0, options: options)
        } catch {
            return done(classify(error), error.description)
        }
        defer { net.close() }
        do {
            _ = try net.recheckConfig()
            try net.setPromiscuous(true)
            let pair = net.pair(0)
            let batch = NetFrameBatch(capacity: 16, frameCapacity: net.info.maximumFrame)
            let listen = Deadline.after(seconds: 0.3)
            while !listen.hasPassed {
                batch.removeAll()
                if try pair.receive(into: batch) == 0 { _ = pair.waitForReceive(until: listen) }
            }
            let r = try NetTraffic.ping(
                pair, mac: net.info.mac, dst: [2, 0, 0, 0, 0, 1], size: 200, count: 5, timeout: 2)
            if r.received != 5 { return done(.timeout, "ping: \(r.received) of 5 frames came back") }
            if r.mismatched != 0 { return done(.wrongPayload, "ping: \(r.mismatched) wrong frames") }
            let mac = formatMAC(net.info.mac) + (net.info.macReplaced ? " (replaced)" : "")
            let rewritten = device.rewrittenDescriptors
            return done(
                .unaffected,
                "5 of 5 frames intact; MAC \(mac); MTU \(net.info.mtu)"
                    + (rewritten > 0 ? "; \(rewritten) posted descriptor rewritten" : ""))
        } catch {
            return done(classify(error), error.description)
        }
    }
}

private final class ChannelBox: @unchecked Sendable {
    let channel: UnixChannel
    init(_ channel: UnixChannel) { self.channel = channel }
}

extension NetCatalogue {
    /// Runs `attacks` against our net driver (`NetDriverProbe`, in this process: the driver
    /// never traps on device data) and renders the report as Markdown.
    public static func auditSelf(_ attacks: [NetAttack], progress: (NetDriverProbe.Result) -> Void = { _ in })
        -> (markdown: String, contained: Bool)
    {
        var rows: [String] = []
        var contained = true
        for a in attacks {
            let r = NetDriverProbe.run(a)
            progress(r)
            let ok = a.expected.contains(r.signature)
            contained = contained && ok
            let evidence = r.evidence.replacingAll("|", with: "/")
            rows.append(
                "| \(a.name) | \(a.rule.rawValue) | \(r.signature) | \(ok ? "yes" : "**no**") | \(Int(r.milliseconds)) ms | \(evidence) |"
            )
        }
        let header = """
            # virtio-net adversary against the RingFence net driver

            \(attacks.count) attacks (`ringfence audit --device net --list`); every outcome \(contained ? "is" : "is NOT") one the catalogue expects.

            | attack | rule | outcome | as expected | time | evidence |
            |---|---|---|---|---|---|

            """
        return (header + rows.joined(separator: "\n") + "\n", contained)
    }
}

extension String {
    fileprivate func replacingAll(_ target: Character, with replacement: String) -> String {
        var out = ""
        for c in self { if c == target { out += replacement } else { out.append(c) } }
        return out
    }
}

/// Keeps a memory table (and so its mappings) alive on another thread.
private final class MemoryHold: @unchecked Sendable {
    let memory: GuestMemory
    init(_ memory: GuestMemory) { self.memory = memory }
}

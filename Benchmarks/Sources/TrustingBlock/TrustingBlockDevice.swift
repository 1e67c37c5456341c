#if canImport(Glibc)
import Glibc
#endif
import SharedMemory
import TrustingRing
import VhostUser
import VirtioBlock
import Virtqueue

/// What the trusting driver hands back: the device's status byte as written, and where
/// the data is (inside the shared region: the device may still change it).
public struct TrustedBlockCompletion {
    public let tag: UInt64
    public let status: UInt8
    public let data: UnsafeMutableRawPointer
}

public enum TrustingBlockError: Error, CustomStringConvertible {
    case control(String)
    case system(String)
    public var description: String {
        switch self {
        case .control(let s): "vhost-user: \(s)"
        case .system(let s): s
        }
    }
}

/// BASELINE ONLY — never use outside the benchmarks (docs/design.md R8: the library has one
/// mode, hardened). A deliberately trusting virtio-blk driver, one queue, reads only, in
/// the style of a classic in-kernel driver:
///
/// - no bounce (breaks R7): each request slot owns a page-aligned data buffer inside the
///   shared region, the device writes straight into it, and the caller reads it there
///   (zero copy); headers and status bytes sit in the shared region too;
/// - no validation (breaks R2/R3): config used as served (capacity not checked), the
///   used ring through `TrustingDriverQueue` (id and len as written), the status byte
///   handed back as read, no check that it is a known value or was written at all;
/// - no deadlines (breaks R5): `wait()` blocks on the call eventfd until something comes
///   (a one-second poll timeout only so a dead back-end cannot hang a benchmark forever);
///   the control socket is not watched.
///
/// Control path: the same `VhostUser.Frontend` as the hardened `VirtioBlockDriver` (the issue
/// allows it), the same features asked (so EVENT_IDX is negotiated the same way), the same
/// synthetic addresses and sealed memfd; so the two drivers differ only in the data path.
public final class TrustingBlockDevice {
    struct Slot {
        var tag: UInt64 = 0
    }

    /// Mutable private state, behind a pointer as C would keep it (no dynamic exclusivity
    /// checks on class properties: the baseline must not pay Swift overheads a C driver
    /// would not).
    public struct Counters {
        var freeCount = 0
        public var inFlight = 0
        /// Kicks sent and sleeps on the call eventfd (the benchmark's diagnostics).
        public var kicks = 0
        public var sleeps = 0
    }

    public static let guestBase: UInt64 = 0x1_0000_0000
    public static let userBase: UInt64 = 0x5a5a_0000_0000
    /// Per slot: 16-byte header at +0, status at +16 (one 64-byte line).
    static let controlStride = 64

    public let frontend: Frontend
    public let capacityBytes: UInt64
    public let queueSize: Int
    public let requestBytes: Int
    public let eventIndex: Bool
    let region: SharedRegion
    let ring: TrustingDriverQueue
    let kickNotifier: Notifier
    let callNotifier: Notifier
    let control: UnsafeMutableRawPointer
    let controlGuest: UInt64
    let data: UnsafeMutableRawPointer
    let dataGuest: UInt64
    let dataStride: Int
    let slots: UnsafeMutablePointer<Slot>
    let freeSlots: UnsafeMutablePointer<Int>
    let segments: UnsafeMutableBufferPointer<Segment>
    let state: UnsafeMutablePointer<Counters>
    public var counters: Counters { state.pointee }
    public var inFlight: Int { state.pointee.inFlight }
    /// Polls before blocking, as `VirtioBlockDriver.Options.spinIterations`.
    public let spinIterations: Int
    var closed = false

    /// Connects and sets up queue 0 with `queueSize` descriptors and a data buffer of
    /// `requestBytes` per slot.
    public static func connect(
        socket path: String, queueSize: Int = 128, requestBytes: Int = 4096, replyTimeout: Double = 5,
        spinIterations: Int = 256
    ) throws(TrustingBlockError) -> TrustingBlockDevice {
        do {
            let f = try Frontend.connect(path: path, replyTimeout: replyTimeout)
            return try TrustingBlockDevice(
                frontend: f, queueSize: queueSize, requestBytes: requestBytes, spinIterations: spinIterations)
        } catch let e as TrustingBlockError {
            throw e
        } catch {
            throw .control("\(error)")
        }
    }

    init(frontend: Frontend, queueSize: Int, requestBytes: Int, spinIterations: Int) throws {
        self.frontend = frontend
        self.spinIterations = spinIterations
        self.queueSize = queueSize
        self.requestBytes = requestBytes
        try frontend.handshake()
        let raw = try frontend.getConfig(size: BlockConfig.size)
        let acked = try frontend.setFeatures(VirtioBlockDriver.wantedFeatures)
        capacityBytes = BlockConfig.decode(raw).capacity &* 512  // trusted as served
        eventIndex = acked & FeatureBits.ringEventIndex != 0

        func align(_ x: Int, _ a: Int) -> Int { (x + a - 1) & ~(a - 1) }
        let placement = SplitRingPlacement(queueSize: queueSize, at: 0)
        let controlOffset = align(placement.endOffset, 64)
        let dataOffset = align(controlOffset + queueSize * Self.controlStride, 4096)
        dataStride = align(requestBytes, 4096)
        let size = align(dataOffset + queueSize * dataStride, 4096)
        do {
            region = try SharedRegion(name: "ringfence-trusting-blk", size: size)
        } catch {
            throw TrustingBlockError.system("\(error)")
        }
        let base = region.base
        ring = TrustingDriverQueue(
            memory: DriverRingMemory(
                queueSize: UInt16(truncatingIfNeeded: queueSize), descriptors: base + placement.descriptorOffset,
                avail: base + placement.availOffset, used: base + placement.usedOffset),
            eventIndex: eventIndex)
        control = base + controlOffset
        controlGuest = Self.guestBase + UInt64(controlOffset)
        data = base + dataOffset
        dataGuest = Self.guestBase + UInt64(dataOffset)
        slots = .allocate(capacity: queueSize)
        slots.initialize(repeating: Slot(), count: queueSize)
        freeSlots = .allocate(capacity: queueSize)
        for i in 0..<queueSize { freeSlots[i] = queueSize - 1 - i }
        state = .allocate(capacity: 1)
        state.initialize(to: Counters(freeCount: queueSize))
        segments = .allocate(capacity: 3)
        segments.initialize(repeating: Segment(address: 0, length: 0, deviceWritable: false))
        do {
            kickNotifier = try Notifier()
            callNotifier = try Notifier()
        } catch {
            throw TrustingBlockError.system("\(error)")
        }
        try frontend.setMemTable(
            [MemoryRegionDescription(
                guestAddress: Self.guestBase, size: UInt64(size), userAddress: Self.userBase, mmapOffset: 0)],
            descriptors: [region.fileDescriptor])
        try frontend.setUpQueue(
            index: 0, size: queueSize, descriptor: Self.userBase + UInt64(placement.descriptorOffset),
            avail: Self.userBase + UInt64(placement.availOffset), used: Self.userBase + UInt64(placement.usedOffset),
            kick: kickNotifier.fileDescriptor, call: callNotifier.fileDescriptor)
        try frontend.setQueueEnabled(index: 0, true)
        try frontend.sync()
    }

    deinit {
        close()
        slots.deallocate()
        freeSlots.deallocate()
        segments.deallocate()
        state.deallocate()
    }

    /// Posts a read of `length` (<= requestBytes) bytes at byte `offset`. False when every
    /// slot or descriptor is taken.
    @inline(__always)
    public func submitRead(offset: UInt64, length: Int, tag: UInt64) -> Bool {
        let freeCount = state.pointee.freeCount
        guard freeCount > 0 else { return false }
        let slot = freeSlots[freeCount - 1]
        let header = control + slot * Self.controlStride
        SharedAccess.store32(header, BlockProtocol.RequestType.read.rawValue)
        SharedAccess.store32(header + 4, 0)
        SharedAccess.store64(header + 8, offset >> 9)
        let headerGuest = controlGuest &+ UInt64(slot * Self.controlStride)
        segments[0] = Segment(address: headerGuest, length: 16, deviceWritable: false)
        segments[1] = Segment(
            address: dataGuest &+ UInt64(slot * dataStride), length: UInt32(truncatingIfNeeded: length),
            deviceWritable: true)
        segments[2] = Segment(address: headerGuest &+ 16, length: 1, deviceWritable: true)
        guard ring.add(UnsafeBufferPointer(segments), token: UInt64(slot)) != nil else { return false }
        state.pointee.freeCount = freeCount - 1
        slots[slot].tag = tag
        state.pointee.inFlight += 1
        return true
    }

    /// Publishes what was posted; kicks if the device asked for it.
    @inline(__always)
    public func kick() {
        if ring.publish() {
            kickNotifier.signal()
            state.pointee.kicks &+= 1
        }
    }

    /// The next completion as the device reported it, or nil. Never blocks.
    @inline(__always)
    public func poll() -> TrustedBlockCompletion? {
        kick()
        guard let c = ring.nextCompletion() else { return nil }
        let slot = Int(truncatingIfNeeded: c.token)  // trusting: the token of whatever id came back
        let status = (control + slot * Self.controlStride + 16).load(as: UInt8.self)
        freeSlots[state.pointee.freeCount] = slot
        state.pointee.freeCount += 1
        state.pointee.inFlight -= 1
        return TrustedBlockCompletion(tag: slots[slot].tag, status: status, data: data + slot * dataStride)
    }

    /// Spins `spinIterations` polls, then blocks on the call eventfd (no deadline).
    public func wait() -> TrustedBlockCompletion? {
        var spins = 0
        while true {
            if let c = poll() { return c }
            if state.pointee.inFlight == 0 { return nil }
            spins += 1
            if spins <= spinIterations { continue }
            if ring.enableInterrupts() { continue }
            state.pointee.sleeps &+= 1
            var pfd = pollfd(fd: callNotifier.fileDescriptor, events: Int16(POLLIN), revents: 0)
            // Benchmark safety net only: the back-end hung up or spoke.
            if Glibc.poll(&pfd, 1, 1000) == 0 && UnixChannel.peerState(of: frontend.channel.channel.fileDescriptor) != .quiet {
                return nil
            }
            callNotifier.drain()
        }
    }

    /// Stops the ring (GET_VRING_BASE) and closes the connection.
    public func close() {
        guard !closed else { return }
        closed = true
        _ = try? frontend.getVringBase(index: 0)
        frontend.close()
    }
}

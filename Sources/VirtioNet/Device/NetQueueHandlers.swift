public import SharedMemory
public import VhostUser
public import Virtqueue

/// Serves one transmit queue (the driver's frames out): each chain's header and frame are
/// copied once, together, into private scratch (R2) and checked there (R3) before the
/// fabric sees them (the sink too: it drops the private copy); a chain that fails is
/// completed with length 0 and counted, and the queue goes on.
public final class NetTransmitHandler: QueueHandler {
    static let batch = 32
    let device: VirtioNetDevice
    let pair: Int
    let features: UInt64
    /// Largest frame (without the header) a chain may carry.
    let maximumFrame: Int
    /// Bytes between two scratch slots: header and largest frame, rounded to a cache line.
    let slotStride: Int
    /// The chain being popped, behind a pointer: a stored `var` passed `inout` for every
    /// frame would cost a dynamic exclusivity check each time.
    let chain: UnsafeMutablePointer<DescriptorChain>
    let scratch: UnsafeMutableRawPointer
    let refs: UnsafeMutablePointer<FrameRef>
    /// Buffers a packed ring popped in one `nextBuffers` call.
    let popped: UnsafeMutablePointer<PoppedBuffer>
    var rejectionLog = LogThrottle()

    init(device: VirtioNetDevice, pair: Int, features: UInt64) {
        self.device = device
        self.pair = pair
        self.features = features
        maximumFrame = device.maximumFrame
        slotStride = (NetProtocol.headerSize + maximumFrame + 63) & ~63
        chain = .allocate(capacity: 1)
        chain.initialize(to: DescriptorChain())
        scratch = .allocate(byteCount: Self.batch * slotStride, alignment: 64)
        refs = .allocate(capacity: Self.batch)
        popped = .allocate(capacity: Self.batch)
    }

    deinit {
        chain.deinitialize(count: 1)
        chain.deallocate()
        scratch.deallocate()
        refs.deallocate()
        popped.deallocate()
    }

    public func serve(_ queue: any DeviceRing, memory: GuestMemory, budget: Int) throws(Violation) -> Int {
        // The ring's concrete type, once per batch: its calls are then direct (no witness
        // table per frame).
        if let q = queue as? PackedDeviceQueue { return try servePacked(q, memory: memory, budget: budget) }
        if let q = queue as? DeviceQueue { return try serveBatch(q, memory: memory, budget: budget) }
        return try serveBatch(queue, memory: memory, budget: budget)
    }

    @inline(__always)
    func serveBatch<Ring: DeviceRing>(_ queue: Ring, memory: GuestMemory, budget: Int) throws(Violation) -> Int {
        // At most one batch per call: the worker publishes used.idx after each, so the
        // driver reclaims descriptors while we work on the next batch (a whole ring per
        // publish leaves it waiting on a full ring).
        let budget = min(budget, Self.batch)
        var batch = Batch()
        while batch.count < budget {
            guard try serveChain(queue, memory: memory, batch: &batch) else { break }
        }
        finish(batch)
        return batch.count
    }

    /// A packed ring: runs of chains of one direct descriptor (every frame DPDK's and
    /// Linux's drivers post) are popped several at a time (`nextBuffers`) and copied
    /// straight from their one buffer; the slot a run stops at goes through `nextChain`
    /// (a walked chain, a buffer outside one region, a violation, or nothing).
    @inline(__always)
    func servePacked(_ queue: PackedDeviceQueue, memory: GuestMemory, budget: Int) throws(Violation) -> Int {
        let budget = min(budget, Self.batch)
        var batch = Batch()
        while batch.count < budget {
            let n = try queue.nextBuffers(into: popped, capacity: budget - batch.count, memory: memory)
            for i in 0..<n {
                let slot = scratch + batch.frames * slotStride
                let length = take(popped[i], into: slot)
                accept(length, slot: slot, batch: &batch)
            }
            // Transmitted buffers' used length means nothing: 0 (with IN_ORDER one used
            // descriptor per batch).
            queue.completeUnwritten(popped, count: n)
            batch.count += n
            // Buffers popped before a violation are served; the broken queue throws next time.
            guard batch.count < budget, !queue.isBroken else { break }
            guard try serveChain(queue, memory: memory, batch: &batch) else { break }
        }
        finish(batch)
        return batch.count
    }

    /// One transmit call's running totals.
    struct Batch {
        var count = 0
        var frames = 0
        var rejected = 0
        var bytes = 0
    }

    /// Pops and serves one chain through `nextChain`; false when the ring had none.
    @inline(__always)
    func serveChain<Ring: DeviceRing>(_ queue: Ring, memory: GuestMemory, batch: inout Batch) throws(Violation)
        -> Bool
    {
        switch try queue.nextChain(into: &chain.pointee, memory: memory) {
        case .empty:
            return false
        case .rejected(let head, let violation):
            queue.completeUnwritten(head: head)
            batch.rejected += 1
            device.count { $0.violations[violation.rule.rawValue, default: 0] &+= 1 }
            if rejectionLog.admit() { device.onEvent(.requestRejected(queue: 2 * pair + 1, violation)) }
        case .ready:
            let slot = scratch + batch.frames * slotStride
            accept(take(into: slot), slot: slot, batch: &batch)
            // The used length of a transmitted buffer means nothing: 0 (with IN_ORDER a
            // packed ring writes one used descriptor per batch).
            queue.completeUnwritten(head: chain.pointee.head)
        }
        batch.count += 1
        return true
    }

    /// Counts a frame `take` copied into `slot` (`length` >= 0) or refused (-1).
    @inline(__always)
    func accept(_ length: Int, slot: UnsafeMutableRawPointer, batch: inout Batch) {
        if length >= 0 {
            refs[batch.frames] = FrameRef(base: UnsafeRawPointer(slot + NetProtocol.headerSize), length: length)
            batch.frames += 1
            batch.bytes += length
        } else {
            batch.rejected += 1
            device.count { $0.violations[Rule.r3.rawValue, default: 0] &+= 1 }
        }
    }

    /// Hands the call's frames to the fabric and counts them.
    @inline(__always)
    func finish(_ batch: Batch) {
        guard batch.count > 0 else { return }
        device.fabric.forward(refs, count: batch.frames, from: device.port, pair: pair)
        let sent = batch.count - batch.rejected
        device.count { s in
            s.transmitted &+= UInt64(sent)
            s.transmittedBytes &+= UInt64(batch.bytes)
            s.transmitRejected &+= UInt64(batch.rejected)
        }
        device.fabric.rejected(batch.rejected)
    }

    /// `take(into:)` for a buffer `nextBuffers` popped (the chain's one segment): the same
    /// checks, one copy.
    @inline(__always)
    func take(_ buffer: PoppedBuffer, into slot: UnsafeMutableRawPointer) -> Int {
        guard !buffer.deviceWritable, let source = buffer.bytes.baseAddress else { return -1 }
        let total = buffer.bytes.count
        guard total >= NetProtocol.headerSize + NetProtocol.ethernetHeaderSize,
            total <= NetProtocol.headerSize + maximumFrame
        else { return -1 }
        let length = total - NetProtocol.headerSize
        SharedAccess.copy(from: source, to: slot, count: total)
        guard
            NetHeader.isPlain(bytes: slot)
                || NetHeader(bytes: slot).problem(frameLength: length, partialChecksum: false) == nil
        else { return -1 }
        return length
    }

    /// Copies the header and frame in `chain` once into `slot` (header first) and checks
    /// them there; the frame's length, or -1 to refuse it.
    @inline(__always)
    func take(into slot: UnsafeMutableRawPointer) -> Int {
        let c = chain
        // A transmit chain is device-readable only; header and frame may be split anywhere.
        guard c.pointee.writableLength == 0 else { return -1 }
        let total = c.pointee.readableLength
        guard total >= UInt64(NetProtocol.headerSize + NetProtocol.ethernetHeaderSize),
            total <= UInt64(NetProtocol.headerSize + maximumFrame)
        else { return -1 }
        let length = Int(total) - NetProtocol.headerSize
        ChainBytes.gatherReadable(c, count: Int(total), into: slot)
        // No offload offered (CSUM, HOST_TSO*): any gso or NEEDS_CSUM is refused.
        guard
            NetHeader.isPlain(bytes: slot)
                || NetHeader(bytes: slot).problem(frameLength: length, partialChecksum: false) == nil
        else { return -1 }
        return length
    }
}

/// Serves one receive queue: frames waiting in the port's inbox are written into the
/// driver's buffers (write-only), header first with num_buffers = the buffers used,
/// bounded by the ring. A frame that finds no room waits; one that cannot fit at all is
/// dropped and counted.
public final class NetReceiveHandler: QueueHandler {
    let device: VirtioNetDevice
    let pair: Int
    let inbox: NetInbox
    let mergeable: Bool
    /// Popped chains not yet completed (a frame waiting for more buffers).
    var held: [DescriptorChain]
    var heldCount = 0
    var heldCapacity = 0
    let header: UnsafeMutableRawPointer
    var rejectionLog = LogThrottle()
    /// Most buffers one frame may take (num_buffers is bounded by this and the ring).
    static let maximumBuffers = 64

    init(device: VirtioNetDevice, pair: Int, inbox: NetInbox, features: UInt64) {
        self.device = device
        self.pair = pair
        self.inbox = inbox
        mergeable = features & NetProtocol.Feature.mergeableRxBuffers != 0
        held = (0..<Self.maximumBuffers).map { _ in DescriptorChain() }
        header = .allocate(byteCount: NetProtocol.headerSize, alignment: 8)
        header.initializeMemory(as: UInt8.self, repeating: 0, count: NetProtocol.headerSize)
    }

    deinit { header.deallocate() }

    public func attach(wake: QueueWake) { inbox.setWake(wake) }

    /// Posted buffers are work only with frames to put in them (or a frame waiting for
    /// more buffers): otherwise the thread blocks until the inbox's wake or a kick.
    public func workIsAvailable(_ queue: any DeviceRing) -> Bool { heldCount > 0 || inbox.waiting > 0 }

    public func serve(_ queue: any DeviceRing, memory: GuestMemory, budget: Int) throws(Violation) -> Int {
        let (first, waiting) = inbox.peek()
        guard waiting > 0 else { return 0 }
        var consumed = 0
        var completed = 0
        var delivered = 0
        var deliveredBytes = 0
        var dropped = 0
        var rejected = 0
        let limit = min(Self.maximumBuffers, Int(queue.queueSize))
        frames: while consumed < waiting && completed < budget {
            let frame = inbox.frame(at: first + consumed)
            let need = NetProtocol.headerSize + frame.count
            while heldCapacity < need && (mergeable || heldCount == 0) {
                guard heldCount < limit else {
                    // Buffers too small to ever hold the frame: give them back empty.
                    for i in 0..<heldCount { queue.complete(head: held[i].head, length: 0) }
                    completed += heldCount
                    rejected += heldCount
                    heldCount = 0
                    heldCapacity = 0
                    dropped += 1
                    consumed += 1
                    continue frames
                }
                switch try queue.nextChain(into: &held[heldCount], memory: memory) {
                case .empty:
                    break frames
                case .rejected(let head, let violation):
                    completed += returnHeldBeforeRejecting(queue)
                    queue.complete(head: head, length: 0)
                    completed += 1
                    rejected += 1
                    device.count { $0.violations[violation.rule.rawValue, default: 0] &+= 1 }
                    if rejectionLog.admit() { device.onEvent(.requestRejected(queue: 2 * pair, violation)) }
                case .ready:
                    let c = held[heldCount]
                    // A receive buffer is device-writable only.
                    guard c.readableLength == 0, c.writableLength > 0 else {
                        completed += returnHeldBeforeRejecting(queue)
                        queue.complete(head: c.head, length: 0)
                        completed += 1
                        rejected += 1
                        device.count { $0.violations[Rule.r3.rawValue, default: 0] &+= 1 }
                        continue
                    }
                    heldCount += 1
                    heldCapacity += Int(clamping: c.writableLength)
                }
            }
            consumed += 1
            guard heldCapacity >= need else {
                dropped += 1  // without mergeable buffers: the posted buffer is too small
                continue
            }
            write(frame, buffers: heldCount, to: queue)
            completed += heldCount
            delivered += 1
            deliveredBytes += frame.count
            heldCount = 0
            heldCapacity = 0
        }
        inbox.release(consumed)
        if consumed > 0 {
            device.count { s in
                s.received &+= UInt64(delivered)
                s.receivedBytes &+= UInt64(deliveredBytes)
                s.receiveDropped &+= UInt64(dropped)
                s.receiveRejected &+= UInt64(rejected)
            }
        }
        return completed
    }

    /// With VIRTIO_F_IN_ORDER buffers are used in the order they were posted, so before a
    /// refused buffer is completed the ones held for the waiting frame are given back
    /// first, empty (the frame waits for the buffers after them). Returns how many.
    func returnHeldBeforeRejecting(_ queue: any DeviceRing) -> Int {
        guard queue.features.inOrder else { return 0 }
        let n = heldCount
        for i in 0..<n { queue.complete(head: held[i].head, length: 0) }
        heldCount = 0
        heldCapacity = 0
        return n
    }

    /// Header (num_buffers = `buffers`) and frame across the held chains; each completed
    /// with what was written into it.
    func write(_ frame: UnsafeRawBufferPointer, buffers: Int, to queue: any DeviceRing) {
        header.storeBytes(of: UInt16(buffers).littleEndian, toByteOffset: 10, as: UInt16.self)
        var fromFrame = 0
        for i in 0..<buffers {
            let c = held[i]
            var written = 0
            if i == 0 {
                written = ChainBytes.scatter(header, count: NetProtocol.headerSize, into: c.writable, at: 0)
            }
            let room = Int(clamping: c.writableLength) - written
            let n = min(room, frame.count - fromFrame)
            if n > 0, let base = frame.baseAddress {
                written += ChainBytes.scatter(base + fromFrame, count: n, into: c.writable, at: written)
                fromFrame += n
            }
            queue.complete(head: c.head, length: UInt32(truncatingIfNeeded: written))
        }
    }

    public func stopping(_ queue: any DeviceRing, memory: GuestMemory) -> Int {
        let n = heldCount
        for i in 0..<n { queue.complete(head: held[i].head, length: 0) }
        heldCount = 0
        heldCapacity = 0
        return n
    }
}

/// Serves the control queue: `{u8 class; u8 command; payload}` readable, one ack byte
/// writable. The command is copied once (bounded, R2/R5), checked, and answered OK or
/// ERR; a chain without room for both is completed with length 0.
public final class NetControlHandler: QueueHandler {
    let device: VirtioNetDevice
    let features: UInt64
    var chain = DescriptorChain()
    let command: UnsafeMutableRawPointer
    static let maximumCommand = 2 + NetProtocol.Control.maximumPayload

    init(device: VirtioNetDevice, features: UInt64) {
        self.device = device
        self.features = features
        command = .allocate(byteCount: Self.maximumCommand, alignment: 8)
    }

    deinit { command.deallocate() }

    public func serve(_ queue: any DeviceRing, memory: GuestMemory, budget: Int) throws(Violation) -> Int {
        var count = 0
        while count < budget {
            switch try queue.nextChain(into: &chain, memory: memory) {
            case .empty:
                return count
            case .rejected(let head, _):
                queue.complete(head: head, length: 0)
                device.count { $0.controlRefused &+= 1 }
            case .ready:
                guard chain.readableLength >= 2, chain.writableLength >= 1 else {
                    queue.complete(head: chain.head, length: 0)
                    device.count { $0.controlRefused &+= 1 }
                    count += 1
                    continue
                }
                let ack = execute()
                var byte = ack
                ChainBytes.scatter(&byte, count: 1, into: chain.writable, at: 0)
                queue.complete(head: chain.head, length: 1)
                device.count { s in
                    s.controlCommands &+= 1
                    if ack != NetProtocol.Control.ok { s.controlRefused &+= 1 }
                }
            }
            count += 1
        }
        return count
    }

    /// The ack for the command in `chain`.
    func execute() -> UInt8 {
        typealias C = NetProtocol.Control
        typealias F = NetProtocol.Feature
        guard chain.readableLength <= UInt64(Self.maximumCommand) else { return C.err }
        let length = Int(chain.readableLength)
        ChainBytes.gather(chain.readable, at: 0, count: length, into: command)
        let cls = command.load(as: UInt8.self)
        let cmd = command.load(fromByteOffset: 1, as: UInt8.self)
        let payload = UnsafeRawBufferPointer(start: command + 2, count: length - 2)
        switch (cls, cmd) {
        case (C.classRx, C.rxPromisc), (C.classRx, C.rxAllMulti):
            return features & F.ctrlRx != 0 && payload.count == 1 ? C.ok : C.err
        case (C.classMAC, C.macAddrSet):
            guard features & F.ctrlMACAddr != 0, payload.count == 6, NetInfo.isUsableMAC(Array(payload)) else {
                return C.err
            }
            return C.ok
        case (C.classMAC, C.macTableSet):
            // Two tables, each {le32 entries; entries * 6 bytes}, exactly filling the payload.
            guard features & F.ctrlRx != 0, payload.count >= 4 else { return C.err }
            let first = Int(payload.loadUnaligned(as: UInt32.self).littleEndian)
            guard first <= 128, 4 + first * 6 + 4 <= payload.count else { return C.err }
            let second = Int(payload.loadUnaligned(fromByteOffset: 4 + first * 6, as: UInt32.self).littleEndian)
            guard second <= 128, 8 + (first + second) * 6 == payload.count else { return C.err }
            return C.ok
        case (C.classMQ, C.mqPairsSet):
            guard features & F.mq != 0, payload.count == 2 else { return C.err }
            let pairs = Int(payload.loadUnaligned(as: UInt16.self).littleEndian)
            return pairs >= 1 && pairs <= device.options.queuePairs ? C.ok : C.err
        case (C.classAnnounce, C.announceAck):
            guard payload.isEmpty else { return C.err }
            device.status.bitwiseAnd(~NetProtocol.Status.announce, ordering: .relaxed)
            return C.ok
        default:
            return C.err
        }
    }
}

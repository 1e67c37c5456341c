#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Synchronization
public import SharedMemory
import Virtqueue
public import VhostUser
public import VirtioBlock

/// What a `MisbehavingBlockBackend` does wrong. Only what the real back-end's hooks
/// cannot express lives here; every other attack is in the `Adversary` catalogue, run
/// through the real `Backend` and blk device (`AdversaryDevice`).
public enum BlockMisbehaviour: Sendable, Equatable {
    case none
    /// Acks 0, then closes the socket (what libvhost-user does on failure).
    case ackThenClose(Request)
    /// Speaks first on the control socket (a back-end never may without BACKEND_REQ; the
    /// real back-end only ever answers, so no hook can do this).
    case unsolicitedMessage
    /// Handles this request, then never reads the control socket again (it stays open):
    /// the driver's sends fill the socket and its replies never come.
    case deafAfter(Request)
}

/// A vhost-user-blk back-end in a thread of the test process that speaks just enough of
/// the protocol and misbehaves on command. Its disk is a private byte array.
///
/// Not a device implementation: it trusts the driver, checks little, and exists as a
/// configurable peer (any config, features, queue count) for driver unit tests, and for
/// the two protocol-level misbehaviours the hooks of the real back-end cannot express.
public final class MisbehavingBlockBackend: @unchecked Sendable {
    public let misbehaviour: BlockMisbehaviour
    /// Requests served correctly before the data-plane misbehaviour starts.
    public let after: Int
    public var config: BlockConfig
    public var features: UInt64
    public var queueNum: UInt64
    /// What GET_PROTOCOL_FEATURES offers.
    public var protocolFeatures: ProtocolFeatures = [.replyAck, .config, .multiQueue, .backendRequest, .hostNotifier]
    public let driverChannel: UnixChannel
    let channel: MessageChannel
    let stopped = Atomic<Bool>(false)
    let state = Mutex<Report>(Report())

    /// What the back-end observed (for assertions).
    public struct Report: Sendable {
        public var requestsServed = 0
        public var finished = false
    }

    public var report: Report { state.withLock { $0 } }

    public static func defaultConfig(capacityBytes: UInt64 = 1 << 20) -> BlockConfig {
        var c = BlockConfig()
        c.capacity = capacityBytes / 512
        c.segMax = 8
        c.blockSize = 512
        c.numQueues = 2
        c.maxDiscardSectors = 2048
        c.maxDiscardSegments = 1
        c.maxWriteZeroesSectors = 2048
        c.maxWriteZeroesSegments = 1
        return c
    }

    public static let defaultFeatures: UInt64 =
        FeatureBits.version1 | FeatureBits.protocolFeatures | FeatureBits.ringEventIndex
        | BlockProtocol.Feature.segMax | BlockProtocol.Feature.blockSize | BlockProtocol.Feature.flush
        | BlockProtocol.Feature.multiQueue | BlockProtocol.Feature.discard | BlockProtocol.Feature.writeZeroes

    // set up by the control thread
    var memory = GuestMemory()
    var acked: UInt64 = 0
    var queueSizes: [Int: Int] = [:]
    var queueAddresses: [Int: VringAddress] = [:]
    var kicks: [Int: Notifier] = [:]
    var calls: [Int: Notifier] = [:]
    var queues: [Int: DeviceQueue] = [:]
    var disk: [UInt8]
    var served = 0
    /// `deafAfter`: the control socket is no longer read.
    var deaf = false

    public init(
        _ misbehaviour: BlockMisbehaviour = .none, after: Int = 0,
        config: BlockConfig = MisbehavingBlockBackend.defaultConfig(),
        features: UInt64 = MisbehavingBlockBackend.defaultFeatures, queueNum: UInt64 = 2
    ) throws {
        self.misbehaviour = misbehaviour
        self.after = after
        self.config = config
        self.features = features
        self.queueNum = queueNum
        let (a, b) = try UnixChannel.pair()
        driverChannel = a
        channel = MessageChannel(b)
        disk = [UInt8](repeating: 0, count: Int(min(config.capacity, 1 << 13)) * 512)
    }

    /// Starts serving on a thread of its own.
    public func start() {
        let t = Thread { [self] in
            run()
            channel.channel.shutdown()
            state.withLock { $0.finished = true }
        }
        t.start()
    }

    public func stop() {
        stopped.store(true, ordering: .releasing)
        channel.channel.shutdown()
    }

    var misbehaving: Bool { served >= after }

    /// A copy of every byte the driver shared (the leak probe: whatever the driver keeps
    /// private must never show up here).
    public func dumpSharedMemory() -> [UInt8] {
        sharedSnapshot.withLock { $0 }
    }

    /// Taken by the back-end thread on request, so the mapping is read where it lives.
    let sharedSnapshot = Mutex<[UInt8]>([])
    let snapshotRequested = Atomic<Bool>(false)

    /// Asks the back-end thread for a snapshot and waits for it (at most 2 s).
    public func snapshotSharedMemory() -> [UInt8] {
        snapshotRequested.store(true, ordering: .releasing)
        let end = Deadline.after(seconds: 2)
        while snapshotRequested.load(ordering: .acquiring) && !end.hasPassed { usleep(1000) }
        return dumpSharedMemory()
    }

    func takeSnapshotIfRequested() {
        guard snapshotRequested.load(ordering: .acquiring) else { return }
        var bytes: [UInt8] = []
        for r in memory.regions { bytes += Array(UnsafeRawBufferPointer(r.mapping.bytes)) }
        sharedSnapshot.withLock { $0 = bytes }
        snapshotRequested.store(false, ordering: .releasing)
    }

    func run() {
        while !stopped.load(ordering: .acquiring) {
            // Control messages first, then the rings.
            var pfd = pollfd(fd: channel.channel.fileDescriptor, events: Int16(POLLIN), revents: 0)
            var fds = [pfd]
            let queueIDs = queues.keys.sorted()
            for q in queueIDs {
                if let k = kicks[q] { fds.append(pollfd(fd: k.fileDescriptor, events: Int16(POLLIN), revents: 0)) }
            }
            _ = Glibc.poll(&fds, nfds_t(fds.count), 10)
            pfd = fds[0]
            if pfd.revents != 0 && !deaf {
                guard handleControl() else { return }
            }
            takeSnapshotIfRequested()
            for q in queueIDs {
                kicks[q]?.drain()
                guard serve(queue: q) else { return }
            }
        }
    }

    // MARK: control

    func reply(_ request: Request, _ payload: [UInt8], descriptors: [Int32] = []) {
        let header = MessageHeader(
            request: request.rawValue, flags: HeaderFlags.version | HeaderFlags.reply, size: UInt32(payload.count))
        try? channel.channel.send(header.encoded + payload, descriptors: descriptors)
        for fd in descriptors { closeDescriptor(fd) }
    }

    func ack(_ message: Message, _ request: Request) -> Bool {
        if case .ackThenClose(request) = misbehaviour {
            reply(request, U64Payload(0).encoded)
            return false
        }
        if message.header.needsReply {
            reply(request, U64Payload(0).encoded)
        }
        return true
    }

    /// Returns false when the connection should end.
    func handleControl() -> Bool {
        let message: Message
        do {
            message = try channel.receive(until: .after(seconds: 5))
        } catch {
            return false
        }
        guard let request = message.request else {
            message.closeDescriptors()
            return false
        }
        if case .deafAfter(request) = misbehaviour { deaf = true }
        switch request {
        case .getFeatures: reply(request, U64Payload(features).encoded)
        case .getProtocolFeatures:
            reply(request, U64Payload(protocolFeatures.rawValue).encoded)
        case .getQueueNum: reply(request, U64Payload(queueNum).encoded)
        case .getConfig:
            let asked = (try? ConfigSpace.decode(message.payload))?.payload.count ?? BlockConfig.size
            let bytes = Array((config.encoded + [UInt8](repeating: 0, count: 256)).prefix(asked))
            reply(request, ConfigSpace(offset: 0, payload: bytes).encoded)
        case .setFeatures:
            acked = (try? U64Payload.decode(message.payload).value) ?? 0
            return ack(message, request)
        case .setMemTable:
            defer { message.closeDescriptors() }
            guard let table = try? MemoryTable.decode(message.payload), table.regions.count == message.descriptors.count
            else { return false }
            var m = GuestMemory()
            for (r, fd) in zip(table.regions, message.descriptors) {
                guard
                    let region = try? SharedRegion(
                        mapping: OwnedDescriptor(dup(fd)), offset: r.mmapOffset, size: r.size),
                    (try? m.add(GuestRegion(guestAddress: r.guestAddress, userAddress: r.userAddress, mapping: region)))
                        != nil
                else { return false }
            }
            memory = m
            return ack(message, request)
        case .setVringNum:
            if let s = try? VringState.decode(message.payload) { queueSizes[Int(s.index)] = Int(s.num) }
            return ack(message, request)
        case .setVringAddr:
            if let a = try? VringAddress.decode(message.payload) { queueAddresses[Int(a.index)] = a }
            return ack(message, request)
        case .setVringKick, .setVringCall:
            // A duplicate is adopted; the message's own descriptors are closed with it.
            defer { message.closeDescriptors() }
            guard let f = try? VringFile.decode(message.payload), let fd = message.descriptors.first,
                let n = try? Notifier(adopting: OwnedDescriptor(dup(fd)))
            else { return false }
            if request == .setVringKick { kicks[Int(f.index)] = n } else { calls[Int(f.index)] = n }
            return ack(message, request)
        case .setVringEnable:
            if let s = try? VringState.decode(message.payload), s.num == 1 {
                let i = Int(s.index)
                if let size = queueSizes[i], let a = queueAddresses[i] {
                    queues[i] = try? DeviceQueue(
                        queueSize: size, userDescriptorAddress: a.descriptor, userAvailAddress: a.avail,
                        userUsedAddress: a.used,
                        features: RingFeatures(eventIndex: acked & FeatureBits.ringEventIndex != 0), memory: memory)
                }
            }
            return ack(message, request)
        case .getVringBase:
            let s = (try? VringState.decode(message.payload)) ?? VringState(index: 0, num: 0)
            let base = queues[Int(s.index)]?.lastAvail ?? 0
            queues[Int(s.index)] = nil
            reply(request, VringState(index: s.index, num: UInt32(base)).encoded)
        default:
            message.closeDescriptors()
            return ack(message, request)
        }
        return true
    }

    // MARK: data

    /// Serves what is available on queue `q`. Returns false to end the connection.
    func serve(queue q: Int) -> Bool {
        guard let queue = queues[q] else { return true }
        var chain = DescriptorChain()
        var heads: [(UInt16, UInt32)] = []
        while true {
            guard let fetched = try? queue.nextChain(into: &chain, memory: memory) else { return false }
            switch fetched {
            case .empty: break
            case .rejected(let head, _):
                queue.complete(head: head, length: 0)
                continue
            case .ready:
                if misbehaving && misbehaviour == .unsolicitedMessage {
                    let m = Message(.getFeatures, flags: HeaderFlags.version)
                    try? channel.send(m, until: .after(seconds: 1))
                    continue
                }
                heads.append((chain.head, execute(&chain)))
                continue
            }
            break
        }
        if heads.isEmpty { return true }
        return complete(heads, on: queue, q)
    }

    /// Performs the request in `chain` on the private disk; returns the used length.
    func execute(_ chain: inout DescriptorChain) -> UInt32 {
        var readable: [UInt8] = []
        for s in chain.readable { readable += Array(UnsafeRawBufferPointer(s.buffer)) }
        guard readable.count >= 16, let statusSegment = chain.writable.last, statusSegment.buffer.count >= 1 else {
            return 0
        }
        let type =
            UInt32(readable[0]) | UInt32(readable[1]) << 8 | UInt32(readable[2]) << 16 | UInt32(readable[3]) << 24
        var sector: UInt64 = 0
        for i in 0..<8 { sector |= UInt64(readable[8 + i]) << (8 * i) }
        let data = Array(readable[16...])
        var status = BlockProtocol.Status.ok.rawValue
        var written = 0
        let offset = Int(clamping: sector) &* 512
        switch BlockProtocol.RequestType(rawValue: type) {
        case .read?:
            for s in chain.writable {
                let n = s.buffer.count - (s.guestAddress == statusSegment.guestAddress ? 1 : 0)
                guard n > 0 else { continue }
                guard offset + written + n <= disk.count else {
                    status = 1
                    break
                }
                for i in 0..<n { s.buffer[i] = disk[offset + written + i] }
                written += n
            }
        case .write?:
            if offset + data.count <= disk.count {
                disk.replaceSubrange(offset..<offset + data.count, with: data)
            } else {
                status = 1
            }
        case .getID?:
            let id = Array("misbehaving-blk".utf8)
            if let s = chain.writable.first, s.buffer.count > 1 {
                for i in 0..<min(id.count, s.buffer.count - 1) { s.buffer[i] = id[i] }
                written = min(20, s.buffer.count - 1)
            }
        case .flush?, .discard?, .writeZeroes?: break
        default: status = BlockProtocol.Status.unsupported.rawValue
        }
        statusSegment.buffer[statusSegment.buffer.count - 1] = status
        return UInt32(written + 1)
    }

    func complete(_ heads: [(UInt16, UInt32)], on queue: DeviceQueue, _ q: Int) -> Bool {
        guard let call = calls[q] else { return false }
        for (head, length) in heads {
            served += 1
            state.withLock { $0.requestsServed += 1 }
            queue.complete(head: head, length: length)
        }
        _ = queue.publishUsed()
        call.signal()
        return true
    }
}

import BlockImage
import CRingFence
import Foundation
import SharedMemory
import Synchronization
import Testing
import VhostUser
import VirtioBlock
import Virtqueue

/// A serve-blk back-end running in this process on a temporary image and socket.
final class BackendFixture: @unchecked Sendable {
    static let imageSize = 4 << 20
    let directory: String
    let imagePath: String
    let socketPath: String
    let backend: Backend
    let events = EventLog()
    private let finished = DispatchSemaphore(value: 0)

    init(readOnly: Bool = false, queues: Int = 1) throws {
        directory = NSTemporaryDirectory() + "rf-blk-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        imagePath = directory + "/disk.img"
        socketPath = directory + "/s.sock"
        var bytes = [UInt8](repeating: 0, count: Self.imageSize)
        for i in stride(from: 0, to: bytes.count, by: 512) { bytes[i] = UInt8(truncatingIfNeeded: i / 512) }
        try Data(bytes).write(to: URL(fileURLWithPath: imagePath))
        var options = VirtioBlockDeviceOptions()
        options.readOnly = readOnly
        options.queueCount = queues
        let image = try DeviceImage(path: imagePath, readOnly: readOnly)
        let events = self.events
        let record: @Sendable (BackendEvent) -> Void = { e in events.append(e.description) }
        let device = VirtioBlockDevice(image: image, options: options, onEvent: record)
        var configuration = Backend.Configuration()
        configuration.messageDeadline = 1
        configuration.firstMessageDeadline = 1
        configuration.pollInterval = 0.05
        configuration.queueTiming.idleTick = 0.2
        backend = Backend(device: device, configuration: configuration, onEvent: record)
        let listener = try UnixListener(path: socketPath)
        let backend = self.backend
        let finished = self.finished
        Thread.detachNewThread {
            try? backend.run(listener: listener)
            finished.signal()
        }
    }

    func shutdown() {
        backend.stop()
        finished.wait()
        try? FileManager.default.removeItem(atPath: directory)
    }

    func eventLog() -> [String] { events.all }

    /// Waits until an event containing `text` was reported.
    func waitForEvent(containing text: String, seconds: Double = 3) -> Bool {
        let deadline = Deadline.after(seconds: seconds)
        while !deadline.hasPassed {
            if eventLog().contains(where: { $0.contains(text) }) { return true }
            usleep(5000)
        }
        return false
    }

    func imageBytes(at offset: Int, count: Int) throws -> [UInt8] {
        let data = try Data(contentsOf: URL(fileURLWithPath: imagePath))
        return Array(data[offset..<offset + count])
    }

    /// The recovery check after every attack: a fresh, well-behaved front-end connects,
    /// writes a pattern and reads it back.
    func expectServesWellBehavedFrontend(
        after attacker: TestFrontend? = nil, sourceLocation: SourceLocation = #_sourceLocation
    ) throws {
        // One front-end at a time: the attacker leaves first (if it was not dropped).
        attacker?.channel.channel.shutdown()
        let f = try TestFrontend(path: socketPath)
        try f.setUp()
        let pattern = (0..<4096).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 3) }
        let w = try f.blockRequest(type: .write, sector: 64, data: pattern)
        #expect(w.status == 0, "write after attack", sourceLocation: sourceLocation)
        let r = try f.blockRequest(type: .read, sector: 64, readLength: 4096)
        #expect(r.status == 0, sourceLocation: sourceLocation)
        #expect(r.data == pattern, "read back after attack", sourceLocation: sourceLocation)
    }
}

final class EventLog: Sendable {
    private let lines = Mutex<[String]>([])
    func append(_ line: String) { lines.withLock { $0.append(line) } }
    var all: [String] { lines.withLock { $0 } }
}

enum FrontendError: Error { case noReply, timeout }

/// A vhost-user front-end written for attacking: it speaks the protocol correctly by
/// default and lets each test write any message or ring content it likes.
final class TestFrontend {
    static let guestBase: UInt64 = 0x10_0000
    static let userBase: UInt64 = 0x7f00_1000_0000
    static let regionSize = 1 << 20
    // Offsets inside the region.
    static let descOffset = 0
    static let availOffset = 0x1000
    static let usedOffset = 0x2000
    static let indirectOffset = 0x3000
    static let headerOffset = 0x4000
    static let statusOffset = 0x4800
    static let dataOffset = 0x10000

    /// Each queue's ring and buffers live in their own window of the region.
    static let windowSize = 0x20000
    static func window(_ queue: Int) -> Int { queue * windowSize }

    /// Driver-side state of one queue.
    final class Ring {
        let kick: Notifier
        let call: Notifier
        let err: Notifier
        var availIdx: UInt16 = 0
        var lastUsed: UInt16 = 0
        init() throws {
            kick = try Notifier()
            call = try Notifier()
            err = try Notifier()
        }
    }

    let channel: MessageChannel
    let region: SharedRegion
    var rings: [Ring]
    var queueSize = 8
    var kick: Notifier { rings[0].kick }
    var call: Notifier { rings[0].call }
    var err: Notifier { rings[0].err }

    init(path: String, queues: Int = 2) throws {
        channel = MessageChannel(try UnixChannel.connect(path: path))
        region = try SharedRegion(name: "rf-test-guest", size: Self.regionSize)
        rings = try (0..<queues).map { _ in try Ring() }
    }

    static func guest(_ offset: Int) -> UInt64 { guestBase + UInt64(offset) }

    // MARK: control plane

    func send(
        _ request: UInt32, payload: [UInt8] = [], fds: [Int32] = [], needReply: Bool = false,
        size: UInt32? = nil
    ) throws {
        let flags = HeaderFlags.version | (needReply ? HeaderFlags.needReply : 0)
        let header = MessageHeader(request: request, flags: flags, size: size ?? UInt32(payload.count))
        try channel.channel.send(header.encoded + payload, descriptors: fds)
    }

    func send(_ request: Request, _ payload: [UInt8] = [], fds: [Int32] = [], needReply: Bool = false) throws {
        try send(request.rawValue, payload: payload, fds: fds, needReply: needReply)
    }

    func receive() throws -> Message {
        try channel.receive(until: .after(seconds: 3))
    }

    /// Sends with NEED_REPLY and returns the REPLY_ACK status (0 = success).
    func acked(_ request: Request, _ payload: [UInt8] = [], fds: [Int32] = []) throws -> UInt64 {
        try send(request, payload, fds: fds, needReply: true)
        let reply = try receive()
        #expect(reply.header.request == request.rawValue)
        return try U64Payload.decode(reply.payload).value
    }

    func query(_ request: Request, _ payload: [UInt8] = []) throws -> [UInt8] {
        try send(request, payload)
        let reply = try receive()
        #expect(reply.header.request == request.rawValue && reply.header.isReply)
        return reply.payload
    }

    /// True when the back-end closed the connection (within 3 s).
    func isDropped() -> Bool {
        var byte: UInt8 = 0
        do {
            _ = try withUnsafeMutableBytes(of: &byte) {
                try channel.channel.receive(exactly: $0, maxDescriptors: 0, until: .after(seconds: 3))
            }
            return false
        } catch let error as UnixChannel.Error {
            return error == .closed
        } catch {
            return false
        }
    }

    static func memoryTable(_ regions: [(guest: UInt64, size: UInt64, user: UInt64, offset: UInt64)]) -> [UInt8] {
        MemoryTable(
            regions: regions.map {
                MemoryRegionDescription(
                    guestAddress: $0.guest, size: $0.size, userAddress: $0.user, mmapOffset: $0.offset)
            }
        ).encoded
    }

    /// Negotiation up to (not including) the memory table.
    func negotiate(eventIndex: Bool = true, indirect: Bool = true) throws {
        let offered = try U64Payload.decode(try query(.getFeatures)).value
        var wanted =
            FeatureBits.version1 | FeatureBits.protocolFeatures | BlockProtocol.Feature.flush
            | BlockProtocol.Feature.discard | BlockProtocol.Feature.writeZeroes
        if eventIndex { wanted |= FeatureBits.ringEventIndex }
        if indirect { wanted |= FeatureBits.ringIndirectDescriptors }
        try send(.setFeatures, U64Payload(wanted & offered).encoded)
        let protocolOffered = try U64Payload.decode(try query(.getProtocolFeatures)).value
        let protocolWanted = ProtocolFeatures([.replyAck, .config, .multiQueue]).rawValue
        #expect(protocolOffered & protocolWanted == protocolWanted)
        try send(.setProtocolFeatures, U64Payload(protocolWanted).encoded)
        try send(.setOwner)
    }

    /// Sets up (and enables) queue `q` in its window.
    func setUpQueue(_ q: Int, size: Int) throws {
        let ring = rings[q]
        let index = UInt32(q)
        #expect(try acked(.setVringNum, VringState(index: index, num: UInt32(size)).encoded) == 0)
        #expect(try acked(.setVringBase, VringState(index: index, num: 0).encoded) == 0)
        let user = { (o: Int) in Self.userBase + UInt64(Self.window(q) + o) }
        let address = VringAddress(
            index: index, descriptor: user(Self.descOffset), used: user(Self.usedOffset), avail: user(Self.availOffset))
        #expect(try acked(.setVringAddr, address.encoded) == 0)
        let file = VringFile(index: UInt8(q)).encoded
        #expect(try acked(.setVringKick, file, fds: [ring.kick.fileDescriptor]) == 0)
        #expect(try acked(.setVringCall, file, fds: [ring.call.fileDescriptor]) == 0)
        #expect(try acked(.setVringErr, file, fds: [ring.err.fileDescriptor]) == 0)
        #expect(try acked(.setVringEnable, VringState(index: index, num: 1).encoded) == 0)
    }

    /// Full set-up of queue 0 on one region (or the given split of it).
    func setUp(
        queueSize: Int = 8, eventIndex: Bool = true, indirect: Bool = true,
        regions: [(guest: UInt64, size: UInt64, user: UInt64, offset: UInt64)]? = nil
    ) throws {
        self.queueSize = queueSize
        try negotiate(eventIndex: eventIndex, indirect: indirect)
        let table = regions ?? [(Self.guestBase, UInt64(Self.regionSize), Self.userBase, 0)]
        let fds = [Int32](repeating: region.fileDescriptor, count: table.count)
        #expect(try acked(.setMemTable, Self.memoryTable(table), fds: fds) == 0)
        try setUpQueue(0, size: queueSize)
    }

    // MARK: data plane (raw ring writes: tests may put anything here)

    func pointer(_ offset: Int) -> UnsafeMutableRawPointer { region.base + offset }

    func writeDescriptor(
        _ i: Int, address: UInt64, length: UInt32, flags: UInt16, next: UInt16 = 0,
        table: Int = TestFrontend.descOffset, queue: Int = 0
    ) {
        let d = pointer(Self.window(queue) + table + 16 * i)
        d.storeBytes(of: address, toByteOffset: 0, as: UInt64.self)
        d.storeBytes(of: length, toByteOffset: 8, as: UInt32.self)
        d.storeBytes(of: flags, toByteOffset: 12, as: UInt16.self)
        d.storeBytes(of: next, toByteOffset: 14, as: UInt16.self)
    }

    /// Puts `head` in the avail ring, bumps avail.idx by `advance` (1 unless attacking), kicks.
    func publish(head: UInt16, advance: UInt16 = 1, queue: Int = 0) {
        let ring = rings[queue]
        let avail = Self.window(queue) + Self.availOffset
        pointer(avail + 4 + 2 * Int(ring.availIdx % UInt16(queueSize))).storeBytes(of: head, as: UInt16.self)
        ring.availIdx &+= advance
        // used_event (EVENT_IDX): interrupt me at the next completion.
        pointer(avail + 4 + 2 * queueSize).storeBytes(of: ring.lastUsed, as: UInt16.self)
        SharedAccess.store16Release(pointer(avail + 2), ring.availIdx)
        SharedAccess.fullFence()
        ring.kick.signal()
    }

    /// Waits for the next used element; nil on timeout.
    func waitUsed(seconds: Double = 3, queue: Int = 0) -> (id: UInt32, length: UInt32)? {
        let ring = rings[queue]
        let used = Self.window(queue) + Self.usedOffset
        let deadline = Deadline.after(seconds: seconds)
        while !deadline.hasPassed {
            let idx = SharedAccess.load16Acquire(pointer(used + 2))
            if idx != ring.lastUsed {
                let e = pointer(used + 4 + 8 * Int(ring.lastUsed % UInt16(queueSize)))
                ring.lastUsed &+= 1
                return (e.load(as: UInt32.self), e.load(fromByteOffset: 4, as: UInt32.self))
            }
            _ = ring.call.wait(until: .after(nanoseconds: 20_000_000))
        }
        return nil
    }

    struct BlockResult {
        var status: UInt8
        var usedLength: UInt32
        var data: [UInt8]
    }

    static let statusSentinel: UInt8 = 0xAA

    /// A well-formed 3-descriptor request: header, data, status.
    func blockRequest(
        type: BlockProtocol.RequestType, sector: UInt64, data: [UInt8] = [], readLength: Int = 0,
        dataOffset: Int? = nil, queue: Int = 0
    ) throws -> BlockResult {
        let w = Self.window(queue)
        let dataOffset = dataOffset ?? w + Self.dataOffset
        let headerOffset = w + Self.headerOffset
        let statusOffset = w + Self.statusOffset
        let header = BlockProtocol.encodeHeader(type: type, sector: sector)
        header.withUnsafeBytes { pointer(headerOffset).copyMemory(from: $0.baseAddress!, byteCount: 16) }
        pointer(statusOffset).storeBytes(of: Self.statusSentinel, as: UInt8.self)
        let isRead = type == .read || type == .getID
        let length = isRead ? readLength : data.count
        if !isRead && !data.isEmpty {
            data.withUnsafeBytes { pointer(dataOffset).copyMemory(from: $0.baseAddress!, byteCount: data.count) }
        }
        let next: UInt16 = length > 0 ? 1 : 2
        writeDescriptor(
            0, address: Self.guest(headerOffset), length: 16, flags: SplitLayout.flagNext, next: next, queue: queue)
        if length > 0 {
            writeDescriptor(
                1, address: Self.guest(dataOffset), length: UInt32(length),
                flags: SplitLayout.flagNext | (isRead ? SplitLayout.flagWrite : 0), next: 2, queue: queue)
        }
        writeDescriptor(2, address: Self.guest(statusOffset), length: 1, flags: SplitLayout.flagWrite, queue: queue)
        publish(head: 0, queue: queue)
        guard let used = waitUsed(queue: queue) else { throw FrontendError.timeout }
        #expect(used.id == 0)
        let out = isRead ? [UInt8](UnsafeRawBufferPointer(start: pointer(dataOffset), count: length)) : []
        return BlockResult(status: pointer(statusOffset).load(as: UInt8.self), usedLength: used.length, data: out)
    }

    /// Publishes a chain the test built by hand and returns its used element.
    func submitRaw(head: UInt16 = 0) throws -> (id: UInt32, length: UInt32) {
        pointer(Self.statusOffset).storeBytes(of: Self.statusSentinel, as: UInt8.self)
        publish(head: head)
        guard let used = waitUsed() else { throw FrontendError.timeout }
        return used
    }

    var statusByte: UInt8 { pointer(Self.statusOffset).load(as: UInt8.self) }
}

import Foundation
import SharedMemory
import Synchronization
import Testing
import VhostUser
import Virtqueue

@testable import VirtioNet

/// Polls `condition` every millisecond until it holds or `seconds` pass.
func eventually(within seconds: Double = 30, _ condition: () throws -> Bool) async throws -> Bool {
    let end = ContinuousClock.now + .milliseconds(Int(seconds * 1000))
    while ContinuousClock.now < end {
        if try condition() { return true }
        try await Task.sleep(for: .milliseconds(1))
    }
    return try condition()
}

/// `AsyncNetQueuePair` against serve-net's loopback (the real `VirtioNetDevice` behind
/// the real `Backend`); `HoldingNetDevice` stops it taking frames off the transmit ring.
@Suite("async net queue pair", .serialized)
struct AsyncNetTests {
    static func connect(_ fixture: NetFixture, queueSize: Int = 32) throws -> VirtioNetDriver {
        var options = VirtioNetDriver.Options()
        options.queueSize = queueSize
        return try VirtioNetDriver.connect(socket: fixture.socketPath, options: options)
    }

    /// 300 receivers parked on a quiet device hold no pool thread (a ticker runs while all
    /// are parked); 300 frames sent from a task group come back, each to one receiver,
    /// intact; then the `frames` sequence delivers more.
    @Test(.timeLimit(.minutes(5))) func parkedReceiversStarveNothingAndEveryFrameArrivesOnce() async throws {
        let fixture = try NetFixture(mode: .loopback)
        defer { fixture.shutdown() }
        let net = try Self.connect(fixture)
        defer { net.close() }
        let port = try AsyncNetQueuePair(net)
        defer { port.close() }
        let mac = net.info.mac
        let got = try await withThrowingTaskGroup(of: [UInt8].self) { group in
            for _ in 0..<300 { group.addTask { try await port.receive() } }
            #expect(try await eventually { port.waitingReceivers == 300 })
            for _ in 0..<5 { try await Task.sleep(for: .milliseconds(1)) }
            #expect(port.waitingReceivers == 300)  // the ticker ran while all were parked
            try await withThrowingTaskGroup(of: Void.self) { senders in
                for i in 0..<300 {
                    senders.addTask { try await port.send(testFrame(dst: mac, src: mac, length: 60 + i, seed: i)) }
                }
                try await senders.waitForAll()
            }
            var all: [[UInt8]] = []
            for try await f in group { all.append(f) }
            return all
        }
        #expect(got.count == 300)
        #expect(Set(got.map(\.count)) == Set((0..<300).map { 60 + $0 }))
        for f in got { #expect(f == testFrame(dst: mac, src: mac, length: f.count, seed: f.count - 60)) }
        for i in 0..<10 { try await port.send(testFrame(dst: mac, src: mac, length: 100, seed: i)) }
        var n = 0
        for try await f in port.frames {
            #expect(f == testFrame(dst: mac, src: mac, length: 100, seed: n))
            n += 1
            if n == 10 { break }
        }
        #expect(n == 10)
        #expect(net.failure == nil)
        await #expect(throws: NetError.self) { try await port.send([1, 2, 3]) }
    }

    /// A cancelled receive returns at once and takes no frame: the next frame goes to the
    /// next receiver.
    @Test(.timeLimit(.minutes(5))) func cancelledReceiveLosesNoFrame() async throws {
        let fixture = try NetFixture(mode: .loopback)
        defer { fixture.shutdown() }
        let net = try Self.connect(fixture)
        defer { net.close() }
        let port = try AsyncNetQueuePair(net)
        defer { port.close() }
        let mac = net.info.mac
        let parked = Task { try await port.receive() }
        #expect(try await eventually { port.waitingReceivers == 1 })
        parked.cancel()
        await #expect(throws: CancellationError.self) { try await parked.value }
        #expect(port.waitingReceivers == 0)
        let frame = testFrame(dst: mac, src: mac, length: 80, seed: 5)
        try await port.send(frame)
        #expect(try await port.receive() == frame)
    }

    /// With the device taking nothing off the transmit ring, sends beyond the ring's
    /// room suspend; a cancelled waiting send returns at once and is never posted;
    /// released, every other frame comes back, exactly once.
    @Test(.timeLimit(.minutes(5))) func sendsSuspendWhileTheRingIsFullAndACancelledOneIsNeverPosted() async throws {
        let hold = NetHold()
        let fixture = try NetFixture(mode: .loopback) { HoldingNetDevice($0, hold: hold) }
        defer { fixture.shutdown() }
        let net = try Self.connect(fixture, queueSize: 32)
        defer { net.close() }
        let port = try AsyncNetQueuePair(net)
        defer { port.close() }
        let mac = net.info.mac
        hold.hold()
        try await withThrowingTaskGroup(of: Void.self) { group in
            for i in 0..<40 {
                group.addTask { try await port.send(testFrame(dst: mac, src: mac, length: 60 + i, seed: i)) }
            }
            #expect(try await eventually { port.waitingSends == 8 })  // 32 posted, 8 wait
            let cancelled = Task { try await port.send(testFrame(dst: mac, src: mac, length: 1000, seed: 0)) }
            #expect(try await eventually { port.waitingSends == 9 })
            cancelled.cancel()
            await #expect(throws: CancellationError.self) { try await cancelled.value }
            #expect(port.waitingSends == 8)
            hold.release()
            try await group.waitForAll()
        }
        var lengths: [Int] = []
        for _ in 0..<40 { lengths.append(try await port.receive().count) }
        #expect(lengths.sorted() == (0..<40).map { 60 + $0 })
        try await Task.sleep(for: .milliseconds(200))
        #expect(port.backlogCount == 0)  // the cancelled 1000-byte frame never went out
        #expect(net.failure == nil)
    }
}

/// Stops the device taking frames off pair 0's transmit ring while held.
final class NetHold: Sendable {
    let holding = Atomic<Bool>(false)
    let wakes = Mutex<[QueueWake]>([])

    var held: Bool { holding.load(ordering: .acquiring) }
    func hold() { holding.store(true, ordering: .releasing) }
    func release() {
        holding.store(false, ordering: .releasing)
        for w in wakes.withLock({ $0 }) { w.signal() }
    }
}

/// The real `VirtioNetDevice`, its queue 1 (pair 0's transmit) served through a `NetHold`.
final class HoldingNetDevice: VhostUserDevice {
    let inner: VirtioNetDevice
    let hold: NetHold

    init(_ inner: VirtioNetDevice, hold: NetHold) {
        self.inner = inner
        self.hold = hold
    }

    var features: UInt64 { inner.features }
    var protocolFeatures: ProtocolFeatures { inner.protocolFeatures }
    var queueCount: Int { inner.queueCount }
    var maximumChainLength: Int { inner.maximumChainLength }
    func readConfig(offset: UInt32, size: Int) -> [UInt8]? { inner.readConfig(offset: offset, size: size) }
    func writeConfig(offset: UInt32, bytes: [UInt8]) -> Bool { inner.writeConfig(offset: offset, bytes: bytes) }
    func frontendDisconnected() { inner.frontendDisconnected() }
    func controlRequestReceived(_ request: Request, payload: [UInt8], descriptors: [Int32]) {
        inner.controlRequestReceived(request, payload: payload, descriptors: descriptors)
    }

    func makeQueueHandler(queue: Int, features: UInt64) -> any QueueHandler {
        let handler = inner.makeQueueHandler(queue: queue, features: features)
        return queue == 1 ? HoldingNetHandler(handler, hold: hold) : handler
    }
}

final class HoldingNetHandler: QueueHandler {
    let inner: any QueueHandler
    let hold: NetHold

    init(_ inner: any QueueHandler, hold: NetHold) {
        self.inner = inner
        self.hold = hold
    }

    func serve(_ queue: any DeviceRing, memory: GuestMemory, budget: Int) throws(Violation) -> Int {
        hold.held ? 0 : try inner.serve(queue, memory: memory, budget: budget)
    }
    func beforePublish(_ queue: any DeviceRing, memory: GuestMemory) { inner.beforePublish(queue, memory: memory) }
    func idle(_ queue: any DeviceRing, memory: GuestMemory) { inner.idle(queue, memory: memory) }
    func attach(wake: QueueWake) {
        hold.wakes.withLock { $0.append(wake) }
        inner.attach(wake: wake)
    }
    func stopping(_ queue: any DeviceRing, memory: GuestMemory) -> Int { inner.stopping(queue, memory: memory) }
}

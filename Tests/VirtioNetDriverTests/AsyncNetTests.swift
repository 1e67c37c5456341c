import Foundation
import RingTestSupport
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
        try connect(socket: fixture.socketPath, queueSize: queueSize)
    }

    static func connect(socket: String, queueSize: Int = 32) throws -> VirtioNetDriver {
        var options = VirtioNetDriver.Options()
        options.queueSize = queueSize
        return try VirtioNetDriver.connect(socket: socket, options: options)
    }

    static let hungUp = NetError.disconnected("back-end closed the vhost-user socket")

    /// This process's open descriptors and what each is (/proc/self/fd), but for timerfds:
    /// Dispatch makes one per clock and QoS class on first use (Task.sleep), and neither
    /// the driver nor the pair ever makes one.
    static func openDescriptors() throws -> [String: String] {
        var open: [String: String] = [:]
        for fd in try FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd") {
            let what = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/" + fd)) ?? "?"
            if what != "anon_inode:[timerfd]" { open[fd] = what }
        }
        return open
    }

    /// How one parked call ended, and when.
    struct Ending: Sendable {
        var send: Bool
        var error: NetError?
        var other: String?
        var at: ContinuousClock.Instant
    }

    /// `ringfence serve-net --loopback` in a child process, stopped (SIGSTOP) while 60
    /// receivers are parked and sends fill the transmit ring, then SIGKILLed: the I/O
    /// thread sees the control socket close, and every parked receive and send fails with
    /// `.disconnected` within 2 s (a watchdog closes the pair after 10 s, so a thread that
    /// never notices fails the test instead of hanging it); later calls fail the same way;
    /// once closed, no descriptor is left open.
    @Test(.timeLimit(.minutes(2))) func backEndKilledFailsEveryParkedCallPromptly() async throws {
        let socket = NSTemporaryDirectory() + "rf-net-kill-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).sock"
        let before = try Self.openDescriptors()
        do {
            let server = try RingfenceServer(
                ["serve-net", "--socket", socket, "--loopback", "--log-level", "error"], socket: socket)
            defer { server.stop() }
            let net = try Self.connect(socket: socket, queueSize: 32)
            defer { net.close() }
            let port = try AsyncNetQueuePair(net)
            defer { port.close() }
            let mac = net.info.mac
            let probe = testFrame(dst: mac, src: mac, length: 64, seed: 1)
            try await port.send(probe)
            #expect(try await port.receive() == probe)  // the loopback works
            #expect(kill(server.pid, SIGSTOP) == 0)
            var killedAt = ContinuousClock.now
            var waiting = 0
            let endings = try await withThrowingTaskGroup(of: Ending.self) { group in
                func ending(send: Bool, _ call: @escaping @Sendable () async throws -> Void) {
                    group.addTask {
                        do {
                            try await call()
                            return Ending(send: send, at: .now)
                        } catch let e as NetError {
                            return Ending(send: send, error: e, at: .now)
                        } catch {
                            return Ending(send: send, other: "\(error)", at: .now)
                        }
                    }
                }
                for _ in 0..<60 { ending(send: false) { _ = try await port.receive() } }
                #expect(try await eventually { port.waitingReceivers == 60 })
                for i in 0..<60 {
                    ending(send: true) { try await port.send(testFrame(dst: mac, src: mac, length: 60 + i, seed: i)) }
                }
                // The ring (32) fills in one pass of the I/O thread; the probe's slot may not
                // be back yet (the loopback returns the frame before it completes the send).
                #expect(try await eventually { port.waitingSends >= 28 })
                try await Task.sleep(for: .milliseconds(100))
                waiting = port.waitingSends
                #expect((28...29).contains(waiting))
                #expect(port.waitingReceivers == 60)
                killedAt = .now
                #expect(kill(server.pid, SIGKILL) == 0)
                let watchdog = Task {
                    try await Task.sleep(for: .seconds(10))
                    port.close()
                }
                defer { watchdog.cancel() }
                var all: [Ending] = []
                for try await e in group { all.append(e) }
                return all
            }
            let failed = endings.filter { $0.error != nil || $0.other != nil }
            #expect(endings.filter { !$0.send }.allSatisfy { $0.error == Self.hungUp })
            #expect(endings.filter { $0.send && $0.error == nil && $0.other == nil }.count == 60 - waiting)
            #expect(endings.filter { $0.send && $0.error == Self.hungUp }.count == waiting)
            #expect(failed.count == 60 + waiting)
            let slowest = failed.map { killedAt.duration(to: $0.at) }.max() ?? .zero
            #expect(slowest < .seconds(2), "the last parked call failed \(slowest) after SIGKILL")
            #expect(net.failure == Self.hungUp)
            await #expect(throws: Self.hungUp) { try await port.receive() }
            await #expect(throws: Self.hungUp) { try await port.send(probe) }
        }
        let closed = try await eventually(within: 10) { try Self.openDescriptors().count <= before.count }
        let left = try Self.openDescriptors().filter { before[$0.key] != $0.value }
        #expect(closed, "left open: \(left)")
    }

    /// Closing the driver under a pair (its owner's mistake, or shutdown order) shuts the
    /// control socket down: parked receivers fail with `.disconnected("the driver was
    /// closed")` at once, and the device is not marked broken by it.
    @Test(.timeLimit(.minutes(2))) func closingTheDriverFailsParkedReceivers() async throws {
        let fixture = try NetFixture(mode: .loopback)
        defer { fixture.shutdown() }
        let net = try Self.connect(fixture)
        let port = try AsyncNetQueuePair(net)
        defer { port.close() }
        let closed = NetError.disconnected("the driver was closed")
        try await withThrowingTaskGroup(of: Void.self) { group in
            for _ in 0..<5 {
                group.addTask { await #expect(throws: closed) { try await port.receive() } }
            }
            #expect(try await eventually { port.waitingReceivers == 5 })
            net.close()
            try await group.waitForAll()
        }
        #expect(net.failure == nil)
    }

    /// Answers to our own control requests (GET_CONFIG) make the control socket readable
    /// too: the I/O thread looks under the control lock, after the answer was read, and
    /// takes none of them for the back-end speaking unasked.
    @Test(.timeLimit(.minutes(2))) func answersToOurOwnRequestsBreakNothing() async throws {
        let fixture = try NetFixture(mode: .loopback)
        defer { fixture.shutdown() }
        let net = try Self.connect(fixture)
        defer { net.close() }
        let port = try AsyncNetQueuePair(net)
        defer { port.close() }
        let mac = net.info.mac
        let parked = Task { try await port.receive() }
        #expect(try await eventually { port.waitingReceivers == 1 })
        for _ in 0..<300 { #expect(try net.recheckConfig()) }
        #expect(net.failure == nil)
        #expect(port.waitingReceivers == 1)
        let frame = testFrame(dst: mac, src: mac, length: 90, seed: 3)
        try await port.send(frame)
        #expect(try await parked.value == frame)
    }

    /// A back-end that sends on the control socket unasked breaks the device (R3): parked
    /// receivers fail with the control-protocol violation.
    @Test(.timeLimit(.minutes(2))) func backEndSpeakingUnaskedBreaksTheDevice() async throws {
        let (ours, theirs) = try UnixChannel.pair()
        let device = VirtioNetDevice(fabric: NetFabric(mode: .loopback), options: VirtioNetDeviceOptions())
        let backend = Backend(device: device)
        let served = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            backend.serve(theirs)
            served.signal()
        }
        defer {
            backend.stop()
            served.wait()
        }
        var options = VirtioNetDriver.Options()
        options.queueSize = 32
        let net = try VirtioNetDriver.connect(channel: ours, options: options)
        defer { net.close() }
        let port = try AsyncNetQueuePair(net)
        defer { port.close() }
        let spoke = NetError.deviceViolation(.controlProtocol("unsolicited message on the vhost-user socket"))
        try await withThrowingTaskGroup(of: Void.self) { group in
            for _ in 0..<5 {
                group.addTask { await #expect(throws: spoke) { try await port.receive() } }
            }
            #expect(try await eventually { port.waitingReceivers == 5 })
            var byte: UInt8 = 1
            #expect(send(theirs.fileDescriptor, &byte, 1, Int32(MSG_NOSIGNAL)) == 1)
            try await group.waitForAll()
        }
        #expect(net.failure == spoke)
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

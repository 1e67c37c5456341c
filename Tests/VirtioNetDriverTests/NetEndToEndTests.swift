import Foundation
import SharedMemory
import Synchronization
import Testing
import VhostUser
import VirtioNet
import Virtqueue

/// Our net driver against our net device over vhost-user: every frame comes back intact.
@Suite struct NetEndToEndTests {
    static func roundTrip(
        _ net: VirtioNetDriver, frames: Int, length: (Int) -> Int, sourceLocation: SourceLocation = #_sourceLocation
    ) throws {
        let pair = net.pair(0)
        let dst: [UInt8] = [0x02, 0, 0, 0, 0, 0x99]
        var sent: [[UInt8]] = []
        let batch = NetFrameBatch(capacity: 32, frameCapacity: net.info.maximumFrame)
        var i = 0
        while i < frames {
            batch.removeAll()
            while i < frames && !batch.isFull {
                let f = testFrame(dst: dst, src: net.info.mac, length: length(i), seed: i)
                batch.append(f)
                sent.append(f)
                i += 1
            }
            var from = 0
            while from < batch.count {
                let n = try pair.transmit(batch, from: from)
                from += n
                if n == 0 { _ = pair.waitForTransmitRoom(until: .after(seconds: 1)) }
            }
            let got = try receiveFrames(pair, count: batch.count, frameCapacity: net.info.maximumFrame)
            #expect(got == Array(sent.suffix(batch.count)), sourceLocation: sourceLocation)
        }
    }

    @Test(arguments: [true, false], [true, false])
    func loopbackReturnsEveryFrameIntact(packed: Bool, mergeable: Bool) throws {
        let fixture = try NetFixture(mode: .loopback)
        defer { fixture.shutdown() }
        var options = VirtioNetDriver.Options()
        options.packedRing = packed
        options.mergeableRxBuffers = mergeable
        options.queueSize = 64
        let net = try VirtioNetDriver.connect(socket: fixture.socketPath, options: options)
        defer { net.close() }
        #expect(net.ringFormat == (packed ? .packed : .split))
        #expect(net.info.mergeableRxBuffers == mergeable)
        #expect(net.info.mtu == 1500)
        #expect(net.info.mac == fixture.devices[0].mac)
        try Self.roundTrip(net, frames: 500, length: { 14 + ($0 * 37) % 1500 })
        #expect(net.failure == nil)
        #expect(fixture.devices[0].statistics.transmitRejected == 0)
    }

    @Test func jumboFramesAreMergedAcrossBuffers() throws {
        var device = VirtioNetDeviceOptions()
        device.mtu = 9000
        let fixture = try NetFixture(mode: .loopback, options: device)
        defer { fixture.shutdown() }
        var options = VirtioNetDriver.Options()
        options.queueSize = 64
        let net = try VirtioNetDriver.connect(socket: fixture.socketPath, options: options)
        defer { net.close() }
        #expect(net.info.mtu == 9000)
        try Self.roundTrip(net, frames: 40, length: { [9018, 4097, 2036, 2037, 60][$0 % 5] })
        #expect(net.failure == nil)
    }

    @Test func controlCommandsAreAckedAndMultiqueueIsEnabled() throws {
        var device = VirtioNetDeviceOptions()
        device.queuePairs = 2
        let fixture = try NetFixture(mode: .loopback, options: device)
        defer { fixture.shutdown() }
        var options = VirtioNetDriver.Options()
        options.queuePairs = 2
        options.queueSize = 32
        let net = try VirtioNetDriver.connect(socket: fixture.socketPath, options: options)
        defer { net.close() }
        #expect(net.queuePairCount == 2)
        #expect(net.info.maximumQueuePairs == 2)
        try net.setPromiscuous(true)
        try net.setMAC([0x02, 1, 2, 3, 4, 5])
        #expect(throws: NetError.commandRefused("VQ_PAIRS_SET")) {
            try net.command(
                NetProtocol.Control.classMQ, NetProtocol.Control.mqPairsSet, payload: [9, 0], what: "VQ_PAIRS_SET")
        }
        #expect(net.failure == nil, "ERR is an answer, not a fault")
        try Self.bothPairsLoopAFrame(net)
        #expect(fixture.devices[0].statistics.controlCommands >= 4)
    }

    /// `controlQueue = false` with two pairs (what DPDK's vhost back-end needs): CTRL_VQ
    /// and MQ are acked, but the control queue is never set up with the device and no
    /// command is sent; both pairs are enabled with SET_VRING_ENABLE and carry traffic.
    @Test func privateControlQueueEnablesBothPairsWithoutACommand() throws {
        var device = VirtioNetDeviceOptions()
        device.queuePairs = 2
        let fixture = try NetFixture(mode: .loopback, options: device)
        defer { fixture.shutdown() }
        var options = VirtioNetDriver.Options()
        options.queuePairs = 2
        options.queueSize = 32
        options.controlQueue = false
        let net = try VirtioNetDriver.connect(socket: fixture.socketPath, options: options)
        defer { net.close() }
        #expect(net.queuePairCount == 2)
        #expect(net.info.maximumQueuePairs == 2)
        #expect(net.info.controlQueueIsPrivate && !net.info.hasControlQueue)
        #expect(net.info.features & (NetProtocol.Feature.mq | NetProtocol.Feature.ctrlVQ) != 0)
        try Self.bothPairsLoopAFrame(net)
        #expect(fixture.devices[0].statistics.controlCommands == 0)
        #expect(!fixture.eventLog.contains { $0.contains("queue 4 started") }, "\(fixture.eventLog)")
    }

    /// Both pairs carry traffic: a frame sent on each comes back on the same pair.
    static func bothPairsLoopAFrame(_ net: VirtioNetDriver) throws {
        for p in 0..<2 {
            let f = testFrame(dst: [2, 0, 0, 0, 0, 1], src: net.info.mac, length: 100, seed: p)
            #expect(try net.pair(p).send(f))
            #expect(try receiveFrames(net.pair(p), count: 1, frameCapacity: net.info.maximumFrame) == [f])
        }
    }

    @Test func switchForwardsBetweenTwoFrontEndsAndLearns() throws {
        let fixture = try NetFixture(mode: .switch, sockets: 3)
        defer { fixture.shutdown() }
        var options = VirtioNetDriver.Options()
        options.queueSize = 32
        let a = try VirtioNetDriver.connect(socket: fixture.socketPaths[0], options: options)
        defer { a.close() }
        let b = try VirtioNetDriver.connect(socket: fixture.socketPaths[1], options: options)
        defer { b.close() }
        let c = try VirtioNetDriver.connect(socket: fixture.socketPaths[2], options: options)
        defer { c.close() }
        // Broadcast from a floods to b and c; b's answer to a is unicast after learning.
        let hello = testFrame(dst: [0xff, 0xff, 0xff, 0xff, 0xff, 0xff], src: a.info.mac, length: 64, seed: 1)
        #expect(try a.pair(0).send(hello))
        #expect(try receiveFrames(b.pair(0), count: 1, frameCapacity: 1518) == [hello])
        #expect(try receiveFrames(c.pair(0), count: 1, frameCapacity: 1518) == [hello])
        let reply = testFrame(dst: a.info.mac, src: b.info.mac, length: 200, seed: 2)
        #expect(try b.pair(0).send(reply))
        #expect(try receiveFrames(a.pair(0), count: 1, frameCapacity: 1518) == [reply])
        let direct = testFrame(dst: b.info.mac, src: a.info.mac, length: 300, seed: 3)
        #expect(try a.pair(0).send(direct))
        #expect(try receiveFrames(b.pair(0), count: 1, frameCapacity: 1518) == [direct])
        #expect(
            try receiveFrames(c.pair(0), count: 1, frameCapacity: 1518, seconds: 0.3).isEmpty,
            "c learnt nothing it should not see")
        #expect(fixture.fabric.statistics.flooded == 1)
    }

    @Test func sinkCountsAndDrops() throws {
        let fixture = try NetFixture(mode: .sink)
        defer { fixture.shutdown() }
        let net = try VirtioNetDriver.connect(socket: fixture.socketPath)
        defer { net.close() }
        let batch = NetFrameBatch(capacity: 32, frameCapacity: 64)
        for i in 0..<32 { batch.append(testFrame(dst: [2, 0, 0, 0, 0, 1], src: net.info.mac, length: 64, seed: i)) }
        var sent = 0
        let deadline = Deadline.after(seconds: 5)
        while sent < 1000 && !deadline.hasPassed {
            let n = try net.pair(0).transmit(batch)
            sent += n
            if n == 0 { _ = net.pair(0).waitForTransmitRoom(until: .after(seconds: 1)) }
        }
        let wait = Deadline.after(seconds: 3)
        while fixture.fabric.statistics.framesIn < UInt64(sent) && !wait.hasPassed { usleep(1000) }
        #expect(fixture.fabric.statistics.framesIn == UInt64(sent))
        #expect(fixture.fabric.statistics.bytesIn == UInt64(sent * 64))
    }

    @Test func framesOutsideTheLimitsAreRefusedLocally() throws {
        let fixture = try NetFixture(mode: .loopback)
        defer { fixture.shutdown() }
        let net = try VirtioNetDriver.connect(socket: fixture.socketPath)
        defer { net.close() }
        #expect(throws: NetError.invalidRequest("frame of 13 bytes is not in 14...1518")) {
            try net.pair(0).send([UInt8](repeating: 1, count: 13))
        }
        #expect(throws: NetError.invalidRequest("frame of 1519 bytes is not in 14...1518")) {
            try net.pair(0).send([UInt8](repeating: 1, count: 1519))
        }
        #expect(net.failure == nil)
    }

    /// The real device, its receive handler (queue 0) wrapped to count `serve` calls.
    final class CountingDevice: VhostUserDevice, @unchecked Sendable {
        final class Calls: Sendable {
            let count = Atomic<Int>(0)
        }

        final class CountingReceive: QueueHandler {
            let inner: any QueueHandler
            let calls: Calls
            init(_ inner: any QueueHandler, _ calls: Calls) {
                self.inner = inner
                self.calls = calls
            }
            func serve(_ queue: any DeviceRing, memory: GuestMemory, budget: Int) throws(Violation) -> Int {
                calls.count.add(1, ordering: .relaxed)
                return try inner.serve(queue, memory: memory, budget: budget)
            }
            func attach(wake: QueueWake) { inner.attach(wake: wake) }
            func workIsAvailable(_ queue: any DeviceRing) -> Bool { inner.workIsAvailable(queue) }
            func stopping(_ queue: any DeviceRing, memory: GuestMemory) -> Int { inner.stopping(queue, memory: memory) }
        }

        let inner: VirtioNetDevice
        let calls = Calls()
        init(_ inner: VirtioNetDevice) { self.inner = inner }
        var features: UInt64 { inner.features }
        var protocolFeatures: ProtocolFeatures { inner.protocolFeatures }
        var queueCount: Int { inner.queueCount }
        func readConfig(offset: UInt32, size: Int) -> [UInt8]? { inner.readConfig(offset: offset, size: size) }
        func writeConfig(offset: UInt32, bytes: [UInt8]) -> Bool { false }
        func makeQueueHandler(queue: Int, features: UInt64) -> any QueueHandler {
            let handler = inner.makeQueueHandler(queue: queue, features: features)
            return queue == 0 ? CountingReceive(handler, calls) : handler
        }
        func frontendDisconnected() { inner.frontendDisconnected() }
    }

    /// The driver posts its receive buffers at once; with no frame for them the receive
    /// queue's thread blocks (on the inbox wake or a kick) instead of polling the ring.
    @Test func idleReceiveQueueWithPostedBuffersBlocks() throws {
        var counting: CountingDevice?
        let fixture = try NetFixture(mode: .sink) { device in
            let c = CountingDevice(device)
            counting = c
            return c
        }
        defer { fixture.shutdown() }
        let device = try #require(counting)
        let net = try VirtioNetDriver.connect(socket: fixture.socketPath)
        defer { net.close() }
        Thread.sleep(forTimeInterval: 0.3)  // past the first spins and blocks
        let before = device.calls.count.load(ordering: .relaxed)
        Thread.sleep(forTimeInterval: 0.5)
        let during = device.calls.count.load(ordering: .relaxed) - before
        // Blocked: a serve per idle tick (0.2 s) and the short spins after it. Polling:
        // one per sched_yield, hundreds of thousands.
        #expect(during < 1000, "\(during) serve calls in 0.5 s on an idle receive queue")
        #expect(net.failure == nil)
    }
}

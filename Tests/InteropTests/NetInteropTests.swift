import Foundation
import SharedMemory
import Synchronization
import Testing
import VhostUser
import VirtioNet

/// Real peers for virtio-net: our driver against DPDK's vhost back-end, and DPDK's
/// virtio_user driver against our device, each started and stopped by the test. Only
/// frames between this process and testpmd, over Unix sockets: nothing leaves the machine.
@Suite(.serialized, .enabled(if: Testpmd.installed, "dpdk-testpmd is not installed (apt-get install dpdk-dev)"))
struct NetInteropTests {
    static func directory() throws -> String {
        let d = NSTemporaryDirectory() + "rf-netio-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: d, withIntermediateDirectories: true)
        return d
    }

    // MARK: our driver, DPDK's device

    @Test(arguments: [false, true], [false, true])
    func driverAgainstTestpmdMacswapGetsEveryFrameBackIntact(packed: Bool, mergeable: Bool) throws {
        let dir = try Self.directory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let socket = dir + "/vhost.sock"
        let testpmd = try Testpmd(vdev: "net_vhost0,iface=\(socket),queues=1", mode: "macswap")
        defer { testpmd.stop() }
        #expect(
            Self.waitUntil(seconds: 15) {
                FileManager.default.fileExists(atPath: socket) && testpmd.log.contains("binding succeeded")
            },
            "\(testpmd.log)")
        var options = VirtioNetDriver.Options()
        options.packedRing = packed
        options.mergeableRxBuffers = mergeable
        options.controlQueue = false  // DPDK leaves the control queue to QEMU
        let net = try VirtioNetDriver.connect(socket: socket, options: options)
        defer { net.close() }
        #expect(net.ringFormat == (packed ? .packed : .split))
        #expect(net.info.mergeableRxBuffers == mergeable)
        // testpmd drops frames until forwarding runs (under load that came after the
        // connect and the first size was lost: 2175 frames counted).
        #expect(testpmd.waitFor("Press enter to exit"), "\(testpmd.log)")
        try Self.expectEveryFrameBackIntact(net)
        #expect(net.failure == nil)
        net.close()
        let counters = Testpmd.counters(testpmd.stop())
        #expect(counters?.rx ?? 0 >= 2200 && counters?.tx ?? 0 >= 2200, "\(String(describing: counters))")
    }

    /// Every size from the smallest to the largest frame, then a burst of 2000 frames in
    /// batches: each one comes back from testpmd's macswap in order and intact, on the
    /// queue pair it was sent on.
    static func expectEveryFrameBackIntact(_ net: VirtioNetDriver, pair: Int = 0) throws {
        // Every size from the smallest to the largest frame; testpmd swaps the MACs.
        for size in [14, 60, 64, 128, 512, 1000, 1514, 1518] {
            let r = try NetTraffic.ping(
                net.pair(pair), mac: net.info.mac, dst: [0x02, 0, 0, 0, 0, 1], size: size, count: 25, timeout: 5)
            #expect(r.received == 25 && r.mismatched == 0, "pair \(pair), size \(size): \(r)")
        }
        let r = try burst(net, pair: pair, frames: 2000, seed: 0)
        #expect(r.back == r.sent && r.sent >= 2000, "pair \(pair): frames returned in order and intact: \(r)")
        #expect(r.wrong == 0, "pair \(pair): \(r)")
    }

    /// A burst of `frames` frames in batches of 32 on one pair (at most 128 outstanding);
    /// counts those that came back in order with every byte intact, and anything else.
    /// No expectation inside: it may run on a thread of its own.
    static func burst(_ net: VirtioNetDriver, pair p: Int, frames: Int, seed: UInt64) throws -> (
        sent: Int, back: Int, wrong: Int
    ) {
        let pair = net.pair(p)
        let batch = NetFrameBatch(capacity: 32, frameCapacity: 1518)
        let incoming = NetFrameBatch(capacity: 64, frameCapacity: 1518)
        var sent: [[UInt8]] = []
        var back = 0
        var wrong = 0
        let deadline = Deadline.after(seconds: 20)
        while (back < sent.count || sent.count < frames) && !deadline.hasPassed {
            if sent.count < frames && sent.count - back < 128 {
                batch.removeAll()
                for i in 0..<32 {
                    batch.append(
                        NetTraffic.frame(
                            dst: [2, 0, 0, 0, 0, 1], src: net.info.mac, size: 60 + (sent.count + i) % 1400,
                            sequence: seed << 32 | UInt64(sent.count + i)))
                }
                var from = 0
                while from < batch.count && !deadline.hasPassed {
                    let n = try pair.transmit(batch, from: from)
                    for i in from..<from + n { sent.append(batch.bytes(i)) }
                    from += n
                    if n == 0 { _ = pair.waitForTransmitRoom(until: .after(seconds: 0.1)) }
                }
            }
            incoming.removeAll()
            let n = try pair.receive(into: incoming)
            for i in 0..<n {
                if back < sent.count && NetTraffic.isEcho(incoming[i], of: sent[back]) { back += 1 } else { wrong += 1 }
            }
            if n == 0 { _ = pair.waitForReceive(until: .after(seconds: 0.01)) }
        }
        return (sent.count, back, wrong)
    }

    /// testpmd's vhost back-end as a client (`client=1`): our driver listens, DPDK connects.
    @Test(arguments: [false, true])
    func driverListeningForTestpmdClientMacswapGetsEveryFrameBackIntact(packed: Bool) throws {
        let dir = try Self.directory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let socket = dir + "/vhost.sock"
        var options = VirtioNetDriver.Options()
        options.packedRing = packed
        options.controlQueue = false
        options.acceptTimeout = 30
        let testpmd = try Testpmd(vdev: "net_vhost0,iface=\(socket),queues=1,client=1", mode: "macswap")
        defer { testpmd.stop() }
        let net = try VirtioNetDriver.listen(socket: socket, options: options)
        defer { net.close() }
        #expect(!FileManager.default.fileExists(atPath: socket), "no second back-end can connect")
        #expect(net.ringFormat == (packed ? .packed : .split))
        // testpmd drops frames until forwarding runs.
        #expect(testpmd.waitFor("Press enter to exit"), "\(testpmd.log)")
        try Self.expectEveryFrameBackIntact(net)
        #expect(net.failure == nil)
        net.close()
        let counters = Testpmd.counters(testpmd.stop())
        #expect(counters?.rx ?? 0 >= 2200 && counters?.tx ?? 0 >= 2200, "\(String(describing: counters))")
    }

    /// Two queue pairs against testpmd's vhost back-end (`queues=2`, forwarding per queue
    /// with `--rxq=2 --txq=2`), our driver connecting or listening (`client=1`), split
    /// and packed. DPDK's vhost has no config space and leaves the control queue to the
    /// front-end: the driver takes the pairs from GET_QUEUE_NUM, keeps the control queue
    /// private and enables the four rings with SET_VRING_ENABLE. Every frame is verified
    /// on each pair (sizes 14...1518 and 2000 in a burst), then both pairs at once from two
    /// threads; testpmd's per-queue counters show both streams forwarded.
    @Test(arguments: [false, true], [false, true])
    func twoQueuePairsAgainstTestpmdGetEveryFrameBackOnTheirOwnPair(client: Bool, packed: Bool) throws {
        let dir = try Self.directory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let socket = dir + "/vhost.sock"
        var options = VirtioNetDriver.Options()
        options.packedRing = packed
        options.controlQueue = false  // DPDK leaves the control queue to the front-end
        options.queuePairs = 2
        options.acceptTimeout = 30
        let testpmd = try Testpmd(
            vdev: "net_vhost0,iface=\(socket),queues=2" + (client ? ",client=1" : ""), mode: "macswap",
            extra: ["--rxq=2", "--txq=2"])
        defer { testpmd.stop() }
        let net: VirtioNetDriver
        if client {
            net = try VirtioNetDriver.listen(socket: socket, options: options)
            #expect(!FileManager.default.fileExists(atPath: socket), "no second back-end can connect")
        } else {
            #expect(
                Self.waitUntil(seconds: 15) {
                    FileManager.default.fileExists(atPath: socket) && testpmd.log.contains("binding succeeded")
                },
                "\(testpmd.log)")
            net = try VirtioNetDriver.connect(socket: socket, options: options)
        }
        defer { net.close() }
        #expect(net.queuePairCount == 2)
        #expect(net.info.controlQueueIsPrivate)
        #expect(net.ringFormat == (packed ? .packed : .split))
        // testpmd drops frames until forwarding runs.
        #expect(testpmd.waitFor("Press enter to exit"), "\(testpmd.log)")
        for p in 0..<2 { try Self.expectEveryFrameBackIntact(net, pair: p) }
        // Both pairs at once, one thread each (a pair belongs to one thread at a time).
        let results = Mutex<[Int: Result<(sent: Int, back: Int, wrong: Int), any Error>]>([:])
        let done = DispatchSemaphore(value: 0)
        for p in 0..<2 {
            Thread.detachNewThread {
                let r = Result { try Self.burst(net, pair: p, frames: 3000, seed: UInt64(p + 1)) }
                results.withLock { $0[p] = r }
                done.signal()
            }
        }
        for _ in 0..<2 { done.wait() }
        for p in 0..<2 {
            let r = try #require(results.withLock { $0[p] }).get()
            #expect(r.back == r.sent && r.sent >= 3000 && r.wrong == 0, "pair \(p) concurrently: \(r)")
        }
        #expect(net.failure == nil)
        net.close()
        let output = testpmd.stop()
        let streams = Testpmd.streamCounters(output)
        for q in 0..<2 {
            // 200 pings and 2000 + 3000 frames per pair.
            #expect((streams[q]?.rx ?? 0) >= 5200 && (streams[q]?.tx ?? 0) >= 5200, "queue \(q): \(streams)")
        }
    }

    /// The CLI: `ringfence net --listen --no-ctrl --queues 2 ping` against testpmd's vhost
    /// as a client with two queues verifies frames on both pairs.
    @Test func cliPingsBothPairsOfTestpmdClient() throws {
        let dir = try Self.directory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let socket = dir + "/vhost.sock"
        let testpmd = try Testpmd(
            vdev: "net_vhost0,iface=\(socket),queues=2,client=1", mode: "macswap", extra: ["--rxq=2", "--txq=2"])
        defer { testpmd.stop() }
        let bin = try #require(Interop.ringfenceBinary, "build the ringfence binary first (swift build)")
        // Forwarding first (testpmd drops frames until it runs); DPDK's client retries the
        // connect each second until our listener is there.
        #expect(testpmd.waitFor("Press enter to exit"), "\(testpmd.log)")
        let r = try Interop.run([
            bin, "net", "--socket", socket, "--listen", "--no-ctrl", "--queues", "2", "ping", "--count", "50", "--size",
            "300",
        ])
        #expect(r.status == 0, "\(r.output)\n\(testpmd.log)")
        #expect(r.output.contains("pair 0: 50 sent, 50 returned intact, 0 wrong"), "\(r.output)")
        #expect(r.output.contains("pair 1: 50 sent, 50 returned intact, 0 wrong"), "\(r.output)")
        let streams = Testpmd.streamCounters(testpmd.stop())
        #expect((streams[0]?.rx ?? 0) >= 50 && (streams[1]?.rx ?? 0) >= 50, "\(streams)")
    }

    // MARK: DPDK's driver, our device

    /// serve-net in this process on one fabric, one port per socket.
    final class Served: @unchecked Sendable {
        let fabric: NetFabric
        var devices: [VirtioNetDevice] = []
        var backends: [Backend] = []
        var sockets: [String] = []
        let done = DispatchSemaphore(value: 0)
        let events = Mutex<[String]>([])

        init(
            mode: NetFabricMode, ports: Int, directory: String,
            options: VirtioNetDeviceOptions = VirtioNetDeviceOptions()
        ) throws {
            fabric = NetFabric(mode: mode)
            for i in 0..<ports {
                let record: @Sendable (BackendEvent) -> Void = { [unowned self] e in
                    self.events.withLock { $0.append("port \(i): \(e)") }
                }
                let device = VirtioNetDevice(fabric: fabric, options: options, onEvent: record)
                devices.append(device)
                var configuration = Backend.Configuration()
                configuration.pollInterval = 0.05
                let backend = Backend(device: device, configuration: configuration, onEvent: record)
                backends.append(backend)
                let path = directory + "/p\(i).sock"
                sockets.append(path)
                let listener = try UnixListener(path: path)
                let done = self.done
                Thread.detachNewThread {
                    try? backend.run(listener: listener)
                    done.signal()
                }
            }
        }

        func saw(_ text: String) -> Bool { events.withLock { $0.contains { $0.contains(text) } } }

        func stop() {
            for b in backends { b.stop() }
            for _ in backends { done.wait() }
        }
    }

    static func waitUntil(seconds: Double, _ condition: () -> Bool) -> Bool {
        let deadline = Deadline.after(seconds: seconds)
        while !deadline.hasPassed {
            if condition() { return true }
            usleep(20_000)
        }
        return condition()
    }

    static func virtioUser(_ socket: String, packed: Bool, mergeable: Bool, cq: Bool = false) -> String {
        "net_virtio_user0,path=\(socket),queues=1,packed_vq=\(packed ? 1 : 0),mrg_rxbuf=\(mergeable ? 1 : 0)"
            + (cq ? ",cq=1" : "")
    }

    @Test(arguments: [(false, false, false), (false, true, true), (true, false, false), (true, true, true)])
    func dpdkTxonlyIsServedWithoutARejectedFrame(packed: Bool, mergeable: Bool, cq: Bool) throws {
        let dir = try Self.directory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let served = try Served(mode: .sink, ports: 1, directory: dir)
        defer { served.stop() }
        let testpmd = try Testpmd(
            vdev: Self.virtioUser(served.sockets[0], packed: packed, mergeable: mergeable, cq: cq), mode: "txonly",
            preloadSealShim: true)
        defer { testpmd.stop() }
        #expect(Self.waitUntil(seconds: 15) { served.fabric.statistics.framesIn > 100_000 }, "\(testpmd.log)")
        let counters = Testpmd.counters(testpmd.stop())
        let s = served.fabric.statistics
        #expect(s.framesRejected == 0)
        #expect(s.bytesIn == s.framesIn * 64, "testpmd txonly sends 64-byte frames")
        // Frames still in the ring when testpmd stopped were never taken: at most a ring's worth.
        let tx = UInt64(counters?.tx ?? 0)
        #expect(
            tx >= s.framesIn && tx - s.framesIn <= 1024, "DPDK sent \(String(describing: counters)), took \(s.framesIn)"
        )
    }

    /// Our driver sends frames through serve-net --switch; DPDK's driver on the other port
    /// receives them (rxonly counts them), or returns them (io, macswap) for our driver to
    /// verify every byte.
    @Test(arguments: ["rxonly", "io", "macswap"], [false, true])
    func dpdkDriverExchangesFramesWithOursThroughTheSwitch(mode: String, packed: Bool) throws {
        let dir = try Self.directory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let served = try Served(mode: .switch, ports: 2, directory: dir)
        defer { served.stop() }
        let testpmd = try Testpmd(
            vdev: Self.virtioUser(served.sockets[1], packed: packed, mergeable: true), mode: mode,
            preloadSealShim: true)
        defer { testpmd.stop() }
        #expect(Self.waitUntil(seconds: 15) { served.saw("port 1: queue 0 started") }, "\(testpmd.log)")
        // testpmd flushes its receive queues when forwarding starts: send only after that.
        #expect(testpmd.waitFor("Press enter to exit"), "\(testpmd.log)")
        var options = VirtioNetDriver.Options()
        options.packedRing = packed
        let net = try VirtioNetDriver.connect(socket: served.sockets[0], options: options)
        defer { net.close() }
        let count = 300
        if mode == "rxonly" {
            for seq in 0..<count {
                let f = NetTraffic.frame(
                    dst: [2, 0, 0, 0, 0, 1], src: net.info.mac, size: 60 + seq, sequence: UInt64(seq))
                while try !net.pair(0).send(f) { _ = net.pair(0).waitForTransmitRoom(until: .after(seconds: 1)) }
                if seq % 32 == 31 { usleep(2000) }  // within testpmd's 1024 receive buffers
            }
            #expect(Self.waitUntil(seconds: 5) { served.fabric.statistics.framesDelivered >= UInt64(count) })
            usleep(200_000)
            let counters = Testpmd.counters(testpmd.stop())
            #expect(
                counters?.rx == count,
                "DPDK received every frame: \(String(describing: counters)) \(served.devices[1].statistics) \(served.events.withLock { $0 })"
            )
        } else {
            for size in [60, 64, 200, 1514] {
                let r = try NetTraffic.ping(
                    net.pair(0), mac: net.info.mac, dst: [2, 0, 0, 0, 0, 1], size: size, count: count / 4,
                    timeout: 5)
                #expect(r.received == count / 4 && r.mismatched == 0, "\(mode) size \(size): \(r)")
            }
            #expect(net.failure == nil)
        }
        #expect(served.fabric.statistics.framesRejected == 0)
        #expect(served.devices.allSatisfy { $0.statistics.receiveRejected == 0 })
    }

    /// Multiqueue: DPDK's driver with two queue pairs (`queues=2`, its own control queue
    /// enabling them) sets up and starts both pairs on serve-net and transmits; nothing is
    /// rejected. (Frames are counted per device, not per queue.)
    @Test func dpdkTwoQueuePairsAreNegotiatedAndServed() throws {
        let dir = try Self.directory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var options = VirtioNetDeviceOptions()
        options.queuePairs = 2
        let served = try Served(mode: .sink, ports: 1, directory: dir, options: options)
        defer { served.stop() }
        let testpmd = try Testpmd(
            vdev: "net_virtio_user0,path=\(served.sockets[0]),queues=2,cq=1", mode: "txonly",
            extra: ["--rxq=2", "--txq=2"], preloadSealShim: true)
        defer { testpmd.stop() }
        #expect(
            Self.waitUntil(seconds: 15) { served.saw("queue 1 started") && served.saw("queue 3 started") },
            "\(testpmd.log)")
        #expect(Self.waitUntil(seconds: 15) { served.fabric.statistics.framesIn > 100_000 }, "\(testpmd.log)")
        let counters = Testpmd.counters(testpmd.stop())
        #expect(served.fabric.statistics.framesRejected == 0)
        let tx = UInt64(counters?.tx ?? 0)
        #expect(tx >= served.fabric.statistics.framesIn && tx - served.fabric.statistics.framesIn <= 2048)
    }
}

#if canImport(Glibc)
import Glibc
#endif
import RingTestSupport
import SharedMemory
import Synchronization
import Testing
@testable import XenRing

/// In-process netback connections served on dedicated threads, one per channel (all at
/// once, like `serve-xen-net`), sharing one switch.
final class NetBackendThreads: @unchecked Sendable {
    private var threads: [TestThread] = []
    let hub = XenNetSwitch()
    private let lock = Mutex<([Int: XenNetBackendConnection.End], [XenConnectError], [Int: UInt64])>(([:], [], [:]))
    var ends: [Int: XenNetBackendConnection.End] { lock.withLock { $0.0 } }
    var refusals: [XenConnectError] { lock.withLock { $0.1 } }
    /// Wake-ups without work each connection counted (and backed off).
    var spuriousEvents: [Int: UInt64] { lock.withLock { $0.2 } }

    init(
        channels: [UnixChannel], mode: XenNetMode = .loopback, info: XenNetInfo = XenNetInfo(), idle: Double = 5,
        hooks: (any XenNetBackendHooks)? = nil
    ) {
        for (i, channel) in channels.enumerated() {
            let box = UnsafeSendable((channel, hooks))
            threads.append(
                TestThread { [self] in
                    do throws(XenConnectError) {
                        let c = try XenNetBackendConnection.accept(
                            channel: box.value.0, mode: mode, hub: hub, info: info, hooks: box.value.1)
                        let end = c.run(idleTimeout: idle)
                        lock.withLock {
                            $0.0[i] = end
                            $0.2[i] = c.events.spuriousEvents
                        }
                    } catch {
                        lock.withLock { $0.1.append(error) }
                    }
                })
        }
    }

    func join() { for t in threads { t.join() } }
}

func connectedNet(
    _ count: Int = 1, mode: XenNetMode = .loopback, hooks: (any XenNetBackendHooks)? = nil
) throws -> ([XenNetFrontendDevice], NetBackendThreads) {
    var fronts: [UnixChannel] = []
    var backs: [UnixChannel] = []
    for _ in 0..<count {
        let (a, b) = try UnixChannel.pair()
        fronts.append(a)
        backs.append(b)
    }
    let backend = NetBackendThreads(channels: backs, mode: mode, hooks: hooks)
    return (try fronts.map { try XenNetFrontendDevice.connect(channel: $0) }, backend)
}

/// An Ethernet frame from `src` to `dst` (ethertype 0x88b5, local experimental).
func ethernet(dst: [UInt8], src: [UInt8], payload: Int, seed: Int) -> [UInt8] {
    dst + src + [0x88, 0xb5] + (0..<payload).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ seed) }
}

@Suite struct NetConnectionTests {
    func receive(_ device: XenNetFrontendDevice, seconds: Double = 5) throws -> [UInt8]? {
        var buffer = [UInt8](repeating: 0, count: 65536)
        let frame = try buffer.withUnsafeMutableBytes { try device.receive(into: $0, until: .after(seconds: seconds)) }
        guard let frame, frame.status == .okay else { return nil }
        return Array(buffer[0..<frame.length])
    }

    @Test func handshakeThenLoopbackEchoesFramesByteForByte() throws {
        let (devices, backend) = try connectedNet()
        let device = devices[0]
        #expect(device.info == XenNetInfo())
        for (n, size) in [60, 1514, 4096, 9000, 65535, 14].enumerated() {
            let frame = ethernet(dst: [0, 0x16, 0x3e, 0, 0, 1], src: [2, 0, 0, 0, 0, 1], payload: size - 14, seed: n)
            try frame.withUnsafeBytes { try device.send($0, token: UInt64(n)) }
            #expect(try receive(device) == frame)
        }
        try device.reapTx()
        #expect(device.txCompleted == 6 && device.txFailed == 0)
        device.disconnect()
        backend.join()
        #expect(backend.ends[0] == .closed)
    }

    @Test func sinkTakesFramesAndSendsNothingBack() throws {
        let (devices, backend) = try connectedNet(mode: .sink)
        let frame = ethernet(
            dst: [0xff, 0xff, 0xff, 0xff, 0xff, 0xff], src: [2, 0, 0, 0, 0, 1], payload: 100, seed: 1)
        for n in 0..<10 { try frame.withUnsafeBytes { try devices[0].send($0, token: UInt64(n)) } }
        #expect(try receive(devices[0], seconds: 0.2) == nil)
        try devices[0].reapTx()
        #expect(devices[0].txCompleted == 10)
        devices[0].disconnect()
        backend.join()
    }

    /// Two frontends on one switch: a broadcast floods, then the learned MAC is unicast.
    @Test func switchForwardsBetweenFrontends() throws {
        let (devices, backend) = try connectedNet(2, mode: .switch)
        let macA: [UInt8] = [2, 0, 0, 0, 0, 0xa]
        let macB: [UInt8] = [2, 0, 0, 0, 0, 0xb]
        let hello = ethernet(dst: [0xff, 0xff, 0xff, 0xff, 0xff, 0xff], src: macA, payload: 50, seed: 1)
        try hello.withUnsafeBytes { try devices[0].send($0) }
        #expect(try receive(devices[1]) == hello)
        let reply = ethernet(dst: macA, src: macB, payload: 1500, seed: 2)
        try reply.withUnsafeBytes { try devices[1].send($0) }
        #expect(try receive(devices[0]) == reply)
        for d in devices { d.disconnect() }
        backend.join()
    }

    /// A frontend that overflows its tx req_prod gets its connection dropped with the typed
    /// violation; the other connection, served at the same time, keeps echoing.
    @Test func violationTearsDownOneConnectionOnly() throws {
        let (devices, backend) = try connectedNet(2)
        let bad = devices[0].front
        SharedAccess.store32Release(bad.txRing + SharedRingLayout.requestProducer, 1000)
        devices[0].events.notify()
        #expect(devices[0].waitForDisconnect(until: .after(seconds: 5)))
        let frame = ethernet(dst: [2, 0, 0, 0, 0, 1], src: [2, 0, 0, 0, 0, 2], payload: 500, seed: 3)
        try frame.withUnsafeBytes { try devices[1].send($0) }
        #expect(try receive(devices[1]) == frame)
        devices[1].disconnect()
        backend.join()
        #expect(backend.ends[0] == .dropped(.xenRequestProducerOverflow(consumer: 0, producer: 1000, ringSize: 256)))
        #expect(backend.ends[1] == .closed)
    }

    /// Event storm on the backend's event channel (no work): wake-ups are backed off and
    /// the connection still serves afterwards.
    @Test func eventStormIsBackedOff() throws {
        let (devices, backend) = try connectedNet()
        let start = monotonicNanoseconds()
        for _ in 0..<20000 {
            devices[0].events.notify()
            if monotonicNanoseconds() - start > 300_000_000 { break }
            usleep(20)
        }
        let frame = ethernet(dst: [2, 0, 0, 0, 0, 1], src: [2, 0, 0, 0, 0, 2], payload: 100, seed: 4)
        try frame.withUnsafeBytes { try devices[0].send($0) }
        #expect(try receive(devices[0]) == frame)
        devices[0].disconnect()
        backend.join()
        #expect(backend.ends[0] == .closed)
        #expect((backend.spuriousEvents[0] ?? 0) > EventChannel.spuriousThreshold)
    }

    @Test func frontendRefusesBackendWithoutRxCopyOrWithBadMAC() throws {
        var node = XenNetInfo().node
        node["feature-rx-copy"] = "0"
        #expect(throws: XenViolation.xenHandshakeValue(key: "feature-rx-copy", value: "0")) {
            try XenNetInfo.validate(node)
        }
        for mac in ["00:16:3e:00:00", "00:16:3e:00:00:1", "00:16:3e:00:00:zz", "00:16:3e:00:00:01:02"] {
            node = XenNetInfo().node
            node["mac"] = mac
            #expect(throws: XenViolation.xenHandshakeValue(key: "mac", value: mac)) { try XenNetInfo.validate(node) }
        }
        node = XenNetInfo().node
        node["multi-queue-max-queues"] = "0"
        #expect(throws: XenViolation.xenHandshakeValue(key: "multi-queue-max-queues", value: "0")) {
            try XenNetInfo.validate(node)
        }
        node = XenNetInfo().node
        node["state"] = "4"
        #expect(throws: XenViolation.xenHandshakeState(expected: 2, got: 4)) { try XenNetInfo.validate(node) }
    }

    @Test func backendRefusesFrontendRequestsOutOfRange() throws {
        let good = XenStoreNode([
            "state": "3", "tx-ring-ref": "8", "rx-ring-ref": "9", "event-channel": "1", "request-rx-copy": "1",
            "feature-rx-notify": "1", "protocol": "x86_64-abi", "grant-entries": "512", "grant-frames": "258",
        ])
        #expect(try XenNetFrontendRequest.validate(good).rxRingRef == 9)
        let cases: [(String, String, XenViolation)] = [
            ("request-rx-copy", "0", .xenHandshakeValue(key: "request-rx-copy", value: "0")),
            ("feature-rx-notify", "0", .xenHandshakeValue(key: "feature-rx-notify", value: "0")),
            ("rx-ring-ref", "8", .xenHandshakeValue(key: "rx-ring-ref", value: "8")),
            ("tx-ring-ref", "512", .xenHandshakeValue(key: "tx-ring-ref", value: "512")),
            ("multi-queue-num-queues", "2", .xenHandshakeValue(key: "multi-queue-num-queues", value: "2")),
            ("protocol", "x86_32-abi", .xenHandshakeValue(key: "protocol", value: "x86_32-abi")),
            ("grant-frames", "1", .xenHandshakeValue(key: "grant-frames", value: "1")),
        ]
        for (key, value, violation) in cases {
            var node = good
            node[key] = value
            #expect(throws: violation) { try XenNetFrontendRequest.validate(node) }
        }
    }
}

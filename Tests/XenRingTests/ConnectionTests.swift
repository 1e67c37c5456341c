#if canImport(Glibc)
import Glibc
#endif
import Adversary
import RingTestSupport
import SharedMemory
import Testing
@testable import XenRing

/// An in-process backend connection served on a dedicated thread.
final class BackendThread: @unchecked Sendable {
    let storage: MemoryStorage
    private var thread: TestThread?
    private(set) var ends: [XenBlkBackendConnection.End] = []
    private(set) var refusals: [XenConnectError] = []

    /// Serves each channel in turn (one connection after the other, like the CLI).
    /// `idleTimeout`: seconds without a request before the backend ends the connection
    /// (async tests pass more: their tasks share the pool with every other suite).
    init(
        channels: [UnixChannel], sectors: Int = 2048, attacks: [XenBackendAttack?] = [nil], idleTimeout: Double = 5
    ) {
        storage = MemoryStorage(sectors: sectors)
        let box = UnsafeSendable((channels, attacks))
        thread = TestThread { [self] in
            let (channels, attacks) = box.value
            for (i, channel) in channels.enumerated() {
                do throws(XenConnectError) {
                    let c = try XenBlkBackendConnection.accept(
                        channel: channel, storage: storage,
                        hooks: attacks[min(i, attacks.count - 1)].map(XenBackendAdversary.init))
                    ends.append(c.run(idleTimeout: idleTimeout))
                } catch {
                    refusals.append(error)
                }
            }
        }
    }

    func join() { thread?.join() }
}

struct UnsafeSendable<T>: @unchecked Sendable {
    let value: T
    init(_ value: T) { self.value = value }
}

/// A frontend connected to an in-process backend thread over a socketpair, with real
/// eventfds and memfds: the full handshake and notification path.
func connectedPair(
    attack: XenBackendAttack? = nil, sectors: Int = 2048, idleTimeout: Double = 5
) throws -> (XenBlkFrontendDevice, BackendThread) {
    let (a, b) = try UnixChannel.pair()
    let backend = BackendThread(channels: [b], sectors: sectors, attacks: [attack], idleTimeout: idleTimeout)
    let device = try XenBlkFrontendDevice.connect(channel: a)
    return (device, backend)
}

func page(_ seed: UInt8) -> [UInt8] { (0..<4096).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ Int(seed)) } }

@Suite struct ConnectionTests {
    @Test func handshakeThenWriteReadFlushDiscardRoundTrip() throws {
        let (device, backend) = try connectedPair()
        #expect(device.info == XenBlkInfo(sectors: 2048))
        let data = page(3) + page(4)
        try data.withUnsafeBytes { try device.write(sector: 40, from: $0) }
        try device.flush()
        var back = [UInt8](repeating: 0, count: data.count)
        try back.withUnsafeMutableBytes { try device.read(sector: 40, into: $0) }
        #expect(back == data)
        try device.discard(sector: 40, sectors: 8)
        try back.withUnsafeMutableBytes { try device.read(sector: 40, into: $0) }
        #expect(back[..<4096].allSatisfy { $0 == 0 })
        #expect(Array(back[4096...]) == page(4))
        device.disconnect()
        backend.join()
        #expect(backend.ends == [.closed])
    }

    @Test func requestBeyondAnnouncedCapacityIsRefusedLocally() throws {
        let (device, backend) = try connectedPair(sectors: 64)
        let data = page(1)
        #expect(throws: XenBlkError.submit(.beyondCapacity(sector: 60, sectors: 8))) {
            try data.withUnsafeBytes { try device.write(sector: 60, from: $0) }
        }
        device.disconnect()
        backend.join()
    }

    static func expectHandshakeRefused(_ attack: XenBackendAttack, _ v: XenViolation) throws {
        let (a, b) = try UnixChannel.pair()
        let backend = BackendThread(channels: [b], attacks: [attack])
        #expect(throws: XenConnectError.violation(v)) {
            try XenBlkFrontendDevice.connect(channel: a, until: .after(seconds: 5))
        }
        a.shutdown()
        backend.join()
    }

    @Test func handshakeSectorsZeroRefused() throws {
        try Self.expectHandshakeRefused(.sectorsZero, .xenHandshakeValue(key: "sectors", value: "0"))
    }

    @Test func handshakeSectorsTwoToThe63Refused() throws {
        try Self.expectHandshakeRefused(.sectorsHuge, .xenHandshakeValue(key: "sectors", value: "9223372036854775808"))
    }

    @Test func handshakeSectorSizeThreeRefused() throws {
        try Self.expectHandshakeRefused(.sectorSizeThree, .xenHandshakeValue(key: "sector-size", value: "3"))
    }

    @Test func handshakeMalformedValuesRefused() throws {
        func info(_ edit: (inout XenStoreNode) -> Void) throws(XenViolation) -> XenBlkInfo {
            var n = XenBlkInfo(sectors: 100).node
            edit(&n)
            return try XenBlkInfo.validate(n)
        }
        #expect(throws: XenViolation.xenHandshakeValue(key: "sectors", value: "-1")) {
            try info { $0["sectors"] = "-1" }
        }
        #expect(throws: XenViolation.xenHandshakeValue(key: "sectors", value: "99999999999999999999999")) {
            try info { $0["sectors"] = "99999999999999999999999" }
        }
        #expect(throws: XenViolation.xenHandshakeValue(key: "sector-size", value: "1536")) {
            try info { $0["sector-size"] = "1536" }
        }
        #expect(throws: XenViolation.xenHandshakeValue(key: "feature-discard", value: "yes")) {
            try info { $0["feature-discard"] = "yes" }
        }
        #expect(throws: XenViolation.xenHandshakeState(expected: 2, got: 4)) { try info { $0["state"] = "4" } }
        #expect(throws: XenViolation.xenHandshakeValue(key: "(message)", value: "malformed line")) {
            try XenStoreNode.decode(body: Array("sectors\n".utf8))
        }
        #expect(throws: XenViolation.xenHandshakeValue(key: "a", value: "duplicate")) {
            try XenStoreNode.decode(body: Array("a=1\na=2\n".utf8))
        }
        #expect(try info { _ in }.sectors == 100)
    }

    /// Event storm (XSA-391): thousands of events without a response are counted as
    /// spurious and backed off; the request still completes and the device stays up.
    @Test func eventStormIsCountedAndBackedOff() throws {
        let (device, backend) = try connectedPair(attack: .eventStorm)
        let data = page(9)
        let start = monotonicNanoseconds()
        try data.withUnsafeBytes { try device.write(sector: 0, from: $0) }
        let elapsed = Double(monotonicNanoseconds() - start) / 1e9
        #expect(elapsed >= 0.25)
        #expect(device.events.spuriousEvents > EventChannel.spuriousThreshold)
        #expect(device.events.spuriousEvents < 3000)  // far fewer wake-ups than events
        // What only the backoff bounds: the backend sends an event every ~100 µs for
        // 300 ms; without the pauses the frontend wakes up for (nearly) each of them.
        let bound = WakeBackoff.mostSpuriousWakeUps(in: elapsed)
        #expect(
            device.events.spuriousEvents <= UInt64(2 * bound),
            "\(device.events.spuriousEvents) wake-ups without work in \(elapsed) s (backoff bound \(bound))")
        #expect(device.events.longestBackoffNanoseconds > 0)
        #expect(device.events.backoffNanoseconds == 0)  // reset by the productive wake-up
        #expect(!device.front.isBroken)
        device.disconnect()
        backend.join()
    }

    /// A backend that never answers: the request fails at its deadline with a typed
    /// violation, the device is disabled and masked; another device is unaffected.
    @Test(.timeLimit(.minutes(1))) func neverRespondingBackendTimesOutAndDisablesDevice() throws {
        let (device, backend) = try connectedPair(attack: .neverRespond)
        let (good, goodBackend) = try connectedPair()
        device.timeout = 0.3
        let data = page(2)
        let v = XenViolation.deadlineExceeded(milliseconds: 300)
        let start = monotonicNanoseconds()
        #expect(throws: XenBlkError.broken(v)) { try data.withUnsafeBytes { try device.write(sector: 0, from: $0) } }
        // At the deadline: not before it, and not long after (the error names 300 ms
        // whatever the wait really was).
        let seconds = Double(monotonicNanoseconds() - start) / 1e9
        #expect(seconds >= 0.29 && seconds < 1.5, "failed after \(seconds) s")
        #expect(device.violation == v)
        #expect(device.failedTokens == [1])
        #expect(device.events.isMasked)
        #expect(throws: XenBlkError.broken(v)) { try device.flush() }
        try data.withUnsafeBytes { try good.write(sector: 0, from: $0) }
        device.disconnect()
        good.disconnect()
        backend.join()
        goodBackend.join()
    }

    /// A backend attack over the real connection (wrong operation): typed violation,
    /// in-flight failed, masked; the second device keeps working.
    @Test func wrongOperationOverConnectionDisablesOnlyThatDevice() throws {
        let (device, backend) = try connectedPair(attack: .wrongOperation)
        let (good, goodBackend) = try connectedPair()
        var buffer = [UInt8](repeating: 0, count: 4096)
        let v = XenViolation.xenResponseOperationMismatch(id: 0, expected: 0, got: 1)
        #expect(throws: XenBlkError.broken(v)) {
            try buffer.withUnsafeMutableBytes { try device.read(sector: 0, into: $0) }
        }
        #expect(device.failedTokens == [1])
        #expect(device.events.isMasked)
        try buffer.withUnsafeMutableBytes { try good.read(sector: 0, into: $0) }
        device.disconnect()
        good.disconnect()
        backend.join()
        goodBackend.join()
    }

    /// Frontend corrupts req_prod: the backend drops that connection, then serves the
    /// next (good) frontend.
    @Test func backendDropsCorruptRingThenServesGoodFrontend() throws {
        let (a1, b1) = try UnixChannel.pair()
        let (a2, b2) = try UnixChannel.pair()
        let backend = BackendThread(channels: [b1, b2])
        let bad = try XenBlkFrontendDevice.connect(channel: a1)
        SharedAccess.store32Release(bad.front.ring + SharedRingLayout.requestProducer, 1000)
        bad.events.notify()
        let good = try XenBlkFrontendDevice.connect(channel: a2)
        let data = page(5)
        try data.withUnsafeBytes { try good.write(sector: 8, from: $0) }
        var back = [UInt8](repeating: 0, count: 4096)
        try back.withUnsafeMutableBytes { try good.read(sector: 8, into: $0) }
        #expect(back == data)
        good.disconnect()
        backend.join()
        #expect(backend.ends.first == .dropped(.xenRequestProducerOverflow(consumer: 0, producer: 1000, ringSize: 32)))
        #expect(backend.ends.last == .closed)
    }

    /// Frontend sends absurd handshake values: the backend refuses the connection.
    @Test func backendRefusesAbsurdFrontendHandshake() throws {
        let (a, b) = try UnixChannel.pair()
        let backend = BackendThread(channels: [b])
        let deadline = Deadline.after(seconds: 5)
        _ = try a.receiveNode(maxDescriptors: 0, until: deadline)
        let table = try SharedRegion(name: "t", size: 4096)
        let frames = try SharedRegion(name: "f", size: 4096)
        let e1 = try Notifier()
        let e2 = try Notifier()
        try a.sendNode(
            XenStoreNode([
                "state": "3", "ring-ref": "600", "protocol": "x86_64-abi", "grant-entries": "512", "grant-frames": "1",
            ]), descriptors: [table.fileDescriptor, frames.fileDescriptor, e1.fileDescriptor, e2.fileDescriptor],
            until: deadline)
        backend.join()
        #expect(backend.refusals == [.violation(.xenHandshakeValue(key: "ring-ref", value: "600"))])
    }
}

/// The frontend-attack catalogue as an audit over real connections: each malformed
/// request is refused with ERROR and the backend keeps serving; the corrupt ring gets
/// the connection dropped and the backend serves the next frontend.
@Suite struct FrontendAttackAuditTests {
    @Test(arguments: XenFrontendAttack.allCases.filter { $0 != .requestProducerJump })
    func malformedRequestIsRefusedAndBackendKeepsServing(attack: XenFrontendAttack) throws {
        let (device, backend) = try connectedPair()
        #expect(XenFrontendAdversary.send(attack, on: device) == .refused(.error))
        var page = [UInt8](repeating: 0, count: 4096)
        try page.withUnsafeMutableBytes { try device.read(sector: 0, into: $0) }
        device.disconnect()
        backend.join()
        #expect(backend.ends == [.closed])
    }

    @Test func requestProducerJumpGetsConnectionDroppedThenNextServed() throws {
        let (a1, b1) = try UnixChannel.pair()
        let (a2, b2) = try UnixChannel.pair()
        let backend = BackendThread(channels: [b1, b2])
        let bad = try XenBlkFrontendDevice.connect(channel: a1)
        #expect(XenFrontendAdversary.send(.requestProducerJump, on: bad) == .dropped)
        let good = try XenBlkFrontendDevice.connect(channel: a2)
        try good.flush()
        good.disconnect()
        backend.join()
        // The jump is published with the one request the adversary posted: 1 + 1000.
        #expect(
            backend.ends == [.dropped(.xenRequestProducerOverflow(consumer: 0, producer: 1001, ringSize: 32)), .closed])
    }
}

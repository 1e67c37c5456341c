import Glibc
import SharedMemory
import RingTestSupport
import Testing
import VhostUser
import VirtioBlock
import Virtqueue

/// Seeded random garbage on both planes: the process must never trap (R4), every wait
/// must end (R5), and the server must then serve a well-behaved front-end.
@Suite(.serialized) struct RandomizedAttackTests {
    typealias F = TestFrontend

    @Test(arguments: [UInt64(1), 2, 3])
    func randomControlMessagesNeverBreakTheServer(seed: UInt64) throws {
        let fixture = try BackendFixture(queues: 2)
        defer { fixture.shutdown() }
        var rng = SplitMix(seed: seed)
        let eventfd = try Notifier()
        let memfd = try SharedRegion(name: "rf-random", size: 1 << 16)
        var f = try TestFrontend(path: fixture.socketPath)
        var drops = 0
        for _ in 0..<300 {
            let known = Request.allCases.randomElement(using: &rng)?.rawValue ?? 1
            let code = Bool.random(using: &rng) ? known : UInt32.random(in: 0...64, using: &rng)
            var flags = HeaderFlags.version
            if Int.random(in: 0..<4, using: &rng) == 0 { flags |= HeaderFlags.needReply }
            if Int.random(in: 0..<20, using: &rng) == 0 { flags = UInt32.random(in: 0...15, using: &rng) }
            let length = Int.random(in: 0...(Bool.random(using: &rng) ? 48 : 300), using: &rng)
            var payload = (0..<length).map { _ in UInt8.random(in: 0...255, using: &rng) }
            // Often small, plausible values, so decoding gets past the first checks.
            if length >= 8 && Bool.random(using: &rng) {
                payload.replaceSubrange(0..<8, with: U64Payload(UInt64.random(in: 0...300, using: &rng)).encoded)
            }
            let fds: [Int32] =
                switch Int.random(in: 0..<6, using: &rng) {
                case 0: [eventfd.fileDescriptor]
                case 1: [memfd.fileDescriptor]
                case 2: [eventfd.fileDescriptor, memfd.fileDescriptor]
                default: []
                }
            do {
                try f.send(code, payload: payload, fds: fds, needReply: flags & HeaderFlags.needReply != 0)
            } catch {
                drops += 1
                f = try TestFrontend(path: fixture.socketPath)
                continue
            }
            // Drain whatever came back; reconnect if the server hung up.
            var buffer = [UInt8](repeating: 0, count: 512)
            let n = buffer.withUnsafeMutableBytes {
                recv(f.channel.channel.fileDescriptor, $0.baseAddress, 512, Int32(MSG_DONTWAIT))
            }
            if n == 0 {
                drops += 1
                f = try TestFrontend(path: fixture.socketPath)
            }
        }
        print("[random control] seed \(seed): 300 messages, \(drops) connections dropped")
        try fixture.expectServesWellBehavedFrontend(after: f)
    }

    @Test(arguments: [UInt64(7), 8])
    func randomRingContentsNeverBreakTheServer(seed: UInt64) throws {
        let fixture = try BackendFixture()
        defer { fixture.shutdown() }
        var rng = SplitMix(seed: seed)
        var f = try TestFrontend(path: fixture.socketPath)
        try f.setUp(queueSize: 8)
        var outcomes: [String: Int] = [:]
        for round in 0..<150 {
            // Random descriptors: addresses near and inside the region, or anywhere.
            for i in 0..<8 {
                let address: UInt64 =
                    switch Int.random(in: 0..<4, using: &rng) {
                    case 0: UInt64.random(in: 0...UInt64.max, using: &rng)
                    case 1: F.guestBase + UInt64(F.regionSize) - UInt64.random(in: 0...64, using: &rng)
                    default: F.guest(F.headerOffset + Int.random(in: 0..<0x10000, using: &rng))
                    }
                let length: UInt32 =
                    Bool.random(using: &rng)
                    ? UInt32.random(in: 0...4096, using: &rng) : UInt32.random(in: 0...UInt32.max, using: &rng)
                f.writeDescriptor(
                    i, address: address, length: length, flags: UInt16.random(in: 0...7, using: &rng),
                    next: UInt16.random(in: 0...9, using: &rng))
                if Bool.random(using: &rng) {
                    f.writeDescriptor(
                        i, address: F.guest(F.headerOffset), length: UInt32.random(in: 0...64, using: &rng) * 16,
                        flags: UInt16.random(in: 0...7, using: &rng), next: UInt16.random(in: 0...9, using: &rng),
                        table: F.indirectOffset)
                }
            }
            let header = BlockProtocol.encodeHeader(
                type: BlockProtocol.RequestType.allCases.randomElement(using: &rng) ?? .read,
                sector: Bool.random(using: &rng)
                    ? UInt64.random(in: 0...9000, using: &rng) : .random(in: 0...UInt64.max, using: &rng))
            for (i, b) in header.enumerated() { f.pointer(F.headerOffset + i).storeBytes(of: b, as: UInt8.self) }
            // Now and then a ring-level lie (head out of range, idx jump): the queue fails.
            let head = Int.random(in: 0..<60, using: &rng) == 0 ? 8 : UInt16.random(in: 0...7, using: &rng)
            f.publish(head: head, advance: Int.random(in: 0..<60, using: &rng) == 0 ? 20 : 1)
            if let used = f.waitUsed(seconds: 0.3) {
                outcomes[used.length == 0 ? "rejected" : "completed", default: 0] += 1
            } else {
                outcomes["queue failed", default: 0] += 1
                // The queue is broken (sticky): start over on a new connection.
                f.channel.channel.shutdown()
                f = try TestFrontend(path: fixture.socketPath)
                try f.setUp(queueSize: 8)
            }
            _ = round
        }
        print("[random rings] seed \(seed): \(outcomes.sorted { $0.key < $1.key })")
        try fixture.expectServesWellBehavedFrontend(after: f)
    }
}

import Foundation
import Testing
import VhostUser
import VirtioBlock
import Virtqueue

/// Our blk driver against our blk device over the packed ring (issue 7): negotiated when
/// offered, the ring wraps many times, data stays intact; split still works on request.
@Suite struct PackedEndToEndTests {
    static func exercise(_ disk: VirtioBlockDriver, rounds: Int) throws {
        for round in 0..<rounds {
            let count = 512 * (1 + round % 9)
            let offset = UInt64((round * 4096) % (BackendFixture.imageSize - 8192))
            let pattern = (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ round) }
            try disk.write(at: offset, bytes: pattern)
            #expect(try disk.read(at: offset, count: count) == pattern, "round \(round)")
        }
        try disk.flush()
        #expect(try disk.identify() == "ringfence")
    }

    @Test func packedRingIsNegotiatedAndServesThroughManyWraps() throws {
        let fixture = try BackendFixture(queues: 2)
        defer { fixture.shutdown() }
        var options = VirtioBlockDriver.Options()
        options.queueSize = 8  // 3 slots per request: the ring wraps every few requests
        options.queues = 2
        let disk = try VirtioBlockDriver.connect(socket: fixture.socketPath, options: options)
        defer { disk.close() }
        #expect(disk.ringFormat == .packed)
        try Self.exercise(disk, rounds: 200)
        #expect(disk.failure == nil)
        #expect(fixture.events.all.contains { $0.contains("(packed ring)") }, "the device saw packed negotiated")
        #expect(!fixture.events.all.contains { $0.contains("rejected") || $0.contains("failed") })
    }

    @Test func splitRingIsUsedWhenPackedIsNotWanted() throws {
        let fixture = try BackendFixture()
        defer { fixture.shutdown() }
        var options = VirtioBlockDriver.Options()
        options.queueSize = 8
        options.packedRing = false
        let disk = try VirtioBlockDriver.connect(socket: fixture.socketPath, options: options)
        defer { disk.close() }
        #expect(disk.ringFormat == .split)
        try Self.exercise(disk, rounds: 40)
        #expect(fixture.events.all.contains { $0.contains("(split ring)") })
    }
}

#if canImport(Glibc)
import Glibc
#endif
import Adversary
import BlockBench
import RingTestSupport
import SharedMemory
import Testing
@testable import XenRing

/// Real cross-process runs: `ringfence serve-xen-blk` in a child process maps our sealed
/// memfds and eventfds (passed over a Unix socket) and serves, honestly or not.
@Suite(.serialized) struct TwoProcessXenTests {
    static func spawn(attack: XenBackendAttack? = nil) throws -> (XenBlkFrontendDevice, ChildProcess) {
        let exe = try #require(ringfenceBinary(), "ringfence must be built next to the tests")
        let (mine, theirs) = try UnixChannel.pair()
        var args = ["serve-xen-blk", "--fd", "3", "--memory-sectors", "4096"]
        if let attack { args += ["--attack", attack.rawValue] }
        let child = try ChildProcess(executable: exe, arguments: args, passing: [theirs.fileDescriptor])
        let device = try XenBlkFrontendDevice.connect(channel: mine)
        return (device, child)
    }

    @Test func writeReadAcrossProcesses() throws {
        let (device, child) = try Self.spawn()
        for round in 0..<20 {
            let data = (0..<(11 * 4096)).map { UInt8(truncatingIfNeeded: $0 >> 3 &+ round) }
            try data.withUnsafeBytes { try device.write(sector: UInt64(round * 88), from: $0) }
            var back = [UInt8](repeating: 0, count: data.count)
            try back.withUnsafeMutableBytes { try device.read(sector: UInt64(round * 88), into: $0) }
            #expect(back == data)
        }
        let r = BlockBench(pattern: .read, blockSize: 4096, depth: 16, seconds: 0.2, blocks: device.info.sectors / 8)
            .run(device)
        #expect(r.requests > 0 && r.errors == 0 && r.firstError == nil)
        device.disconnect()
        #expect(child.wait(until: .after(seconds: 5)) == .exited(0))
    }

    /// Each backend attack, from another process (grant ref 8 holds the ring, 16 the
    /// data): the exact violation, the in-flight request failed, the channel masked.
    @Test(arguments: [
        (
            XenBackendAttack.responseProducerJump,
            XenViolation.xenResponseProducerBeyondInFlight(consumer: 0, producer: 1001, inFlight: 1)
        ),
        (.responseIdNotInFlight, .xenResponseIdNotInFlight(id: 1)),
        (.unknownStatus, .xenResponseStatusUnknown(id: 0, status: 7)),
        (.grantStillMapped, .xenGrantStillMapped(ref: 16, flags: GrantLayout.permitAccess | GrantLayout.writing)),
        (.grantFlagsScribbled, .xenGrantFlagsScribbled(ref: 16, expected: GrantLayout.permitAccess, found: 0x00e2)),
    ])
    func backendAttackFromAnotherProcessDisablesDevice(attack: XenBackendAttack, expected: XenViolation) throws {
        let (device, child) = try Self.spawn(attack: attack)
        var buffer = [UInt8](repeating: 0, count: 4096)
        #expect(throws: XenBlkError.broken(expected)) {
            try buffer.withUnsafeMutableBytes { try device.read(sector: 0, into: $0) }
        }
        #expect(device.failedTokens == [1])
        #expect(device.events.isMasked)
        device.disconnect()
        #expect(child.wait(until: .after(seconds: 5)) == .exited(0))
    }
}
